"""Job routes of the node daemon's HTTP API (aiohttp), and their OpenAPI paths.

The daemon owns the application and the token check; this module only adds
routes over a :class:`runner.service.JobService`:

    GET  /v1/jobs            every job, in submission order
    GET  /v1/jobs/{id}       one job (404 if unknown)
    POST /v1/jobs            body: a TOML job spec; 201 with the id (token)
    POST /v1/jobs/stop       stop dispatch; ?grace=SECONDS (token)

Responses are JSON; errors are ``{"error": "..."}`` naming what was wrong
(400 for a bad spec names the field). The service does disk I/O, so every
call into it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from runner.exceptions import JobSpecError, UnknownJob
from runner.service import JobService
from runner.stop import MAX_GRACE, grace_problem

_SERVICE: web.AppKey[JobService] = web.AppKey("runner.job_service", JobService)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def spec_body_text(body: bytes) -> str | web.Response:
    """A request body as the text of a TOML job spec, or the 400 answer that
    says why it is not one (not UTF-8, empty)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _error(400, "the job spec must be UTF-8 TOML text")
    if not text.strip():
        return _error(400, "the request body must be a TOML job spec; it is empty")
    return text


def add_job_routes(
    app: web.Application,
    service: JobService,
    require_token: Callable[[web.Request], None],
) -> None:
    """Register the job routes on ``app``; ``require_token(request)`` raises
    (e.g. ``web.HTTPUnauthorized``) unless the request may change things."""
    app[_SERVICE] = service

    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(service.jobs))

    async def get_job(request: web.Request) -> web.Response:
        try:
            job = await asyncio.to_thread(service.job, request.match_info["id"])
        except UnknownJob as exc:
            return _error(404, str(exc))
        return web.json_response(job)

    async def submit(request: web.Request) -> web.Response:
        require_token(request)
        text = spec_body_text(await request.read())
        if isinstance(text, web.Response):
            return text
        try:
            job_id = await asyncio.to_thread(service.submit, text)
        except JobSpecError as exc:
            return _error(400, str(exc))
        job = await asyncio.to_thread(service.job, job_id)
        return web.json_response(
            {**job, "url": f"/v1/jobs/{job_id}"},
            status=201,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )

    async def stop(request: web.Request) -> web.Response:
        require_token(request)
        grace: float | None = None
        if "grace" in request.query:
            try:
                grace = float(request.query["grace"])
            except ValueError:
                grace = math.nan
            if grace_problem(grace) is not None:
                shown = request.query["grace"][:40]
                return _error(400, f"grace must be seconds from 0 to {MAX_GRACE:g}, got {shown!r}")
        service.stop(grace, wait=False)
        return web.json_response({"stopping": True, **service.status()}, status=202)

    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_post("/v1/jobs/stop", stop)
    app.router.add_get("/v1/jobs/{id}", get_job)


SPEC_BODY = {  # an OpenAPI request body: a job spec in TOML
    "required": True,
    "content": {
        "application/toml": {"schema": {"type": "string"}},
        "text/plain": {"schema": {"type": "string"}},
    },
}

ERROR_RESPONSE = {  # an OpenAPI response: JSON {"error": "..."}
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}

_JOB: dict[str, Any] = {
    "type": "object",
    "required": ["id", "state", "name"],
    "properties": {
        "id": {"type": "string", "description": "sorts in submission order"},
        "state": {"type": "string", "enum": ["queued", "running", "done", "rejected"]},
        "name": {"type": "string", "nullable": True, "description": "the spec's name"},
        "kind": {
            "type": "string",
            "enum": ["elastic", "vm"],
            "description": "vm: a spec with a [vm] table, started as a VM (docs/RUNNER.md)",
        },
        "vm": {"type": "string", "nullable": True, "description": "running VM job: its VM id"},
        "tasks_committed": {
            "type": "integer",
            "description": "queued or running: tasks already in the journal (a cut job resumes)",
        },
        "refused": {
            "type": "string",
            "description": "queued: why it did not fit the lease at the last try",
        },
        "report": {
            "type": "object",
            "description": "done: the run report (events_planned, events_done, "
            "wall_seconds, cpu_seconds, complete, failures, ...); a VM job's: vm, "
            "started_at, ended_at and outcome (the VM's code, outcome, outputs, ...)",
        },
        "reason": {"type": "string", "description": "rejected: why"},
    },
}


_SERVICE_STOPPING: dict[str, Any] = {  # JobService.status() with stopping = true
    "type": "object",
    "required": ["stopping", "running", "last_pilot_stopped", "last_error"],
    "properties": {
        "stopping": {"type": "boolean"},
        "running": {"type": "boolean", "description": "the masonry thread is still alive"},
        "last_pilot_stopped": {
            "type": "string",
            "nullable": True,
            "description": "why the last pilot stopped",
        },
        "last_error": {"type": "string", "nullable": True},
        "vms_running": {"type": "integer", "description": "VMs its pilots started, running"},
    },
}


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


JOB_OPENAPI_PATHS: dict[str, Any] = {
    "/v1/jobs": {
        "get": {
            "summary": "every job (queued, running, done, rejected), in submission order",
            "responses": {"200": _json({"type": "array", "items": _JOB})},
        },
        "post": {
            "summary": "submit a job (elastic, or a VM: a [vm] table); the body is its TOML spec",
            "security": [{"bearer": []}],
            "requestBody": SPEC_BODY,
            "responses": {
                "201": _json(_JOB, "queued; Location is the job's URL"),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
            },
        },
    },
    "/v1/jobs/{id}": {
        "get": {
            "summary": "one job",
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": _json(_JOB), "404": ERROR_RESPONSE},
        }
    },
    "/v1/jobs/stop": {
        "post": {
            "summary": "stop dispatching jobs; running tasks finish within grace or are cut "
            "(the job goes back to the queue and resumes from its journal); the VMs the "
            "pilot started are asked to stop within grace",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "grace",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0, "maximum": MAX_GRACE},
                    "description": "seconds for running tasks (default: the service's)",
                }
            ],
            "responses": {
                "202": _json(_SERVICE_STOPPING, "stopping"),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
            },
        }
    },
}
