"""Site-job routes of the node daemon's HTTP API (aiohttp), and their OpenAPI paths.

The daemon owns the application and the token check; this module only adds
routes over a :class:`sitejob.control.SiteControl` (the node's connection to
the site's broker, which may come and go):

    GET  /v1/site-jobs         every site job, in submission order
    GET  /v1/site-jobs/{id}    one job's status (404 if unknown)
    POST /v1/site-jobs         body: a TOML job spec; ?events=&ack_wait=&max_attempts=;
                               201 {id, ranges, events} (token)

Errors are JSON ``{"error": "..."}``: 400 a bad spec or option (names the
field), 401 no token, 404 an unknown job, 502 the broker refused, 503 the
node is not connected to the broker or it did not answer in time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from runner.api import ERROR_RESPONSE, SPEC_BODY, spec_body_text
from runner.exceptions import JobSpecError
from sitejob.control import (
    DEFAULT_ACK_WAIT,
    DEFAULT_MAX_ATTEMPTS,
    MAX_ACK_WAIT,
    MAX_ATTEMPTS,
    MIN_ACK_WAIT,
    RANGE_STATES,
    SiteControl,
)
from sitejob.exceptions import BrokerError, SiteJobError, UnknownSiteJob
from swarm.exceptions import ConfigError

_CONTROL: web.AppKey[SiteControl] = web.AppKey("sitejob.control", SiteControl)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _failure(exc: Exception) -> web.Response:
    """The answer for an error of the control plane (see the module docstring)."""
    if isinstance(exc, UnknownSiteJob):
        return _error(404, str(exc))
    if isinstance(exc, JobSpecError | ConfigError):
        return _error(400, str(exc))
    if isinstance(exc, BrokerError):
        return _error(503, str(exc))
    return _error(502, str(exc))


_ERRORS = (UnknownSiteJob, SiteJobError, JobSpecError, ConfigError, BrokerError)


def add_site_job_routes(
    app: web.Application,
    control: SiteControl,
    require_token: Callable[[web.Request], None],
) -> None:
    """Register the site-job routes on ``app``; ``require_token(request)``
    raises (e.g. ``web.HTTPUnauthorized``) unless the request may change things."""
    app[_CONTROL] = control

    async def list_jobs(request: web.Request) -> web.Response:
        try:
            return web.json_response(await control.list_jobs())
        except _ERRORS as exc:
            return _failure(exc)

    async def get_job(request: web.Request) -> web.Response:
        try:
            return web.json_response(await control.status(request.match_info["id"]))
        except _ERRORS as exc:
            return _failure(exc)

    async def submit(request: web.Request) -> web.Response:
        require_token(request)
        text = spec_body_text(await request.read())
        if isinstance(text, web.Response):
            return text
        q = request.query
        unknown = sorted(set(q) - {"events", "ack_wait", "max_attempts"})
        if unknown:
            return _error(400, f"unknown query parameter {unknown[0][:40]!r}")
        try:
            record = await control.submit(
                text,
                events=q.get("events"),  # text: the plan parses and checks each
                ack_wait=q.get("ack_wait", DEFAULT_ACK_WAIT),
                max_attempts=q.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
            )
        except _ERRORS as exc:
            return _failure(exc)
        url = f"/v1/site-jobs/{record.id}"
        return web.json_response(
            {"id": record.id, "ranges": record.tasks, "events": record.events, "url": url},
            status=201,
            headers={"Location": url},
        )

    app.router.add_get("/v1/site-jobs", list_jobs)
    app.router.add_post("/v1/site-jobs", submit)
    app.router.add_get("/v1/site-jobs/{id}", get_job)


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_INT = {"type": "integer"}
_STATUS: dict[str, Any] = {
    "type": "object",
    "required": ["id", "events_planned", "events_committed", "ranges", "complete"],
    "properties": {
        "id": {"type": "string", "description": "sorts in submission order"},
        "name": {"type": "string", "nullable": True, "description": "the spec's name"},
        "submitted": {"type": "number", "description": "epoch seconds"},
        "events_planned": _INT,
        "events_committed": _INT,
        "first_event": _INT,
        "events_per_task": _INT,
        "ranges_planned": _INT,
        "ack_wait": {"type": "number"},
        "max_attempts": _INT,
        "ranges": {
            "type": "object",
            "description": "ready: in the stream, not delivered; running: delivered, not "
            "acked; finished, retrying, abandoned: the gather's last report",
            "properties": {state: _INT for state in RANGE_STATES},
        },
        "nodes": {"type": "object", "description": "ranges committed per node"},
        "retries": _INT,
        "duplicates": _INT,
        "refused": {"type": "object", "description": "refused messages by reason"},
        "abandoned": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"task": _INT, "reason": {"type": "string"}},
            },
        },
        "complete": {"type": "boolean"},
        "streams": {
            "type": "boolean",
            "description": "false: the job's streams are gone; all from the gather's report",
        },
        "gather": {"type": "object", "nullable": True},
        "status_error": {"type": "string", "description": "the gather's report is unreadable"},
    },
}
_SUMMARY: dict[str, Any] = {
    "type": "object",
    "required": ["id"],
    "properties": {
        k: _STATUS["properties"][k]
        for k in (
            "id",
            "name",
            "submitted",
            "events_planned",
            "events_committed",
            "ranges_planned",
            "complete",
        )
    }
    | {"error": {"type": "string", "description": "the job's record is unreadable"}},
}
_SUBMITTED: dict[str, Any] = {
    "type": "object",
    "required": ["id", "ranges", "events", "url"],
    "properties": {
        "id": {"type": "string"},
        "ranges": _INT,
        "events": _INT,
        "url": {"type": "string"},
    },
}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

SITE_JOB_OPENAPI_PATHS: dict[str, Any] = {
    "/v1/site-jobs": {
        "get": {
            "summary": "every site job, in submission order",
            "responses": {
                "200": _json({"type": "array", "items": _SUMMARY}),
                "502": ERROR_RESPONSE,
                "503": ERROR_RESPONSE,
            },
        },
        "post": {
            "summary": "submit a site job: the body is its TOML spec; its events are cut into "
            "ranges of events_per_task and published to the site's broker",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "events",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "events to run (default: the spec's max_events)",
                },
                {
                    "name": "ack_wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": MIN_ACK_WAIT, "maximum": MAX_ACK_WAIT},
                    "description": "seconds without a heartbeat before a range is redelivered",
                },
                {
                    "name": "max_attempts",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS},
                    "description": "failed runs of one range before it is abandoned",
                },
            ],
            "requestBody": SPEC_BODY,
            "responses": {
                "201": _json(_SUBMITTED, "published; Location is the job's status URL"),
                "400": ERROR_RESPONSE,
                "401": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
                "503": ERROR_RESPONSE,
            },
        },
    },
    "/v1/site-jobs/{id}": {
        "get": {
            "summary": "one site job's status",
            "parameters": [_ID_PARAM],
            "responses": {
                "200": _json(_STATUS),
                "404": ERROR_RESPONSE,
                "502": ERROR_RESPONSE,
                "503": ERROR_RESPONSE,
            },
        }
    },
}
