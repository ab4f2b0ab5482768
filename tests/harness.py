"""Real servers and mounts for end-to-end tests, always cleaned up.

``OriginServer`` runs the aiohttp origin in a thread on an ephemeral loopback
port; ``MountProcess`` runs ``swarm mount --foreground`` and ``NodeProcess``
runs ``swarm node`` as a child process (we know and end only its PID); both
unmount in ``close`` whatever happened, however many mounts were left there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiohttp import web

from swarm.origin import make_app
from swarm_testing.waiting import eventually


class OriginServer:
    def __init__(self, store: Path) -> None:
        self.store = store
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0
        self.requests = 0
        self.paths: list[str] = []  # every request's path, in order

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
        async def count(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            self.requests += 1
            self.paths.append(request.path)
            return await handler(request)

        app.middlewares.append(count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

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


def publish_hello(tmp_path: Path, repo: str, keys: Path) -> Path:
    """Publish a one-file tree (``hello``) with ``swarm publish`` (no torrent)
    into ``tmp_path/store``; returns the store."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "swarm", "publish", str(src), "--repo", repo, "--keys",
            str(keys), "--store", str(store), "--quiet", "--no-torrent"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return store


def mounts_at(mountpoint: Path) -> int:
    """How many mounts are stacked at ``mountpoint`` (/proc/self/mountinfo)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if _unescape(line.split()[4]) == target)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(mountpoint: Path) -> bool:
    return mounts_at(mountpoint) > 0


def unmount_all(mountpoint: Path) -> None:
    """Lazily unmount every mount stacked at ``mountpoint`` (test cleanup)."""
    for _ in range(16):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


class _Child:
    """A child ``swarm`` process whose output goes to ``log_path``; ``close``
    (of the subclass) always stops it and clears its mounts."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process: a mount it served stays, dead (ENOTCONN), until ``close``."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def _failed(self, what: object) -> RuntimeError:
        """Close after a failed start; the error carries the log's tail."""
        text = self.log()
        self.close()
        return RuntimeError(f"{what}: {text[-3000:]}")

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MountProcess(_Child):
    """``swarm mount NAME MP --foreground`` as a child; ``close`` always unmounts."""

    def __init__(
        self,
        name: str,
        mountpoint: Path,
        origin: str,
        trust: Path,
        cache: Path,
        *extra: str,
        launcher: tuple[str, ...] = ("-m", "swarm.cli"),
    ) -> None:
        self.mountpoint = mountpoint
        self.log_path = cache.parent / f"{cache.name}.mount.log"
        with contextlib.suppress(FileExistsError):  # exist_ok would stat a dead mount
            mountpoint.mkdir(parents=True)
        read_fd, write_fd = os.pipe()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *launcher,
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
            answered, _, _ = select.select([pipe], [], [], 60)
            ready = pipe.readline().decode() if answered else "no answer within 60 s"
        if not ready.startswith("ok"):
            raise self._failed(f"mount failed ({ready.strip() or 'no answer'})")
        try:
            eventually("the mount to appear", lambda: is_mounted(mountpoint), 10)
        except AssertionError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        if is_mounted(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0:
                unmount_all(self.mountpoint)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


class NodeProcess(_Child):
    """``swarm node --config FILE`` as a child, ready once it wrote
    ``DATA_DIR/node.json``; ``close`` stops it (SIGTERM, then SIGKILL) and
    unmounts whatever it left at its mount point."""

    def __init__(self, config: Path, data_dir: Path, mount: Path | None, log: Path) -> None:
        self.data_dir = data_dir
        self.mount = mount
        self.log_path = log
        # A node killed with SIGKILL leaves its node.json: wait for the new one.
        (data_dir / "node.json").unlink(missing_ok=True)
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm", "node", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

        def ready() -> bool:
            assert self.proc.poll() is None, f"the node exited with {self.proc.returncode}"
            return (data_dir / "node.json").exists()

        try:
            eventually("the node to be ready", ready, 60)
        except AssertionError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.mount is not None:
            unmount_all(self.mount)
        self._log.close()
