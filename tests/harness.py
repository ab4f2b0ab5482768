"""Real servers and mounts for end-to-end tests, always cleaned up.

``OriginServer`` runs the aiohttp origin in a thread on an ephemeral loopback
port; ``MountProcess`` runs ``swarm mount --foreground`` as a child process
(we know and end only its PID) and unmounts in ``close`` whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from aiohttp import web

from swarm.origin import make_app


class OriginServer:
    def __init__(self, store: Path) -> None:
        self.store = store
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> OriginServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = make_app(self.store)

        @web.middleware
        async def count(request: web.Request, handler: web.Handler) -> web.StreamResponse:
            self.requests += 1
            return await handler(request)

        app.middlewares.append(count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        """Stop serving (the port is released); ``start_again`` reuses it."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None

    def start_again(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class MountProcess:
    """``swarm mount NAME MP --foreground`` as a child; ``close`` always unmounts."""

    def __init__(
        self,
        name: str,
        mountpoint: Path,
        origin: str,
        trust: Path,
        cache: Path,
        *extra: str,
    ) -> None:
        self.mountpoint = mountpoint
        self.log_path = cache.parent / f"{cache.name}.mount.log"
        mountpoint.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarm.cli",
                "mount",
                name,
                str(mountpoint),
                "--origin",
                origin,
                "--trust",
                str(trust),
                "--cache",
                str(cache),
                "--foreground",
                "--ready-fd",
                str(write_fd),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            ready = pipe.readline().decode()
        if not ready.startswith("ok"):
            log = self.log()
            self.close()
            raise RuntimeError(f"mount failed: {log}")
        deadline = time.monotonic() + 10
        while not is_mounted(mountpoint):
            if time.monotonic() > deadline:
                log = self.log()
                self.close()
                raise RuntimeError(f"mount never appeared: {log}")
            time.sleep(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if is_mounted(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> MountProcess:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
