"""What the site-job tests share to use their broker (``conftest.py``'s ``broker``).

``Broker`` is the fixture's type; :func:`jetstream` is a JetStream session
that is closed whatever happens; :func:`submit` creates a job and publishes
every one of its ranges (generation 0), as ``swarm site-job submit`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sitejob.config import SiteConfig, connect
from sitejob.natsd import NatsServer
from sitejob.protocol import JobRecord
from sitejob.store import create_job, publish_ranges

Broker = tuple[NatsServer, SiteConfig]  # tests/sitejob/conftest.py's fixture


@contextlib.asynccontextmanager
async def jetstream(cfg: SiteConfig) -> AsyncIterator[Any]:
    """A JetStream context of a client that does not reconnect, closed after the block."""
    nc = await connect(cfg, reconnect=False)
    try:
        yield nc.jetstream(timeout=cfg.request_timeout)
    finally:
        await nc.close()


async def submit(js: Any, rec: JobRecord) -> None:
    """Create job ``rec`` and publish all its ranges."""
    await create_job(js, rec)
    await publish_ranges(js, rec, [(t, 0) for t in range(rec.tasks)])
