"""Job spec validation and event sizing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.exceptions import JobRefused, JobSpecError
from runner.lease import Lease
from runner.sizing import WorkHistory, size_job
from runner.spec import JobSpec, load_spec, parse_spec

GOOD: dict[str, Any] = {
    "name": "mc-sim",
    "command": ["sim", "--first", "{first}", "--count", "{count}", "--out", "{output}"],
    "cpu_work_per_event": 50.0,
    "max_events": 100000,
    "min_events": 10,
    "safety": 0.8,
    "events_per_task": 10,
}


def _lease(time_left: float, power: float = 10.0, cores: int = 8) -> Lease:
    return Lease(
        cores=cores, power_per_core=power, time_left=time_left, memory=None, now=0.0, sources={}
    )


def _spec(**kw: Any) -> JobSpec:
    return parse_spec({**GOOD, **kw})


def test_load_spec_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "job.toml"
    p.write_text(
        'name = "mc-sim"\ncommand = ["sim", "{first}", "{count}", "{output}"]\n'
        "cpu_work_per_event = 50.0\nmax_events = 100\ntask_timeout = 30\n"
    )
    spec = load_spec(p)
    assert spec.safety == 0.8 and spec.min_events == 1 and spec.task_timeout == 30.0
    assert spec.argv(5, 3, "/o") == ["sim", "5", "3", "/o"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"command": []}, "command"),
        ({"command": ["sim", "{first}", "{count}"]}, "command"),
        ({"cpu_work_per_event": 0}, "cpu_work_per_event"),
        ({"cpu_work_per_event": "a"}, "cpu_work_per_event"),
        ({"max_events": 1.5}, "max_events"),
        ({"min_events": 200000}, "min_events"),
        ({"safety": 1.5}, "safety"),
        ({"events_per_task": 0}, "events_per_task"),
        ({"task_timeout": -1}, "task_timeout"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_spec_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_spec({**GOOD, **change})
    assert info.value.field == field
    assert repr(field) in str(info.value)


def test_missing_required_field() -> None:
    data = dict(GOOD)
    del data["max_events"]
    with pytest.raises(JobSpecError, match=r"'max_events'.*required"):
        parse_spec(data)


def test_bad_toml_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("name = ")
    with pytest.raises(JobSpecError, match="not valid TOML"):
        load_spec(p)
    with pytest.raises(JobSpecError, match="cannot read"):
        load_spec(tmp_path / "absent.toml")


def test_sizing_formula() -> None:
    # 0.8 * 3600 s * 10 HS06 * 8 cores / 50 HS06.s = 4608
    assert size_job(_spec(), _lease(3600)).events == 4608


def test_sizing_capped_by_max_events() -> None:
    assert size_job(_spec(max_events=1000), _lease(86400 * 2)).events == 1000


def test_sizing_exact_fit_is_not_lost_to_rounding() -> None:
    # 0.8 * 62.5 * 10 * 1 / 50 = 10 exactly (float arithmetic gives 9.999...)
    sizing = size_job(_spec(safety=0.8), _lease(62.5, cores=1))
    assert sizing.events == 10


def test_sizing_refuses_below_min_events() -> None:
    with pytest.raises(JobRefused, match=r"only 9 events fit.*min_events 10") as info:
        size_job(_spec(), _lease(60, cores=1))  # 0.8*60*10/50 = 9.6
    assert info.value.events == 9 and info.value.min_events == 10


def test_sizing_zero_time_refuses() -> None:
    with pytest.raises(JobRefused):
        size_job(_spec(min_events=1), _lease(0))


def test_measured_work_feeds_next_sizing(tmp_path: Path) -> None:
    history = WorkHistory(tmp_path / "history.json")
    assert history.measured("mc-sim") is None
    # 100 events took 1000 CPU s at 10 HS06 per core: 100 HS06.s per event
    assert history.record("mc-sim", 1000.0, 10.0, 100) == pytest.approx(100.0)
    assert history.measured("other") is None
    measured = history.measured("mc-sim")
    sizing = size_job(_spec(), _lease(3600), measured)
    assert sizing.events == 2304 and sizing.work_source == "measured"
    history.record("mc-sim", 500.0, 10.0, 100)
    assert history.measured("mc-sim") == pytest.approx(75.0)


def test_history_keeps_recent_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text("{not json")
    history = WorkHistory(path)
    assert history.measured("x") is None
    for i in range(1, 8):
        history.record("x", float(i), 1.0, 1)
    assert history.measured("x") == pytest.approx((3 + 4 + 5 + 6 + 7) / 5)
