"""The node's site service: its connection to the site's broker, and its worker.

A node daemon whose configuration has a ``[site]`` table owns one
:class:`SiteService` (``Node.site``). It connects to the broker in the
background (:func:`sitejob.config.connect`; an unreachable broker is retried
every few seconds, the status saying why, and the node keeps running: a
node never fails to start because the broker is down), and once connected
runs a :class:`sitejob.worker.SiteWorker` when ``site.work`` is true. After
the first connection the client reconnects by itself, forever.

``js`` is the JetStream context while connected (None otherwise): the
node's API routes use it for site-job submission and status.

Invariants: :meth:`SiteService.stop` stops the worker first (its running
ranges get the runner's grace, then are cut and handed back) and closes the
connection last, so every hand-back and result goes out before it closes;
every wait on the broker has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.confine import Confinement
from runner.cores import CoreLedger
from runner.lease import Lease
from sitejob.config import SiteConfig, connect
from sitejob.exceptions import BrokerError
from sitejob.worker import SiteWorker
from swarm.exceptions import ConfigError
from swarm.status import SiteReport

log = logging.getLogger("sitejob.service")

RETRY_FIRST = 1.0  # seconds before the first retry of an unreachable broker
RETRY_MAX = 15.0  # ... doubling up to this


class SiteService:
    """See the module docstring. ``start`` inside a running loop."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        data_dir: Path,
        cores: CoreLedger,
        lease_at: Callable[[float], Lease],
        confinement: Confinement | None = None,
        grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.cores = cores
        self.lease_at = lease_at
        self.confinement = confinement
        self.grace = grace
        self.clock = clock
        self.worker_options = worker_options or {}
        self.nc: Any = None
        self.worker: SiteWorker | None = None
        self.problem: str | None = "not started"
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def js(self) -> Any:
        """The JetStream context while connected to the broker, else None."""
        if self.nc is None or not self.nc.is_connected:
            return None
        return self.nc.jetstream(timeout=self.cfg.request_timeout)

    @property
    def connected(self) -> bool:
        return self.nc is not None and bool(self.nc.is_connected)

    async def start(self) -> None:
        """Connect and work in the background (returns at once)."""
        self._stopping = asyncio.Event()
        self.problem = "connecting"
        self._task = asyncio.create_task(self._main())

    async def _connect(self) -> None:
        """Connect, retrying with back-off until connected or stopped."""
        assert self._stopping is not None
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                self.nc = await connect(self.cfg)
                self.problem = None
                log.info("site: connected to %s", ", ".join(self.cfg.servers))
                return
            except (BrokerError, ConfigError) as exc:
                if self.problem != str(exc):
                    log.warning("site: %s (retrying)", exc)
                self.problem = str(exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(RETRY_MAX, delay * 2)

    async def _main(self) -> None:
        await self._connect()
        if self.nc is None or not self.cfg.work:
            return
        assert self._stopping is not None
        if self._stopping.is_set():
            return
        self.worker = SiteWorker(
            self.nc,
            self.nc.jetstream(timeout=self.cfg.request_timeout),
            self.cfg,
            data_dir=self.data_dir,
            cores=self.cores,
            lease_at=self.lease_at,
            confinement=self.confinement,
            grace=self.grace,
            clock=self.clock,
            **self.worker_options,
        )
        await self.worker.run()

    async def stop(self, grace: float | None = None) -> None:
        """Stop the worker (running ranges: ``grace``, default the runner's,
        then cut and handed back), then close the connection. Safe twice."""
        if self._stopping is not None:
            self._stopping.set()
        if self.worker is not None:
            await self.worker.stop(grace)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.cfg.request_timeout + 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                log.exception("site: the worker failed")
            self._task = None
        nc, self.nc = self.nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.cfg.request_timeout + 5)
        self.problem = "stopped"

    def status(self) -> SiteReport:
        if self.worker is not None:
            report = self.worker.status()
            if self.problem is not None and report.problem is None:
                return dataclasses.replace(report, problem=self.problem)
            return report
        return SiteReport(
            broker=list(self.cfg.servers),
            node_name=self.cfg.node_name,
            connected=self.connected,
            problem=self.problem,
            work=self.cfg.work,
            not_pulling=None if not self.cfg.work else self.problem or "starting",
            jobs=[],
            running=[],
            ranges_run=0,
            ranges_reported=0,
            ranges_failed=0,
            ranges_handed_back=0,
            refused={},
            pace={},
            cores=dataclasses.asdict(self.cores.snapshot()),
        )
