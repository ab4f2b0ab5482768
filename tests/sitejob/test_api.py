"""The node API's site-job routes (swarm/api.py + sitejob/api.py) over aiohttp's
test server, with a real nats-server behind them. The node is a small stand-in
(token check, ``site.js``): the routes and the control plane are under test."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sitejob.api import SITE_JOB_OPENAPI_PATHS, add_site_job_routes
from sitejob.config import SiteConfig, connect
from sitejob.control import SiteControl
from swarm.api import NodeView, make_api_app
from tests.sitejob.broker_client import Broker
from tests.sitejob.test_control import spec_text

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]


class Site:
    """What a node's ``site`` offers the API: the JetStream context or None."""

    def __init__(self) -> None:
        self.js: Any = None


class StandInNode:
    job_service = None

    def __init__(self, site: Site | None) -> None:
        self.site = site

    def check_token(self, presented: str | None) -> bool:
        return presented == TOKEN


def run(
    site: Site | None, cfg: SiteConfig | None, scenario: Callable[[Client], Awaitable[None]]
) -> None:
    async def main() -> None:
        nc = None
        if cfg is not None and site is not None:
            nc = await connect(cfg, reconnect=False)
            site.js = nc.jetstream(timeout=cfg.request_timeout)
        try:
            app = make_api_app(cast(NodeView, StandInNode(site)))
            async with TestClient(TestServer(app)) as client:
                await scenario(client)
        finally:
            if nc is not None:
                await nc.close()

    asyncio.run(main())


@pytest.mark.nats
def test_submit_list_and_status(broker: Broker) -> None:
    _server, cfg = broker

    async def scenario(client: Client) -> None:
        r = await client.post("/v1/site-jobs", data=spec_text("mc", max_events=95))
        assert r.status == 401 and "token" in (await r.json())["error"]
        r = await client.post(
            "/v1/site-jobs?events=40&ack_wait=2&max_attempts=4", data=spec_text("mc"), headers=AUTH
        )
        assert r.status == 201, await r.text()
        job = await r.json()
        assert job["ranges"] == 4 and job["events"] == 40
        assert r.headers["Location"] == job["url"] == f"/v1/site-jobs/{job['id']}"
        r = await client.get("/v1/site-jobs")
        assert r.status == 200 and [j["id"] for j in await r.json()] == [job["id"]]
        r = await client.get(job["url"])
        st = await r.json()
        assert r.status == 200, st
        assert st["ranges"]["ready"] == 4 and st["events_planned"] == 40
        assert st["ack_wait"] == 2 and st["max_attempts"] == 4 and st["complete"] is False
        for path in ("/v1/site-jobs/20250101-000000-000-abcdef", "/v1/site-jobs/..%2F..%2Fetc"):
            r = await client.get(path)
            assert r.status == 404 and "no site job" in (await r.json())["error"]

    run(Site(), cfg, scenario)


@pytest.mark.nats
@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("", b"", "it is empty"),
        ("", b"\xff\xfe", "UTF-8"),
        ("", b"name = \n", "not valid TOML"),
        ("", b'name = "x"\n', "field 'command'"),
        ("?events=0", spec_text().encode(), "events: expected a whole number"),
        ("?events=many", spec_text().encode(), "events: expected a whole number"),
        ("?ack_wait=nan", spec_text().encode(), "ack_wait: expected"),
        ("?max_attempts=1000", spec_text().encode(), "max_attempts: expected"),
        ("?colour=red", spec_text().encode(), "unknown query parameter 'colour'"),
    ],
)
def test_a_bad_submit_is_400_naming_the_problem_and_writes_nothing(
    broker: Broker, query: str, body: bytes, message: str
) -> None:
    _server, cfg = broker

    async def scenario(client: Client) -> None:
        r = await client.post(f"/v1/site-jobs{query}", data=body, headers=AUTH)
        assert r.status == 400
        assert message in (await r.json())["error"]
        r = await client.get("/v1/site-jobs")
        assert await r.json() == []

    run(Site(), cfg, scenario)


def test_without_a_broker_connection_the_routes_answer_503() -> None:
    async def scenario(client: Client) -> None:
        for r in (
            await client.get("/v1/site-jobs"),
            await client.get("/v1/site-jobs/20250101-000000-000-abcdef"),
            await client.post("/v1/site-jobs", data=spec_text(), headers=AUTH),
        ):
            assert r.status == 503
            assert "not connected to the site broker" in (await r.json())["error"]
        r = await client.post("/v1/site-jobs", data=b'name = "x"\n', headers=AUTH)
        assert r.status == 400  # a bad spec is a bad spec, connected or not

    run(Site(), None, scenario)


def test_the_routes_and_their_openapi_paths_exist_only_with_a_site() -> None:
    async def with_site(client: Client) -> None:
        doc = await (await client.get("/openapi.json")).json()
        assert {"/v1/site-jobs", "/v1/site-jobs/{id}"} <= set(doc["paths"])
        assert doc["paths"]["/v1/site-jobs"]["post"]["security"] == [{"bearer": []}]

    async def without(client: Client) -> None:
        doc = await (await client.get("/openapi.json")).json()
        assert not any(p.startswith("/v1/site-jobs") for p in doc["paths"])
        assert (await client.get("/v1/site-jobs")).status == 404

    run(Site(), None, with_site)
    run(None, None, without)


def test_openapi_fragment_describes_exactly_the_routes() -> None:
    app = web.Application()
    add_site_job_routes(app, SiteControl(lambda: None), lambda request: None)
    routes = {
        (r.resource.canonical, r.method.lower())
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(path, m) for path, ops in SITE_JOB_OPENAPI_PATHS.items() for m in ops}
    assert routes == documented
    for path, ops in SITE_JOB_OPENAPI_PATHS.items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"]
            assert ("security" in op) == (method == "post") == ("401" in op["responses"])
            params = re.findall(r"\{(\w+)\}", path)
            assert [p["name"] for p in op.get("parameters", []) if p["in"] == "path"] == params
