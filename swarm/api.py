"""The node daemon's HTTP API (aiohttp), described by :data:`OPENAPI`.

Read routes are open to whoever can reach the address, which is 127.0.0.1
by default; routes that change anything need ``Authorization: Bearer TOKEN``
(the token is in ``DATA_DIR/api.token``, mode 0600, or ``api_token_file``).
Errors are JSON ``{"error": "..."}`` naming what was wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runner.api import ERROR_RESPONSE

if TYPE_CHECKING:
    from swarm.node import Node

_NODE: web.AppKey[Node] = web.AppKey("node")

_OBJ = {"type": "object"}
_ARR = {"type": "array", "items": {"type": "object"}}
_ERR = ERROR_RESPONSE


def _get(summary: str, schema: dict[str, Any], *, param: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": schema}}},
            "404": _ERR,
        },
    }
    if param:
        op["parameters"] = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    return {"get": op}


def _post(summary: str, *, param: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": _OBJ}}},
            "401": _ERR,
            "404": _ERR,
        },
    }
    if param:
        op["parameters"] = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    return {"post": op}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "swarm-grid node",
        "version": "1",
        "description": "Status and control of one swarm node daemon.",
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/status": _get("the node: addresses, session, repositories", _OBJ),
        "/v1/peers": _get("peers connected in any torrent, with bytes exchanged", _ARR),
        "/v1/repositories": _get("followed repositories and their current revision", _ARR),
        "/v1/repositories/{name}": _get("one repository", _OBJ, param=True),
        "/v1/repositories/{name}/revisions": _get(
            "signed revisions and tags of a repository", _ARR, param=True
        ),
        "/v1/repositories/{name}/refresh": _post(
            "check for a new revision now and switch to it", param=True
        ),
        "/v1/images": _get("VM images: accepted (in the mount) and refused with the reason", _ARR),
        "/v1/transfers": _get("torrents with progress, rates, peers, hash failures", _ARR),
        "/v1/cache": _get("object cache use per repository", _OBJ),
        "/v1/shutdown": _post("stop the daemon (unmounts, saves resume data)"),
    },
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def require_token(request: web.Request) -> None:
    """Raise 401 unless the request carries the node's bearer token."""
    node = request.app[_NODE]
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth.startswith("Bearer ") else None
    if not node.check_token(token):
        raise web.HTTPUnauthorized(
            text='{"error": "this route needs Authorization: Bearer <token from api.token>"}',
            content_type="application/json",
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _repo(request: web.Request) -> str:
    name = request.match_info["name"]
    if name not in request.app[_NODE].repos:
        raise web.HTTPNotFound(
            text=f'{{"error": "repository {name!r} is not followed by this node"}}',
            content_type="application/json",
        )
    return name


def make_api_app(node: Node) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[_NODE] = node
    doc = copy.deepcopy(OPENAPI)

    async def openapi(request: web.Request) -> web.Response:
        return _json(doc)

    async def status(request: web.Request) -> web.Response:
        return _json(node.status())

    async def peers(request: web.Request) -> web.Response:
        return _json(node.peers())

    async def repositories(request: web.Request) -> web.Response:
        return _json([node.repo_status(n) for n in node.repos])

    async def repository(request: web.Request) -> web.Response:
        return _json(node.repo_status(_repo(request)))

    async def revisions(request: web.Request) -> web.Response:
        return _json(node.revisions(_repo(request)))

    async def refresh(request: web.Request) -> web.Response:
        require_token(request)
        return _json(await node.refresh(_repo(request)))

    async def images(request: web.Request) -> web.Response:
        return _json(node.images())

    async def transfers(request: web.Request) -> web.Response:
        return _json(node.transfers())

    async def cache(request: web.Request) -> web.Response:
        return _json(node.cache())

    async def shutdown(request: web.Request) -> web.Response:
        require_token(request)
        node.request_stop()
        return _json({"stopping": True})

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/peers", peers)
    app.router.add_get("/v1/repositories", repositories)
    app.router.add_get("/v1/repositories/{name}", repository)
    app.router.add_get("/v1/repositories/{name}/revisions", revisions)
    app.router.add_post("/v1/repositories/{name}/refresh", refresh)
    app.router.add_get("/v1/images", images)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_get("/v1/cache", cache)
    app.router.add_post("/v1/shutdown", shutdown)
    if node.job_service is not None:
        from runner.api import JOB_OPENAPI_PATHS, add_job_routes

        add_job_routes(app, node.job_service, require_token)
        doc["paths"].update(copy.deepcopy(JOB_OPENAPI_PATHS))
    return app
