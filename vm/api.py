"""VM routes of the node daemon's HTTP API (aiohttp), and their OpenAPI paths.

The daemon owns the application and the token check; this module only adds
routes over a :class:`vm.manager.VmService`::

    GET  /v1/vms              every VM of the node, with its state and outcome
    GET  /v1/vms/{id}         one VM (404 if unknown)
    POST /v1/vms              body: {"image": "REPO/NAME/VERSION", "cores": N,
                              "memory": "128M", "lifetime": S, "user_data": "..."};
                              201 with the VM once qemu runs (token)
    POST /v1/vms/{id}/stop    body (optional): {"grace": S}; the VM once qemu is
                              gone, with its outcome (token)
    POST /v1/vms/{id}/migration a migration's source, first step: the destination's
                              body (the VM, its user_data, "source_key": the source's
                              public key for this migration); 409 if qemu blocks the
                              migration now (a mounted 9p export) (token)
    POST /v1/vms/incoming     a migration's destination: body: that, with "source";
                              201 {"vm", "host", "nbd_port", "migrate_port", "key"}
                              ("key": the destination's public key) (token)
    POST /v1/vms/{id}/migrate a migration's source: body {"host", "nbd_port",
                              "migrate_port", "to", "key"}; the VM once it runs there,
                              over TLS with the key both sides derived (token)

No request or answer carries a secret key: each side derives the migration's
keys from the two public keys (:mod:`vm.handshake`).

Errors are ``{"error": "..."}``: 400 a bad field (named), 404 an unknown VM,
409 the node refuses the VM (the site policy's reason, an unknown image, no
free cores, a backed-off VM type; nothing was started), 502 qemu could not
start (the VM is recorded as failed, with why).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from runner.api import ERROR_RESPONSE
from swarm.status import VmReport, schema_of, to_json
from vm.config import MAX_GRACE, parse_incoming, parse_request
from vm.exceptions import (
    MigrationError,
    QemuError,
    UnknownVm,
    VmConfigError,
    VmError,
    VmRefused,
)
from vm.handshake import parse_public_key
from vm.manager import VmService

_SERVICE: web.AppKey[VmService] = web.AppKey("vm.service", VmService)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# The one mapping of the VM service's errors to HTTP statuses (first match wins).
_STATUSES: tuple[tuple[type[VmError], int], ...] = (
    (VmConfigError, 400),
    (UnknownVm, 404),
    (VmRefused, 409),
    (QemuError, 502),
    (MigrationError, 502),
)


def _vm_error(exc: VmError) -> web.Response:
    status = next((code for cls, code in _STATUSES if isinstance(exc, cls)), 500)
    return _error(status, str(exc))


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise VmConfigError(f"the request body is not JSON: {exc}") from None


def _grace(doc: Any) -> float | None:
    if not isinstance(doc, dict) or set(doc) - {"grace"}:
        raise VmConfigError('the body must be {} or {"grace": SECONDS}')
    grace = doc.get("grace")
    if grace is None:
        return None
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= MAX_GRACE:
        raise VmConfigError(f"grace: expected seconds from 0 to {MAX_GRACE:g}, got {grace!r}")
    return float(grace)


def _migration_target(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or set(doc) != {"host", "nbd_port", "migrate_port", "to", "key"}:
        raise VmConfigError("the body must be {host, nbd_port, migrate_port, to, key}")
    host, to = doc["host"], doc["to"]
    if not isinstance(host, str) or not host or len(host) > 255 or any(c in host for c in ",: /"):
        raise VmConfigError(f"host: expected an address, got {host!r}")
    for key in ("nbd_port", "migrate_port"):
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
            raise VmConfigError(f"{key}: expected a port, got {v!r}")
    if not isinstance(to, str) or not to or len(to) > 200:
        raise VmConfigError("to: expected the destination's name")
    return {
        "host": host,
        "nbd_port": doc["nbd_port"],
        "migrate_port": doc["migrate_port"],
        "to": to,
        "key": parse_public_key("key", doc["key"]),
    }


def add_vm_routes(
    app: web.Application,
    service: VmService,
    require_token: Callable[[web.Request], None],
) -> None:
    """Register the VM routes on ``app``; ``require_token(request)`` raises
    unless the request may change things."""
    app[_SERVICE] = service

    async def list_vms(request: web.Request) -> web.Response:
        return web.json_response(to_json(service.list()))

    async def get_vm(request: web.Request) -> web.Response:
        try:
            return web.json_response(to_json(service.get(request.match_info["id"])))
        except VmError as exc:
            return _vm_error(exc)

    async def start(request: web.Request) -> web.Response:
        require_token(request)
        try:
            vm = await service.start_vm(parse_request(await _body(request)))
        except VmError as exc:
            return _vm_error(exc)
        return web.json_response(to_json(vm), status=201, headers={"Location": f"/v1/vms/{vm.id}"})

    async def stop(request: web.Request) -> web.Response:
        require_token(request)
        try:
            grace = _grace(await _body(request))
            return web.json_response(
                to_json(await service.stop_vm(request.match_info["id"], grace))
            )
        except VmError as exc:
            return _vm_error(exc)

    async def incoming(request: web.Request) -> web.Response:
        require_token(request)
        try:
            req = parse_incoming(await _body(request))
            waiting = await service.incoming(req, host=service.migration_host)
        except VmError as exc:
            return _vm_error(exc)
        answer = {
            "vm": to_json(waiting.vm),
            "host": service.migration_host,
            "nbd_port": waiting.nbd_port,
            "migrate_port": waiting.migrate_port,
            "key": waiting.key,
        }
        return web.json_response(answer, status=201)

    async def prepare(request: web.Request) -> web.Response:
        require_token(request)
        try:
            req = await service.prepare_migration(request.match_info["id"])
        except VmError as exc:
            return _vm_error(exc)
        return web.json_response(req.to_json())

    async def migrate(request: web.Request) -> web.Response:
        require_token(request)
        try:
            target = _migration_target(await _body(request))
            vm = await service.migrate_vm(request.match_info["id"], **target)
        except VmError as exc:
            return _vm_error(exc)
        return web.json_response(to_json(vm))

    app.router.add_post("/v1/vms/incoming", incoming)
    app.router.add_post("/v1/vms/{id}/migration", prepare)
    app.router.add_post("/v1/vms/{id}/migrate", migrate)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", start)
    app.router.add_get("/v1/vms/{id}", get_vm)
    app.router.add_post("/v1/vms/{id}/stop", stop)


def _ok(tp: Any, status: str = "200") -> dict[str, Any]:
    return {
        status: {"description": "ok", "content": {"application/json": {"schema": schema_of(tp)}}}
    }


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_JSON_BODY = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object"}}},
}
VM_OPENAPI_PATHS: dict[str, Any] = {
    "/v1/vms": {
        "get": {
            "summary": "the node's VMs: state, accelerator, outcome",
            "responses": _ok(list[VmReport]),
        },
        "post": {
            "summary": "start a VM from a signed image in the node's mount",
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {"type": "string", "description": "REPO/NAME/VERSION"},
                                "cores": {"type": "integer"},
                                "memory": {"type": "string", "description": "a size: 128M"},
                                "lifetime": {"type": "number", "description": "seconds"},
                                "user_data": {"type": "string", "description": "a script"},
                            },
                        }
                    }
                },
            },
            "responses": {
                **_ok(VmReport, "201"),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
                "409": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
            },
        },
    },
    "/v1/vms/{id}": {
        "get": {
            "summary": "one VM",
            "parameters": _ID,
            "responses": {**_ok(VmReport), "404": ERROR_RESPONSE},
        }
    },
    "/v1/vms/incoming": {
        "post": {
            "summary": "a migration's destination: qemu waiting for the VM's disk and memory",
            "security": [{"bearer": []}],
            "requestBody": _JSON_BODY,
            "responses": {
                "201": {"description": "waiting: {vm, host, nbd_port, migrate_port, key}"},
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
                "409": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
            },
        }
    },
    "/v1/vms/{id}/migration": {
        "post": {
            "summary": "a migration's source, first step: the destination's request"
            " (the VM, its user_data, the source's X25519 public key for this migration);"
            " 409 if qemu blocks the migration now",
            "security": [{"bearer": []}],
            "parameters": _ID,
            "responses": {
                "200": {"description": "the body of POST /v1/vms/incoming, source empty"},
                "401": ERROR_RESPONSE,
                "404": ERROR_RESPONSE,
                "409": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
            },
        }
    },
    "/v1/vms/{id}/migrate": {
        "post": {
            "summary": "a migration's source: mirror the overlay, send the memory, end here",
            "security": [{"bearer": []}],
            "parameters": _ID,
            "requestBody": _JSON_BODY,
            "responses": {
                **_ok(VmReport),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
                "404": ERROR_RESPONSE,
                "409": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
            },
        }
    },
    "/v1/vms/{id}/stop": {
        "post": {
            "summary": "stop a VM: STOP and the ACPI power button, the grace, quit, kill",
            "security": [{"bearer": []}],
            "parameters": _ID,
            "requestBody": _JSON_BODY,
            "responses": {
                **_ok(VmReport),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
                "404": ERROR_RESPONSE,
            },
        }
    },
}
