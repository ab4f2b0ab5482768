"""The job routes over aiohttp's test server (each test runs its own event loop)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from runner.api import JOB_OPENAPI_PATHS, add_job_routes
from runner.confine import Confinement
from runner.service import JobService
from swarm_testing.waiting import eventually_async
from tests.runner.test_service import fixed_lease, spec_text

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def require_token(request: web.Request) -> None:
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        raise web.HTTPUnauthorized(
            text='{"error": "this route needs the token"}', content_type="application/json"
        )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[JobService]:
    s = JobService(
        tmp_path / "queue", tmp_path / "work", fixed_lease(), confinement=Confinement(), recheck=0.2
    )
    try:
        yield s
    finally:
        s.close()


Scenario = Callable[[TestClient[web.Request, web.Application]], Awaitable[None]]


def run(service: JobService, scenario: Scenario) -> None:
    async def main() -> None:
        app = web.Application()
        add_job_routes(app, service, require_token)
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def test_submit_list_and_get(service: JobService) -> None:
    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        r = await client.post("/v1/jobs", data=spec_text("mc"), headers=AUTH)
        assert r.status == 201, await r.text()
        job = await r.json()
        assert job["state"] == "queued" and job["name"] == "mc"
        assert r.headers["Location"] == job["url"] == f"/v1/jobs/{job['id']}"
        r = await client.get("/v1/jobs")
        listed = await r.json()
        assert r.status == 200 and [j["id"] for j in listed] == [job["id"]]
        r = await client.get(job["url"])
        assert r.status == 200 and (await r.json())["name"] == "mc"

    run(service, scenario)
    assert [p.name for p in service.queue.glob("*.toml")] != []


def test_submit_needs_the_token(service: JobService) -> None:
    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        r = await client.post("/v1/jobs", data=spec_text("mc"))
        assert r.status == 401 and "token" in (await r.json())["error"]
        r = await client.post("/v1/jobs", data=spec_text("mc"), headers={"Authorization": "x"})
        assert r.status == 401
        r = await client.post("/v1/jobs/stop")
        assert r.status == 401

    run(service, scenario)
    assert service.jobs() == [] and not service.status()["stopping"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "it is empty"),
        (b"\xff\xfe", "UTF-8"),
        (b"name = \n", "not valid TOML"),
        (b'name = "x"\ncpu_work_per_event = 1.0\nmax_events = 5\n', "field 'command'"),
        (spec_text("x", max_events=0).encode(), "field 'max_events': must be >= 1"),
        (spec_text("x").encode() + b"colour = 1\n", "field 'colour': is not a known field"),
    ],
)
def test_bad_specs_are_400_naming_the_problem(
    service: JobService, body: bytes, message: str
) -> None:
    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        r = await client.post("/v1/jobs", data=body, headers=AUTH)
        assert r.status == 400
        assert message in (await r.json())["error"]

    run(service, scenario)
    assert service.jobs() == []


def test_unknown_job_is_404(service: JobService) -> None:
    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        for path in ("/v1/jobs/20250101-000000.000-abcdef", "/v1/jobs/..%2F..%2Fetc"):
            r = await client.get(path)
            assert r.status == 404 and "error" in await r.json()

    run(service, scenario)


def test_job_runs_and_stop_route(service: JobService) -> None:
    service.start()

    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        r = await client.post("/v1/jobs", data=spec_text("mc", max_events=10), headers=AUTH)
        url = (await r.json())["url"]
        job: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal job
            job = await (await client.get(url)).json()
            return bool(job["state"] == "done")

        await eventually_async("the job to be done", done, 30)
        assert job["report"]["events_done"] == 10
        r = await client.post("/v1/jobs/stop?grace=soon", headers=AUTH)
        assert r.status == 400 and "grace" in (await r.json())["error"]
        r = await client.post("/v1/jobs/stop?grace=0", headers=AUTH)
        assert r.status == 202 and (await r.json())["stopping"]

    run(service, scenario)
    assert service.status()["stopping"]


def test_openapi_fragment_describes_exactly_the_routes(service: JobService) -> None:
    app = web.Application()
    add_job_routes(app, service, require_token)
    routes = {
        (re.sub(r"\{(\w+)\}", r"{\1}", r.resource.canonical), r.method.lower())
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(path, m) for path, ops in JOB_OPENAPI_PATHS.items() for m in ops}
    assert routes == documented
    for path, ops in JOB_OPENAPI_PATHS.items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"]
            secured = "security" in op
            assert secured == (method == "post"), (path, method)
            if secured:
                assert "401" in op["responses"]
            params = re.findall(r"\{(\w+)\}", path)
            assert [p["name"] for p in op.get("parameters", []) if p["in"] == "path"] == params


@pytest.mark.parametrize("grace", ["soon", "nan", "inf", "-1", "1e300"])
def test_stop_refuses_a_grace_it_could_not_keep(service: JobService, grace: str) -> None:
    async def scenario(client: TestClient[web.Request, web.Application]) -> None:
        r = await client.post(f"/v1/jobs/stop?grace={grace}", headers=AUTH)
        assert r.status == 400
        assert (await r.json())["error"].startswith("grace must be seconds from 0 to 3600")

    run(service, scenario)
    assert not service.status()["stopping"]
