"""Whole-node runs with real child processes and a synthetic event command."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runner.exceptions import JournalError, TaskError
from runner.node_run import run_job
from runner.spec import JobSpec, parse_spec
from runner.stop import StopRequest
from swarm_testing.waiting import eventually

HERE = Path(__file__).parent
SYNTH = str(HERE / "synth_events.py")
DRIVER = str(HERE / "gather_driver.py")
ROOT = HERE.parent.parent


def _spec(*extra: str, **kw: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "synth",
        "command": [sys.executable, SYNTH, "{first}", "{count}", "{output}", *extra],
        "cpu_work_per_event": 1.0,
        "max_events": 10**6,
        "events_per_task": 5,
    }
    data.update(kw)
    return parse_spec(data)


def _events(path: str | Path) -> list[int]:
    return [int(line.split()[1]) for line in Path(path).read_text().splitlines()]


def _runs(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


def test_whole_job_gathers_each_event_once(tmp_path: Path) -> None:
    report = run_job(_spec(first_event=1000), 23, tmp_path / "w", cores=2)
    assert report.complete and report.events_planned == report.events_done == 23
    assert _events(report.output) == list(range(1000, 1023))
    assert report.tasks == 5 and report.failed_runs == 0
    assert report.cpu_seconds > 0 and report.wall_seconds > 0
    assert json.loads((tmp_path / "w" / "report.json").read_text())["events_done"] == 23
    assert not list((tmp_path / "w" / "parts").glob("*.part"))
    assert report.task_runs == 5 and report.cpu_seconds_committed == report.cpu_seconds


def test_sigkilled_worker_task_is_requeued_to_another_worker(tmp_path: Path) -> None:
    once = tmp_path / "once"
    once.mkdir()
    runs = tmp_path / "runs"
    spec = _spec(
        "--crash-once", str(once), "--crash-first", "10", "--runs", str(runs), events_per_task=2
    )
    # 20 tasks: the worker that crashed has fresh tasks to take for as long as the
    # other one needs to become free (were none left, it would retry the task itself)
    report = run_job(spec, 40, tmp_path / "w", cores=2)
    assert report.complete and report.failed_runs == 1
    assert "killed by signal 9" in report.failures[0]
    # the half-written output of the killed run is discarded: each event exactly once
    assert _events(report.output) == list(range(40))
    lines = [ln.split() for ln in runs.read_text().splitlines() if ln.startswith("10 ")]
    assert len(lines) == 2 and lines[0][2] != lines[1][2]  # retried on the other worker
    journal = (tmp_path / "w" / "journal.jsonl").read_text().splitlines()[1:]
    task5 = [json.loads(x) for x in journal if json.loads(x)["task"] == 5]
    assert len(task5) == 1 and task5[0]["attempt"] == 2


def test_hung_task_times_out_and_is_rerun(tmp_path: Path) -> None:
    once = tmp_path / "once"
    once.mkdir()
    spec = _spec("--hang-once", str(once), "--crash-first", "0", task_timeout=1.0)
    t0 = time.monotonic()
    report = run_job(spec, 10, tmp_path / "w", cores=2)
    assert time.monotonic() - t0 < 20
    assert report.complete and report.failed_runs == 1
    assert "timed out" in report.failures[0]
    assert _events(report.output) == list(range(10))


def test_failing_command_is_abandoned_after_max_attempts(tmp_path: Path) -> None:
    spec = _spec("--no-such-option")
    report = run_job(spec, 10, tmp_path / "w", cores=2, max_attempts=2)
    assert not report.complete and report.events_done == 0
    assert set(report.abandoned) == {0, 1} and report.failed_runs == 4
    assert "exit status 2" in report.failures[0]


def test_missing_command_is_a_task_error(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "x",
            "command": [str(tmp_path / "absent"), "{first}", "{count}", "{output}"],
            "cpu_work_per_event": 1.0,
            "max_events": 10,
        }
    )
    with pytest.raises(TaskError, match="absent"):
        run_job(spec, 10, tmp_path / "w", cores=1)


def test_stop_request_cuts_running_tasks_and_resume_completes(tmp_path: Path) -> None:
    stop = StopRequest()
    calls = 0

    def probe() -> str | None:
        nonlocal calls
        calls += 1
        return "shutdowntime changed" if calls >= 2 else None

    spec = _spec("--sleep", "0.3")
    report = run_job(spec, 40, tmp_path / "w", cores=2, stop=stop, should_stop=probe, grace=0.2)
    assert not report.complete and report.stopped == "shutdowntime changed"
    assert report.cut_runs >= 1
    done = _events(report.output)
    assert len(done) == report.events_done == len(set(done)) < 40
    resumed = run_job(_spec(), 40, tmp_path / "w", cores=2)  # same job, faster events
    assert resumed.complete and resumed.resumed_tasks == report.tasks_committed
    assert _events(resumed.output) == list(range(40))


def test_journal_for_another_job_is_refused(tmp_path: Path) -> None:
    run_job(_spec(), 5, tmp_path / "w", cores=1)
    with pytest.raises(JournalError, match="belongs to job"):
        run_job(_spec(name="other"), 5, tmp_path / "w", cores=1)


def _driver(workdir: Path, events: int, *extra: str, grace: float = 5.0) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, DRIVER, str(workdir), str(events), "2", str(grace), *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_commits(workdir: Path, n: int, timeout: float = 30.0) -> None:
    journal = workdir / "journal.jsonl"
    eventually(
        f"{n} commits",
        lambda: journal.exists() and journal.read_text().count("\n") >= n + 1,
        timeout,
    )


def _tasks_in(workdir: Path) -> list[int]:
    """PIDs of the live (not zombie) processes whose command line names ``workdir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # gone meanwhile
            continue
        if state != "Z" and any(str(workdir).encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


def test_sigkilled_gather_restarts_without_loss_or_repetition(tmp_path: Path) -> None:
    work = tmp_path / "w"
    runs = tmp_path / "runs"
    extra = ("--sleep", "0.05", "--runs", str(runs))
    proc = _driver(work, 60, *extra)
    _wait_commits(work, 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    committed_before = {
        json.loads(x)["first"]
        for x in (work / "journal.jsonl").read_text().splitlines()[1:]
        if x.endswith("}")
    }
    # PDEATHSIG: the orphaned tasks go with their gather, and nothing is left
    # that could start another.
    eventually("the orphaned tasks to be gone", lambda: not _tasks_in(work), 10)
    proc = _driver(work, 60, *extra)
    out, _ = proc.communicate(timeout=60)
    report = json.loads(out)
    assert report["complete"] and report["resumed_tasks"] >= 5
    assert _events(work / "events.out") == list(range(60))
    # a committed task never runs again
    all_runs = _runs(runs)
    for first in committed_before:
        assert all_runs.count(first) == 1


def test_sigterm_mid_job_stops_dispatch_and_keeps_commits(tmp_path: Path) -> None:
    work = tmp_path / "w"
    proc = _driver(work, 200, "--sleep", "0.05", grace=3.0)
    _wait_commits(work, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert report["stopped"] == "SIGTERM" and not report["complete"]
    # running tasks (0.1 s each) finish within the 3 s grace: nothing cut
    assert report["cut_runs"] == 0
    done = _events(work / "events.out")
    assert len(done) == len(set(done)) == report["events_done"] >= 6
    proc = _driver(work, 200, "--sleep", "0.0")
    report = json.loads(proc.communicate(timeout=60)[0])
    assert report["complete"]
    assert _events(work / "events.out") == list(range(200))


def test_without_pidfd_children_are_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    report = run_job(_spec(), 20, tmp_path / "w", cores=2, poll_interval=0.01)
    assert report.complete and _events(report.output) == list(range(20))


def test_stop_from_another_thread_wakes_the_gather_with_its_grace(tmp_path: Path) -> None:
    # Nothing else would wake the gather (no timeouts, no probe) and the run's
    # own grace is a minute: only the request's wakeup and grace end the run.
    # The request comes once both tasks have started (each logs its start).
    stop = StopRequest()
    runs = tmp_path / "runs"

    def stop_once_both_run() -> None:
        try:
            eventually("both tasks to start", lambda: stop.requested or len(_runs(runs)) >= 2, 30)
        finally:
            stop.request("api", 0.0)

    stopper = threading.Thread(target=stop_once_both_run)
    stopper.start()
    try:
        spec = _spec("--sleep", "30", "--runs", str(runs))
        report = run_job(spec, 10, tmp_path / "w", cores=2, stop=stop, grace=60)
    finally:
        stop.request("api", 0.0)  # a run_job that raised must not leave the thread waiting
        stopper.join(timeout=40)
    assert report.stopped == "api" and report.cut_runs == 2 and report.events_done == 0


def test_no_task_starts_that_cannot_finish_before_the_deadline(tmp_path: Path) -> None:
    deadline = time.monotonic() + 0.5
    report = run_job(_spec(), 10, tmp_path / "w", cores=2, deadline=deadline, task_estimate=5.0)
    assert report.task_runs == 0 and report.events_done == 0
    assert report.stopped is not None and "no time for another task" in report.stopped


def test_deadline_stops_the_job_with_its_commits_and_resume_completes(tmp_path: Path) -> None:
    spec = _spec("--sleep", "0.05")
    deadline = time.monotonic() + 0.8
    report = run_job(spec, 60, tmp_path / "w", cores=2, deadline=deadline)
    assert not report.complete and report.stopped is not None and "lease" in report.stopped
    done = _events(report.output)
    assert len(done) == len(set(done)) == report.events_done > 0
    resumed = run_job(_spec(), 60, tmp_path / "w", cores=2)
    assert resumed.complete and _events(resumed.output) == list(range(60))
