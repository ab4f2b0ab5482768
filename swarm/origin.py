"""The HTTP origin: a store's repositories served as plain files (aiohttp).

``GET /NAME/metadata/...``, ``GET /NAME/data/ab/ab...`` and
``GET /NAME/images/IMAGE/VERSION/FILE`` (VM images, the web seed of their
torrents) map to files under ``STORE/NAME/``; nothing else is served (the
publisher's private state is not).  Range requests, conditional requests
and sendfile come from aiohttp's ``FileResponse``.  Content-addressed
objects, versioned metadata and image versions are immutable and cacheable
forever; ``timestamp.json`` must be revalidated, so a
site proxy (squid) in front never freezes a node on an old revision.  The same
store works behind any web server, e.g. nginx with ``root STORE``.
``GET /metrics`` counts requests, bytes sent and answer times (Prometheus text,
swarm.metrics).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from swarm.metrics import add_origin_metrics, served_file
from trust.names import is_repo_name

_OBJECT = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}")
_METADATA = re.compile(r"(?:[0-9]+\.)?(?:root|targets|snapshot|timestamp)\.json")
_IMAGE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}/){2}[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
log = logging.getLogger(__name__)
_IMMUTABLE = "public, max-age=31536000, immutable"


def make_app(store: Path) -> web.Application:
    """An aiohttp application serving ``store``."""
    root = store.resolve()

    async def handle(request: web.Request) -> web.StreamResponse:
        repo = request.match_info["repo"]
        kind = request.match_info["kind"]
        rest = request.match_info["rest"]
        if not is_repo_name(repo):
            raise web.HTTPNotFound()
        if kind == "data" and _OBJECT.fullmatch(rest):
            cache = _IMMUTABLE
        elif kind == "metadata" and _METADATA.fullmatch(rest):
            cache = _IMMUTABLE if rest[0].isdigit() else "no-cache"
        elif kind == "images" and _IMAGE.fullmatch(rest) and ".." not in rest:
            cache = _IMMUTABLE  # a published image version never changes
        else:
            raise web.HTTPNotFound()
        path = root / repo / kind / rest
        if not path.is_file():
            raise web.HTTPNotFound()
        return served_file(request, path, headers={"Cache-Control": cache})

    async def index(request: web.Request) -> web.Response:
        repos = sorted(p.name for p in root.iterdir() if (p / "metadata").is_dir())
        return web.json_response({"repositories": repos})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/{repo}/{kind}/{rest:.+}", handle)
    add_origin_metrics(app)  # GET /metrics, and every answer counted (swarm.metrics)
    return app


def serve(store: Path, host: str, port: int, *, ready: Callable[[], object] | None = None) -> None:
    """Serve until interrupted (blocks); call ``ready`` once the port listens."""

    def listening(_banner: str) -> None:
        # run_app "prints" its banner right after every site has started,
        # the one moment the port accepts connections: readiness, not output.
        log.info("origin serving %s on http://%s:%d/", store, host, port)
        if ready is not None:
            ready()

    web.run_app(make_app(store), host=host, port=port, print=listening, access_log=None)
