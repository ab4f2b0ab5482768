"""DB12 benchmark (scaled down) and its cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.power import PowerCache, PowerMeasurement, benchmark_power, db12_copy, run_db12


def test_db12_copy_scores_in_hs06() -> None:
    score = db12_copy(50_000)
    # Python on any current CPU scores a few to a few tens of HS06 per core.
    assert 0.5 < score < 500


def test_run_db12_one_copy_per_core() -> None:
    m = run_db12(2, draws=20_000, now=5.0)
    assert len(m.copies) == 2 and m.cores == 2 and m.measured_at == 5.0
    assert m.power_per_core == pytest.approx(sum(m.copies) / 2)


def test_cache_hit_expiry_and_core_count(tmp_path: Path) -> None:
    cache = PowerCache(tmp_path / "power.json", expiry=100)
    cache.store(PowerMeasurement(11.0, 2, (10.0, 12.0), measured_at=1000.0, draws=1))
    power, source = benchmark_power(cache, 2, now=1050.0)
    assert power == 11.0 and "cached" in source
    assert cache.load(4, now=1050.0) is None  # other core count
    assert cache.load(2, now=1200.0) is None  # expired


def test_benchmark_runs_and_caches_when_stale(tmp_path: Path) -> None:
    cache = PowerCache(tmp_path / "power.json", expiry=100)
    (tmp_path / "power.json").write_text("garbage")
    power, source = benchmark_power(cache, 1, now=2000.0, draws=20_000)
    assert "measured" in source
    again, source2 = benchmark_power(cache, 1, now=2001.0, draws=20_000)
    assert again == power and "cached" in source2
