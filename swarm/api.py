"""The node daemon's HTTP API (aiohttp), described by :data:`OPENAPI`.

Read routes are open to whoever can reach the address, which is 127.0.0.1
by default; routes that change anything need ``Authorization: Bearer TOKEN``
(the token is in ``DATA_DIR/api.token``, mode 0600, or ``api_token_file``).
Errors are JSON ``{"error": "..."}`` naming what was wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from runner.api import ERROR_RESPONSE
from swarm.dashboard import add_dashboard_routes
from swarm.metrics import FetchMeters, add_node_metrics
from swarm.status import (
    CacheStats,
    ImageReport,
    NodeStatus,
    PeerReport,
    RepositoryStatus,
    RevisionReport,
    Stopping,
    TransferReport,
    schema_of,
    to_json,
)


class NodeView(Protocol):
    """What the API reads and asks of the node (swarm.node.Node)."""

    @property
    def job_service(self) -> Any: ...

    @property
    def meters(self) -> FetchMeters: ...

    def check_token(self, presented: str | None) -> bool: ...

    def follows(self, name: str) -> bool: ...

    def repo_names(self) -> list[str]: ...

    def status(self) -> NodeStatus: ...

    def peers(self) -> list[PeerReport]: ...

    def repo_status(self, name: str) -> RepositoryStatus: ...

    def revisions(self, name: str) -> list[RevisionReport]: ...

    async def refresh(self, name: str) -> RepositoryStatus: ...

    def images(self) -> list[ImageReport]: ...

    def transfers(self) -> list[TransferReport]: ...

    def cache(self) -> dict[str, CacheStats]: ...

    def request_stop(self) -> None: ...


_NODE: web.AppKey[NodeView] = web.AppKey("node")
_ERR = ERROR_RESPONSE


def _ok(report: Any) -> dict[str, Any]:
    schema = schema_of(report)
    return {"description": "ok", "content": {"application/json": {"schema": schema}}}


def _get(summary: str, report: Any, *, param: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _ok(report), "404": _ERR}}
    if param:
        op["parameters"] = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    return {"get": op}


def _post(summary: str, report: Any, *, param: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {"200": _ok(report), "401": _ERR, "404": _ERR},
    }
    if param:
        op["parameters"] = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    return {"post": op}


# Every response schema is generated from the report type the route sends.
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "swarm-grid node",
        "version": "1",
        "description": "Status and control of one swarm node daemon.",
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/status": _get("the node: addresses, session, repositories", NodeStatus),
        "/v1/peers": _get("peers connected in any torrent, with bytes exchanged", list[PeerReport]),
        "/v1/repositories": _get(
            "followed repositories and their current revision", list[RepositoryStatus]
        ),
        "/v1/repositories/{name}": _get("one repository", RepositoryStatus, param=True),
        "/v1/repositories/{name}/revisions": _get(
            "signed revisions and tags of a repository", list[RevisionReport], param=True
        ),
        "/v1/repositories/{name}/refresh": _post(
            "check for a new revision now and switch to it", RepositoryStatus, param=True
        ),
        "/v1/images": _get(
            "VM images: accepted (in the mount) and refused with the reason", list[ImageReport]
        ),
        "/v1/transfers": _get(
            "torrents with progress, rates, peers, hash failures", list[TransferReport]
        ),
        "/v1/cache": _get("object cache use per repository", dict[str, CacheStats]),
        "/v1/shutdown": _post("stop the daemon (unmounts, saves resume data)", Stopping),
    },
}


def _json(report: Any, status: int = 200) -> web.Response:
    return web.json_response(to_json(report), status=status)


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
    if not request.app[_NODE].follows(name):
        raise web.HTTPNotFound(
            text=f'{{"error": "repository {name!r} is not followed by this node"}}',
            content_type="application/json",
        )
    return name


def make_api_app(node: NodeView) -> web.Application:
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
        return _json([node.repo_status(n) for n in node.repo_names()])

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
        return _json(Stopping(True))

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
    add_node_metrics(app, node)  # GET /metrics, Prometheus text (swarm.metrics)
    add_dashboard_routes(app, node.job_service, doc)
    if node.job_service is not None:
        from runner.api import JOB_OPENAPI_PATHS, add_job_routes

        add_job_routes(app, node.job_service, require_token)
        doc["paths"].update(copy.deepcopy(JOB_OPENAPI_PATHS))
    site = getattr(node, "site", None)  # the node's broker connection; None: no [site]
    if site is not None:
        from sitejob.api import SITE_JOB_OPENAPI_PATHS, add_site_job_routes
        from sitejob.control import SiteControl

        add_site_job_routes(app, SiteControl(lambda: site.js), require_token)
        doc["paths"].update(copy.deepcopy(SITE_JOB_OPENAPI_PATHS))
    vms = getattr(node, "vms", None)  # the node's VMs; None: [vm] enabled = false
    if vms is not None:
        from vm.api import VM_OPENAPI_PATHS, add_vm_routes

        add_vm_routes(app, vms, require_token)
        doc["paths"].update(copy.deepcopy(VM_OPENAPI_PATHS))
    return app
