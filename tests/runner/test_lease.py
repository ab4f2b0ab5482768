"""Lease assembly from MJF directories, config and options (clock injected)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.exceptions import LeaseError
from runner.lease import (
    FeatureDir,
    LeaseOptions,
    assemble_lease,
    discover_lease,
    shutdown_probe,
)

NOW = 1_700_000_000.0


def _mjf(tmp_path: Path, kind: str, **files: str) -> str:
    d = tmp_path / kind
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d)


def test_mjf_gives_every_field_and_minimum_time_left(tmp_path: Path) -> None:
    machine = _mjf(tmp_path, "m", shutdowntime=f"{int(NOW) + 5000}\n", total_cpu="8\n", hs06="80.0")
    job = _mjf(
        tmp_path,
        "j",
        jobstart_secs=f"{int(NOW) - 100}",
        wall_limit_secs="3600",
        allocated_cpu="4",
        max_rss_bytes="8000000000",
    )
    lease = discover_lease(
        now=NOW, environ={"MACHINEFEATURES": machine, "JOBFEATURES": job}, detected_cores=2
    )
    assert lease.cores == 4
    assert lease.power_per_core == pytest.approx(10.0)
    assert lease.time_left == pytest.approx(3500.0)
    assert lease.memory == 8_000_000_000
    assert "jobstart_secs" in lease.sources["time_left"]
    assert "allocated_cpu" in lease.sources["cores"]
    assert "hs06" in lease.sources["power_per_core"]
    # cpu_limit_secs and shutdowntime_job are absent: each named, with the fallback
    assert any("cpu_limit_secs is missing" in w for w in lease.warnings)
    assert any(
        "shutdowntime_job is missing" in w and "time_left from $JOBFEATURES/jobstart_secs" in w
        for w in lease.warnings
    )


def test_shutdowntime_earlier_than_wall_limit_wins(tmp_path: Path) -> None:
    machine = FeatureDir("MACHINEFEATURES", "/m", {"shutdowntime": str(int(NOW) + 600)})
    job = FeatureDir(
        "JOBFEATURES", "/j", {"jobstart_secs": str(int(NOW)), "wall_limit_secs": "86400"}
    )
    lease = assemble_lease(
        now=NOW, machine=machine, job=job, options=LeaseOptions(cores=2, power_per_core=10.0)
    )
    assert lease.time_left == 600
    assert lease.sources["time_left"].startswith("$MACHINEFEATURES/shutdowntime")
    assert lease.sources["cores"] == "option cores"


def test_option_time_left_is_only_one_candidate() -> None:
    machine = FeatureDir("MACHINEFEATURES", "/m", {"shutdowntime": str(int(NOW) + 600)})
    longer = assemble_lease(
        now=NOW, machine=machine, options=LeaseOptions(cores=1, power_per_core=1, time_left=9999)
    )
    assert longer.time_left == 600
    shorter = assemble_lease(
        now=NOW, machine=machine, options=LeaseOptions(cores=1, power_per_core=1, time_left=60)
    )
    assert shorter.time_left == 60
    assert shorter.sources["time_left"] == "option time_left"


def test_malformed_file_names_file_and_fallback(tmp_path: Path) -> None:
    machine = _mjf(tmp_path, "m", hs06="fast\n", total_cpu="2", shutdowntime="12x")
    lease = discover_lease(
        now=NOW,
        environ={"MACHINEFEATURES": machine},
        config={"power_per_core": 12.5, "time_left": 1000},
    )
    assert lease.power_per_core == 12.5  # config outranks hs06 anyway
    assert lease.time_left == 1000
    warn = [w for w in lease.warnings if "shutdowntime" in w]
    assert len(warn) == 1
    assert f"{machine}/shutdowntime" in warn[0]
    assert "malformed" in warn[0] and "'12x'" in warn[0]
    assert "time_left from config time_left" in warn[0]


def test_bad_hs06_falls_back_to_benchmark(tmp_path: Path) -> None:
    machine = _mjf(tmp_path, "m", hs06="-3", total_cpu="2", shutdowntime=str(int(NOW) + 60))
    calls: list[int] = []

    def bench(cores: int) -> tuple[float, str]:
        calls.append(cores)
        return 9.0, "DB12 fake"

    lease = discover_lease(now=NOW, environ={"MACHINEFEATURES": machine}, benchmark=bench)
    assert calls == [2]
    assert lease.power_per_core == 9.0
    assert any("hs06 is out of range" in w and "from DB12 fake" in w for w in lease.warnings)


def test_unreadable_directory_is_a_warning(tmp_path: Path) -> None:
    lease = discover_lease(
        now=NOW,
        environ={"JOBFEATURES": str(tmp_path / "nope")},
        options=LeaseOptions(cores=1, power_per_core=1.0, time_left=5.0),
    )
    assert len(lease.warnings) == 1
    assert "nope" in lease.warnings[0] and "unreadable" in lease.warnings[0]


def test_no_time_source_is_an_error() -> None:
    with pytest.raises(LeaseError, match="time_left"):
        assemble_lease(now=NOW, options=LeaseOptions(cores=1, power_per_core=1.0))


def test_no_power_source_is_an_error_naming_the_bad_file() -> None:
    machine = FeatureDir("MACHINEFEATURES", "/m", {"hs06": "x", "total_cpu": "2"})
    with pytest.raises(LeaseError, match=r"power_per_core.*hs06 is malformed"):
        assemble_lease(now=NOW, machine=machine, options=LeaseOptions(time_left=10))


def test_past_shutdown_gives_zero_time() -> None:
    machine = FeatureDir("MACHINEFEATURES", "/m", {"shutdowntime": str(int(NOW) - 10)})
    lease = assemble_lease(
        now=NOW, machine=machine, options=LeaseOptions(cores=1, power_per_core=1.0)
    )
    assert lease.time_left == 0.0


def test_cpu_limit_divided_by_cores() -> None:
    job = FeatureDir(
        "JOBFEATURES",
        "/j",
        {"jobstart_secs": str(int(NOW)), "cpu_limit_secs": "4000", "allocated_cpu": "4"},
    )
    lease = assemble_lease(now=NOW, job=job, options=LeaseOptions(power_per_core=1.0))
    assert lease.time_left == 1000
    assert "cpu_limit_secs" in lease.sources["time_left"]


def test_bad_config_value_is_a_warning() -> None:
    lease = assemble_lease(
        now=NOW, config={"cores": "many", "power_per_core": 2.0, "time_left": 10}, detected_cores=3
    )
    assert lease.cores == 3
    assert any("config cores" in w and "detected" in w for w in lease.warnings)


def test_shutdown_probe_sees_an_earlier_shutdowntime(tmp_path: Path) -> None:
    machine = _mjf(tmp_path, "m", shutdowntime=str(int(NOW) + 600))
    probe = shutdown_probe({"MACHINEFEATURES": machine}, NOW + 600, lambda: NOW)
    assert probe() is None
    (Path(machine) / "shutdowntime").write_text(str(int(NOW) + 60))
    reason = probe()
    assert reason is not None and "shutdowntime moved" in reason and "60 s" in reason
