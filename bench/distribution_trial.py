"""One trial of one system in ``python -m bench.distribution``: what it is given, what it returns.

A trial gets a :class:`Setup` (the node count, the file and its SHA-256, the link rate,
a work directory) and returns an :class:`Outcome`.  The primitives every system uses
live here too: the random source file, the wait for a listening port or for all
clients with a deadline (every wait has one), and :func:`checked_outcome`, which hashes
the clients' copies so that a system whose copies do not all match the source is
reported as failed, never timed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bench.util import BenchError
from swarm_testing.netns import Host

MIB = 1 << 20
PREFIX = "sgb"  # namespace/link names of this bench (the tests use "sg")
FILE_NAME = "image.bin"
# Children never see a proxy from our environment: they talk only to the namespaces.
CLEAN_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


@dataclass
class Outcome:
    """How one system did; ``seconds`` is None when it failed or is unavailable."""

    system: str
    seconds: float | None = None
    client_seconds: list[float] = field(default_factory=list)
    verified: int = 0
    source_sent_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    note: str = ""


@dataclass
class Setup:
    """What every system is given."""

    nodes: int
    size: int  # bytes
    rate_mbit: float
    file: Path
    sha256: str
    work: Path

    @property
    def bound(self) -> float:
        return kumar_ross_bound(self.size, self.nodes, self.rate_mbit)

    @property
    def deadline(self) -> float:
        """Seconds after which a system is given up: 3x a single origin serving everyone."""
        return 3 * self.nodes * self.size * 8 / (self.rate_mbit * 1e6) + 120


def kumar_ross_bound(size: int, nodes: int, rate_mbit: float) -> float:
    """Seconds to deliver ``size`` bytes from one seed to ``nodes`` peers, every link
    ``rate_mbit`` each way: ``max(F/u_s, F/d_min, N*F/(u_s + sum u_i))``."""
    f = size * 8
    u = rate_mbit * 1e6
    return max(f / u, f / u, nodes * f / (u + nodes * u))


def make_source_file(work: Path, size: int) -> tuple[Path, str]:
    """``size`` random bytes (incompressible, no dedup to flatter anyone); (path, sha256)."""
    src = work / "source"
    src.mkdir(parents=True, exist_ok=True)
    path = src / FILE_NAME
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MIB))
            h.update(block)
            f.write(block)
            left -= len(block)
    # Old enough for squid's heuristic freshness (and any cache) to call it fresh.
    old = time.time() - 7 * 86400
    os.utime(path, (old, old))
    return path, h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def verify_copies(paths: Sequence[Path], expected: str) -> int:
    """How many of ``paths`` exist with SHA-256 ``expected`` (hashed two at a time)."""

    def ok(p: Path) -> bool:
        return p.is_file() and sha256_file(p) == expected

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(ok, paths))


def wait_port(host: Host, addr: str, port: int, what: str, proc: subprocess.Popen[Any]) -> None:
    """Until a TCP connect from ``host`` to ``addr:port`` succeeds; fail if ``proc`` died."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        r = host.run(["bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}"], capture_output=True)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not listening on {addr}:{port} after 30 s")
        time.sleep(0.1)


def wait_all(
    done: Callable[[int], float | None], n: int, deadline: float, what: str
) -> list[float]:
    """Poll ``done(i)`` (seconds since start, or None) for i < n until all are set."""
    times: list[float | None] = [None] * n
    t_end = time.monotonic() + deadline
    while any(t is None for t in times):
        for i in range(n):
            if times[i] is None:
                times[i] = done(i)
        if time.monotonic() > t_end:
            left = sum(1 for t in times if t is None)
            raise BenchError(f"{what}: {left} of {n} clients not done after {deadline:.0f} s")
        time.sleep(0.02)
    return [t for t in times if t is not None]


def open_log(path: Path) -> BinaryIO:
    """A log file for a child's output (the child gets its own copy of the descriptor)."""
    return open(path, "ab")


def checked_outcome(
    system: str,
    setup: Setup,
    times: list[float],
    paths: Sequence[Path],
    sent: int,
    extra: dict[str, Any],
) -> Outcome:
    """The outcome of ``system``: the slowest client's time, unless fewer than all
    ``paths`` hold the source's SHA-256 (then ``error`` says so and no time is given)."""
    verified = verify_copies(paths, setup.sha256)
    o = Outcome(system, max(times) if times else None, sorted(times), verified, sent, extra)
    if verified != setup.nodes:
        o.error = f"only {verified} of {setup.nodes} copies have the right SHA-256"
        o.seconds = None
    return o
