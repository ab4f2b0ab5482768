"""Helpers for the torrent tests.

Independent checks (the span of the info dictionary, BEP 52 merkle roots; the
bencoder is ``swarm_testing.bencode``) written from the specs, so the tests do
not trust libtorrent to check libtorrent; live sessions and a web seed on
127.0.0.1, always closed; and the child process of the SIGKILL test
(``python -m tests.swarm.torrent_helpers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.torrent import SessionConfig, TorrentSession, parse_torrent
from swarm_testing.waiting import eventually_async

BLOCK = 16 * 1024


def skip_value(data: bytes, i: int) -> int:
    """Index just past the bencoded value starting at ``i``."""
    c = data[i : i + 1]
    if c == b"i":
        return data.index(b"e", i) + 1
    if c in (b"l", b"d"):
        i += 1
        while data[i : i + 1] != b"e":
            i = skip_value(data, i)
        return i + 1
    colon = data.index(b":", i)
    return colon + 1 + int(data[i:colon])


def info_span(torrent: bytes) -> bytes:
    """The exact bytes of the top-level ``info`` value of a bencoded torrent."""
    assert torrent[:1] == b"d"
    i = 1
    while torrent[i : i + 1] != b"e":
        key_end = skip_value(torrent, i)
        key = torrent[torrent.index(b":", i) + 1 : key_end]
        value_end = skip_value(torrent, key_end)
        if key == b"info":
            return torrent[key_end:value_end]
        i = value_end
    raise KeyError("info")


def merkle_root(content: bytes) -> str:
    """BEP 52 pieces root of a non-empty file: SHA-256 of 16 KiB blocks, leaves
    padded with zero hashes to a power of two, hashed pairwise up to the root."""
    leaves = [
        hashlib.sha256(content[i : i + BLOCK]).digest() for i in range(0, len(content), BLOCK)
    ]
    width = 1
    while width < len(leaves):
        width *= 2
    layer = leaves + [bytes(32)] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0].hex()


# -- live sessions ------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    state_dir: Path, *, bootstrap: Sequence[str] = (), host: str = "127.0.0.1", **tuning: Any
) -> AsyncIterator[TorrentSession]:
    """A started session on ``host`` (any port), closed whatever happens."""
    config = SessionConfig(listen=f"{host}:0", bootstrap=list(bootstrap), **tuning)
    session = TorrentSession(config, state_dir)
    await session.start()
    try:
        yield session
    finally:
        await session.close()


def address(session: TorrentSession) -> str:
    host = session.config.listen.rpartition(":")[0]
    return f"{host}:{session.listen_port}"


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait until ``predicate()`` holds (``swarm_testing``'s wait, for a plain predicate)."""

    async def check() -> bool:
        return predicate()

    await eventually_async(what, check, timeout)


class WebSeed:
    """An aiohttp server on 127.0.0.1 serving ``root`` as plain files (with ranges)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> WebSeed:
        @web.middleware
        async def record(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            self.paths.append(request.path)
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.router.add_static("/", self.root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _read_until_saved(args: list[str]) -> None:
    """Child of the SIGKILL test: read a range, wait until it is in the resume
    file, say so, then hang until killed."""
    state, save, torrent, seeder, offset, size = args
    meta = parse_torrent(Path(torrent).read_bytes())
    config = SessionConfig(listen="127.0.0.1:0", bootstrap=[seeder], resume_interval=0.5)
    session = TorrentSession(config, Path(state))
    await session.start()
    transfer = session.add(meta, Path(save))
    await transfer.read(0, int(offset), int(size))
    await asyncio.wait_for(session.resume.wait_saved(meta.info_hash), 30)
    print("saved", (await transfer.updated_status()).downloaded, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_read_until_saved(sys.argv[1:]))
