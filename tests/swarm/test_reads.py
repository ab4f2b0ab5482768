"""Reads through the node's loop (swarm/reads.py): one deadline per fetch,
on the node's clock, shared by the swarm and the origin."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from cvmfs_like.exceptions import ObjectUnavailable
from swarm.exceptions import FetchTimeout, TransferError
from swarm.origin_client import OriginObjectSource
from swarm.reads import Holding, LoopBridge, SwarmObjectSource
from tests.mock_transport import MockTransport

REPO = "sw.example.org"
DIGEST = "ab" * 32
TIMEOUT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StalledTransfer:
    """A torrent whose read fails after the (fake) clock ran 0.4 budgets."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def read(self, index: int, offset: int, size: int) -> bytes:
        self.clock.now += 0.4 * TIMEOUT
        raise TransferError("no peer has the piece")


class DeadlineRecorder(MockTransport):
    def __init__(self) -> None:
        super().__init__()
        self.deadlines: list[float] = []

    def get(self, url: str, *, deadline: float, limit: int) -> bytes:
        self.requests.append(url)
        self.deadlines.append(deadline)
        raise FetchTimeout(f"{url}: no complete answer in time")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_fetch_has_one_deadline_for_swarm_and_origin_and_names_both_reasons(
    loop: asyncio.AbstractEventLoop,
) -> None:
    clock = FakeClock()
    transport = DeadlineRecorder()
    origin = OriginObjectSource("http://origin.test/", REPO, transport=transport)
    source = SwarmObjectSource(REPO, LoopBridge(loop, clock), origin, timeout=TIMEOUT)
    source.index = {DIGEST: Holding(StalledTransfer(clock), 0)}  # type: ignore[arg-type]
    start = clock.now
    with pytest.raises(ObjectUnavailable) as caught:
        source.fetch(DIGEST, 100)
    # The origin got what was left of the one budget, not a fresh one.
    assert transport.deadlines == [start + TIMEOUT]
    assert transport.requests == [f"http://origin.test/{REPO}/data/ab/{DIGEST}"]
    why = str(caught.value)
    assert "swarm: no peer has the piece" in why and "origin" in why
