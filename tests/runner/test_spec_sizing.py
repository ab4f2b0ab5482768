"""Job spec validation and event sizing."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.exceptions import JobRefused, JobSpecError
from runner.lease import Lease
from runner.scatter import MAX_TASKS
from runner.sizing import WorkHistory, size_job
from runner.spec import (
    MAX_EVENTS,
    MAX_SPEC_BYTES,
    MAX_WORK,
    MIN_WORK,
    JobSpec,
    load_spec,
    parse_spec,
)

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


# --- bounds: a spec the node accepts is a spec the node survives ---------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "evil\nname"}, "name"),
        ({"name": "with space"}, "name"),
        ({"name": "../up"}, "name"),
        ({"name": ".hidden"}, "name"),
        ({"name": "-rf"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": 7}, "name"),
        ({"max_events": 2**63 - 1}, "max_events"),
        ({"max_events": MAX_EVENTS + 1}, "max_events"),
        ({"first_event": MAX_EVENTS + 1}, "first_event"),
        ({"events_per_task": MAX_EVENTS + 1}, "events_per_task"),
        ({"min_events": -1}, "min_events"),
        ({"cpu_work_per_event": 1e-300}, "cpu_work_per_event"),
        ({"cpu_work_per_event": 0.0}, "cpu_work_per_event"),
        ({"cpu_work_per_event": -1.0}, "cpu_work_per_event"),
        ({"cpu_work_per_event": math.nan}, "cpu_work_per_event"),
        ({"cpu_work_per_event": math.inf}, "cpu_work_per_event"),
        ({"cpu_work_per_event": 1e10}, "cpu_work_per_event"),
        ({"cpu_work_per_event": True}, "cpu_work_per_event"),
        ({"safety": math.nan}, "safety"),
        ({"task_timeout": math.inf}, "task_timeout"),
        ({"task_timeout": 1e300}, "task_timeout"),
        ({"command": ["sim\0", "{first}", "{count}", "{output}"]}, "command"),
        ({"command": ["x" * 5000, "{first}", "{count}", "{output}"]}, "command"),
        ({"command": ["sim", "{first}", "{count}", "{output}", *["a"] * 300]}, "command"),
        ({"bad\nkey": 1}, "bad\nkey"),
    ],
)
def test_unbounded_spec_values_are_refused_with_one_line_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_spec({**GOOD, **change})
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"job spec field {field!r}: ") and "\n" not in message
    assert len(message) < 300


def test_spec_at_every_bound_is_accepted() -> None:
    spec = _spec(
        name="a" * 64,
        max_events=MAX_EVENTS,
        min_events=MAX_EVENTS,
        first_event=MAX_EVENTS,
        events_per_task=MAX_EVENTS,
        cpu_work_per_event=MIN_WORK,
        task_timeout=7 * 86400,
    )
    assert spec.max_events == MAX_EVENTS and spec.cpu_work_per_event == MIN_WORK
    assert _spec(cpu_work_per_event=MAX_WORK).cpu_work_per_event == MAX_WORK


def test_toml_nan_inf_and_oversized_specs_are_refused(tmp_path: Path) -> None:
    head = 'name = "x"\ncommand = ["sim", "{first}", "{count}", "{output}"]\nmax_events = 5\n'
    for value in ("nan", "inf", "-inf", "1e-300"):
        p = tmp_path / f"{value}.toml"
        p.write_text(head + f"cpu_work_per_event = {value}\n")
        with pytest.raises(JobSpecError, match="'cpu_work_per_event'"):
            load_spec(p)
    big = tmp_path / "big.toml"
    big.write_text(head + "cpu_work_per_event = 1.0\n# " + "x" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(JobSpecError, match="larger than"):
        load_spec(big)


def test_sizing_never_plans_more_than_max_tasks() -> None:
    spec = _spec(max_events=10**9, events_per_task=1, cpu_work_per_event=MIN_WORK, min_events=1)
    assert size_job(spec, _lease(86400 * 2)).events == MAX_TASKS
    with pytest.raises(JobRefused, match=f"{MAX_TASKS} tasks of 1 events"):
        size_job(replace(spec, min_events=MAX_TASKS + 1), _lease(86400 * 2))
