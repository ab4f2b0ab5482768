"""The node's dashboard: one static page (``swarm/static/dashboard.html``)
served by the daemon's API, plus the one view the JSON routes lack.

The page is plain HTML and JavaScript, served from the package (no build
step, no external URL): it reads the API's open JSON routes every 2 s and
draws them (VMs from the ``vms`` section of ``/v1/status``, when the node
runs VMs).  Invariants:

* Nothing here changes the node.  The page's actions (a repository refresh)
  are the API's own POST routes, which need the bearer token; the page asks
  the person for it and never receives it from the node.
* Every string the page shows comes from the node, its peers or its VMs'
  guests (a peer's client name is the peer's choice, a VM's outcome text the
  guest's ``shutdown_message``), so the page only ever sets text
  (``textContent``), never markup.

``GET /dashboard/lease.json`` is the job service's lease now, as the
masonry chart needs it: ``{"lease": {...,"ends_at": EPOCH}, "problem": null}``,
or ``{"lease": null, "problem": "why"}`` when the node runs no job service
or the lease cannot be established (200 either way: a page polling it must
not fill the browser's console with errors).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from runner.exceptions import RunnerError
from swarm.status import schema_of, to_json

PAGE = "dashboard.html"


@dataclass(frozen=True)
class LeaseNow:
    """The job service's lease (runner.lease.Lease) as the page draws it."""

    cores: int
    power_per_core: float
    time_left: float
    ends_at: float  # epoch seconds: when the lease ends
    memory: int | None
    sources: dict[str, str]
    warnings: list[str]


@dataclass(frozen=True)
class LeaseAnswer:
    lease: LeaseNow | None
    problem: str | None  # why there is no lease


def _page() -> bytes:
    return resources.files("swarm").joinpath("static", PAGE).read_bytes()


async def lease_view(job_service: Any) -> LeaseAnswer:
    """The lease of ``job_service`` now (its ``lease_at``, in a thread: it
    may read files or run the power benchmark once).

    Raises nothing: a missing service or a lease error is the ``problem``.
    """
    if job_service is None:
        return LeaseAnswer(None, "this node runs no job service")
    try:
        lease = await asyncio.to_thread(job_service.lease_at, job_service.clock())
    except RunnerError as exc:
        return LeaseAnswer(None, str(exc))
    return LeaseAnswer(
        LeaseNow(
            cores=lease.cores,
            power_per_core=lease.power_per_core,
            time_left=lease.time_left,
            ends_at=time.time() + lease.time_left,
            memory=lease.memory,
            sources=dict(lease.sources),
            warnings=list(lease.warnings),
        ),
        None,
    )


def add_dashboard_routes(app: web.Application, job_service: Any, doc: dict[str, Any]) -> None:
    """Serve the page at ``/dashboard`` (``/`` redirects there) and the lease
    view; ``doc`` (the OpenAPI document of the JSON routes) gains the latter.

    Raises:
        OSError: the page is missing from the installed package.
    """
    page = _page()  # read once: the page is package data, fixed while the node runs

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            # The page loads nothing from elsewhere and runs only its own script.
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline';"
                " style-src 'unsafe-inline'; img-src 'self' data:",
                "Cache-Control": "no-store",
            },
        )

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def lease(request: web.Request) -> web.Response:
        return web.json_response(to_json(await lease_view(job_service)))

    app.router.add_get("/", root)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/lease.json", lease)
    schema = schema_of(LeaseAnswer)
    doc["paths"]["/dashboard/lease.json"] = {
        "get": {
            "summary": "the job service's lease now, for the dashboard"
            " (lease null and the problem when there is none)",
            "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": schema}}}
            },
        }
    }
