"""CPU power per core in HS06, by DIRAC's DB12 fast benchmark or from config.

DB12 (DIRAC ``DIRACBenchmark``): draw 12.5 million ``random.normalvariate``
numbers, which by calibration is 250 HS06.s of work, and score
``250 * iterations / CPU seconds``. The node's power is measured with one copy
per core running at once, so that shared caches, memory bandwidth and turbo
behave as under a whole-node job; the per-core power is the mean of the
copies. ``draws`` can be scaled down (tests): the score stays in the same
unit because ``iterations = draws / 12.5e6``.

Running a benchmark costs a minute of every core, so the result is cached in a
JSON file with an expiry; a cache from a different core count is ignored.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner.exceptions import PowerError

DB12_DRAWS = 12_500_000
DB12_CALIBRATION = 250.0  # HS06.s per 12.5M draws
DEFAULT_EXPIRY = 7 * 24 * 3600.0


def db12_copy(draws: int = DB12_DRAWS) -> float:
    """One DB12 copy in this process; returns its score in HS06."""
    m = m2 = 0.0
    # process_time has far finer resolution than DIRAC's os.times (10 ms ticks).
    start = time.process_time()
    for _ in range(draws):
        t = random.normalvariate(10, 1)
        m += t
        m2 += t * t
    cpu = time.process_time() - start
    if cpu <= 0:
        raise PowerError(f"DB12 copy of {draws} draws used no measurable CPU time")
    return DB12_CALIBRATION * (draws / DB12_DRAWS) / cpu


@dataclass(frozen=True)
class PowerMeasurement:
    power_per_core: float
    cores: int
    copies: tuple[float, ...]
    measured_at: float
    draws: int

    def to_json(self) -> dict[str, object]:
        return {
            "method": "DB12",
            "power_per_core": self.power_per_core,
            "cores": self.cores,
            "copies": list(self.copies),
            "measured_at": self.measured_at,
            "draws": self.draws,
        }


def run_db12(cores: int, *, draws: int = DB12_DRAWS, now: float | None = None) -> PowerMeasurement:
    """Run one DB12 copy per core in separate processes.

    Raises:
        PowerError: a copy failed.
    """
    if cores < 1:
        raise PowerError(f"cannot benchmark {cores} cores")
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(cores) as pool:
            scores = tuple(pool.map(db12_copy, [draws] * cores))
    except PowerError:
        raise
    except Exception as exc:
        raise PowerError(f"DB12 benchmark failed: {exc}") from exc
    return PowerMeasurement(
        power_per_core=sum(scores) / len(scores),
        cores=cores,
        copies=scores,
        measured_at=time.time() if now is None else now,
        draws=draws,
    )


class PowerCache:
    """A DB12 result kept in a JSON file until ``expiry`` seconds old."""

    def __init__(self, path: str | Path, expiry: float = DEFAULT_EXPIRY) -> None:
        self.path = Path(path)
        self.expiry = expiry

    def load(self, cores: int, now: float) -> PowerMeasurement | None:
        """The cached measurement, or None if absent, unreadable, stale or for other cores."""
        try:
            data = json.loads(self.path.read_text())
            m = PowerMeasurement(
                power_per_core=float(data["power_per_core"]),
                cores=int(data["cores"]),
                copies=tuple(float(x) for x in data["copies"]),
                measured_at=float(data["measured_at"]),
                draws=int(data["draws"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if m.cores != cores or not 0 <= now - m.measured_at < self.expiry:
            return None
        if m.power_per_core <= 0:
            return None
        return m

    def store(self, m: PowerMeasurement) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".power.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(m.to_json(), f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def benchmark_power(
    cache: PowerCache, cores: int, now: float, *, draws: int = DB12_DRAWS
) -> tuple[float, str]:
    """Power per core from the cache, or by running DB12 and caching it.

    Returns ``(power_per_core, source)``, the shape ``assemble_lease`` expects.

    Raises:
        PowerError: the benchmark failed.
    """
    cached = cache.load(cores, now)
    if cached is not None:
        age = now - cached.measured_at
        return cached.power_per_core, f"DB12 cached in {cache.path} ({age:.0f} s old)"
    m = run_db12(cores, draws=draws, now=now)
    # A cache we cannot write only costs a re-run next time.
    with contextlib.suppress(OSError):
        cache.store(m)
    return m.power_per_core, f"DB12 measured now ({cores} copies)"
