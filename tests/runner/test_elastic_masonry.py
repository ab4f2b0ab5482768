"""Elastic jobs (size, run, learn) and the masonry pilot over a queue directory."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.elastic import run_elastic_job
from runner.exceptions import JobRefused
from runner.lease import Lease
from runner.masonry import run_pilot
from runner.sizing import WorkHistory
from runner.spec import parse_spec
from runner.stop import StopRequest

SYNTH = str(Path(__file__).with_name("synth_events.py"))


def _lease(time_left: float, cores: int = 2, power: float = 10.0, now: float = 0.0) -> Lease:
    return Lease(
        cores=cores, power_per_core=power, time_left=time_left, memory=None, now=now, sources={}
    )


def _data(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "command": [sys.executable, SYNTH, "{first}", "{count}", "{output}"],
        "cpu_work_per_event": 1.0,
        "max_events": 1000,
        "min_events": 5,
        "events_per_task": 10,
        **kw,
    }


def test_refused_job_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(JobRefused):
        # 0.8 * 1 s * 10 HS06 * 2 cores / 1 HS06.s = 16 < min 20
        run_elastic_job(parse_spec(_data("j", min_events=20)), _lease(1), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_measured_work_feeds_the_next_sizing(tmp_path: Path) -> None:
    history = WorkHistory(tmp_path / "history.json")
    # the spec claims 0.001 HS06.s/event; each run of the command costs ~30 ms CPU
    spec = parse_spec(_data("j", cpu_work_per_event=0.001, max_events=40))
    first = run_elastic_job(spec, _lease(10), tmp_path / "a", history=history)
    assert first.sizing.events == 40 and first.sizing.work_source == "spec"
    assert first.report.complete and first.measured_work_per_event is not None
    # 4 tasks of interpreter start-up: far more than 0.001 HS06.s/event at 10 HS06
    assert first.measured_work_per_event > 0.002
    bigger = replace(spec, max_events=10**8)
    second = run_elastic_job(bigger, _lease(10), tmp_path / "b", history=history, stop=_stopped())
    assert second.sizing.work_source == "measured"
    assert second.sizing.cpu_work_per_event == pytest.approx(first.measured_work_per_event)
    assert second.sizing.events < 160_000 / 2  # the spec's own figure would give 160000
    assert second.report.events_done == 0  # stopped before dispatch


def _stopped() -> StopRequest:
    stop = StopRequest()
    stop.request("test: sizing only")
    return stop


def _write(queue: Path, name: str, data: dict[str, Any]) -> None:
    lines = []
    for k, v in data.items():
        lines.append(f"{k} = {json.dumps(v)}")
    (queue / name).write_text("\n".join(lines) + "\n")


def test_pilot_fills_lease_then_stops(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    _write(queue, "a.toml", _data("a", max_events=20))
    _write(queue, "b.toml", _data("b", max_events=20))
    _write(queue, "c-huge.toml", _data("c", min_events=10**6, max_events=10**6))
    (queue / "d-bad.toml").write_text('name = "d"\n')
    t0 = time.monotonic()
    report = run_pilot(
        queue,
        tmp_path / "work",
        lambda now: _lease(100, now=t0).at(now),
        time.monotonic,
    )
    assert [j["spec"] for j in report.jobs_run] == ["a.toml", "b.toml"]
    assert report.events_done == 40
    assert report.stopped == "no queued job fits the lease"
    assert "c-huge.toml" in report.refused and (queue / "c-huge.toml").exists()
    assert "command" in report.rejected["d-bad.toml"]
    assert (queue / "rejected" / "d-bad.toml").exists()
    assert sorted(p.name for p in (queue / "done").glob("*.toml")) == ["a.toml", "b.toml"]
    done = json.loads((queue / "done" / "a.report.json").read_text())
    assert done["events_done"] == 20 and done["complete"]


def test_pilot_stops_when_lease_runs_out(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    for name in ("a", "b", "c"):
        _write(queue, f"{name}.toml", _data(name, max_events=10, min_events=10))
    clock = iter([0.0, 0.0, 50.0, 100.0, 100.0])
    # 0.8 * time_left * 10 * 2 / 1 >= 10 needs time_left >= 0.625 s
    report = run_pilot(
        queue, tmp_path / "work", lambda now: _lease(100.3).at(now), lambda: next(clock)
    )
    assert [j["spec"] for j in report.jobs_run] == ["a.toml", "b.toml"]
    assert report.stopped == "no queued job fits the lease"
    assert (queue / "c.toml").exists()


def test_masonry_runs_whole_rounds_when_the_lease_binds(tmp_path: Path) -> None:
    # 0.8 x 3.5625 s x 10 HS06 x 2 cores / 1 HS06.s = 57 events fit
    spec = parse_spec(_data("j", max_events=10**6))
    alone = run_elastic_job(spec, _lease(3.5625), tmp_path / "alone")
    assert alone.sizing.events == alone.report.events_planned == 57  # the formula, exactly
    queue = tmp_path / "queue"
    queue.mkdir()
    _write(queue, "a.toml", _data("j", max_events=10**6))
    t0 = time.monotonic()
    report = run_pilot(
        queue, tmp_path / "work", lambda now: _lease(3.5625, now=t0).at(now), time.monotonic
    )
    # rounds of 2 cores x 10 events: every worker ends its last task together
    assert report.jobs_run[0]["events_planned"] == 40
    # bound by max_events, a job is never cut down
    queue2 = tmp_path / "queue2"
    queue2.mkdir()
    _write(queue2, "k.toml", _data("k", max_events=25))
    report = run_pilot(
        queue2, tmp_path / "work2", lambda now: _lease(100, now=t0).at(now), time.monotonic
    )
    assert report.jobs_run[0]["events_planned"] == 25


def test_masonry_sizes_to_the_measured_pace(tmp_path: Path) -> None:
    # CPU work alone would allow 0.8 x (10 - 1 s reserve) x 10 HS06 x 2 / 0.001 = 144000
    spec = parse_spec(_data("j", cpu_work_per_event=0.001, max_events=10**6, min_events=20))
    with pytest.raises(JobRefused, match="measured pace"):
        # 0.8 x 9 s x 2 cores / 1 s per event = 14 events < 20
        run_elastic_job(spec, _lease(10), tmp_path / "w", masonry=True, seconds_per_event=1.0)
    assert not (tmp_path / "w").exists()
    result = run_elastic_job(
        replace(spec, min_events=1), _lease(10), tmp_path / "w", masonry=True, seconds_per_event=1.0
    )
    assert result.report.events_planned == 14


def test_pilot_goes_on_after_a_job_stops_at_the_lease_end(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    # "a" claims cheap events but each takes 0.2 s: its run stops itself at the
    # lease end with committed tasks; the pilot goes on with "b".
    slow = [sys.executable, SYNTH, "{first}", "{count}", "{output}", "--sleep", "0.2"]
    _write(queue, "a.toml", _data("a", command=slow, cpu_work_per_event=0.001, events_per_task=2))
    quick = ["/bin/sh", str(Path(__file__).with_name("probe_task.sh"))]
    quick += ["{first}", "{count}", "{output}"]
    _write(
        queue,
        "b.toml",
        _data("b", command=quick, cpu_work_per_event=0.001, max_events=4, min_events=1),
    )
    calls: list[float] = []

    def lease_at(now: float) -> Lease:
        # "a" is sized to a 3 s lease; afterwards the lease is renewed (a later
        # end never stops a running job), so "b" has room whatever the load.
        calls.append(now)
        return _lease(3.0 if len(calls) == 1 else 60.0, now=now)

    report = run_pilot(queue, tmp_path / "work", lease_at, time.monotonic, reserve_floor=0.3)
    first = report.jobs_run[0]
    assert first["spec"] == "a.toml" and not first["complete"]
    assert isinstance(first["events_done"], int) and first["events_done"] > 0
    assert "no time for another task" in str(first["stopped"])
    assert (queue / "a.toml").exists()  # back in the queue, resumable from its journal
    assert [j["spec"] for j in report.jobs_run[1:]] == ["b.toml"]
    assert report.jobs_run[1]["complete"]
    assert report.stopped == "no queued job fits the lease"


def test_pace_measured_by_a_pilot_is_kept_for_the_next(tmp_path: Path) -> None:
    history = WorkHistory(tmp_path / "history.json")
    queue = tmp_path / "queue"
    queue.mkdir()
    _write(queue, "a.toml", _data("a", max_events=20))
    t0 = time.monotonic()
    run_pilot(
        queue,
        tmp_path / "work",
        lambda now: _lease(100, now=t0).at(now),
        time.monotonic,
        history=history,
    )
    pace = history.pace("a")
    assert pace is not None and pace > 0  # wall seconds per event of a's tasks
    assert history.measured("a") is not None and history.pace("b") is None


def test_a_lease_moved_earlier_cuts_running_tasks_by_its_new_end_not_after_the_grace(
    tmp_path: Path,
) -> None:
    # Defect: a job stopped because its lease moved earlier gave its running
    # tasks the whole grace (30 s here), past the new end, where the batch
    # system kills the slot.
    queue = tmp_path / "queue"
    queue.mkdir()
    slow = [sys.executable, SYNTH, "{first}", "{count}", "{output}", "--sleep", "20"]
    _write(queue, "a.toml", _data("a", command=slow, cpu_work_per_event=0.001, events_per_task=1))
    t0 = time.monotonic()

    def lease_at(now: float) -> Lease:
        # 10 minutes at first; a second in, the end moves to t0 + 4 s.
        end = t0 + (600.0 if now - t0 < 1.0 else 4.0)
        return replace(_lease(end - now, cores=1, now=now), sources={"time_left": "test"})

    report = run_pilot(
        queue, tmp_path / "work", lease_at, time.monotonic, grace=30.0, reserve_floor=0.3
    )
    first = report.jobs_run[0]
    assert "the lease now ends" in str(first["stopped"]) and not first["complete"]
    # Cut by the new end (t0 + 4 s less the reserve), not 30 s after the stop,
    # nor when the 20 s task would have ended by itself.
    assert time.monotonic() - t0 < 9.0
    assert (queue / "a.toml").exists()  # back in the queue for a later lease
    assert report.stopped == "no queued job fits the lease"
