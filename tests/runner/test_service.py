"""The daemon's job service: submission, the masonry thread, stop and resume."""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.confine import Confinement
from runner.exceptions import (
    JobSpecError,
    QueueBusy,
    RunnerConfigError,
    RunnerError,
    UnknownJob,
)
from runner.lease import Lease
from runner.masonry import run_pilot
from runner.service import JobService, job_service_from_config
from swarm_testing.waiting import eventually

SYNTH = str(Path(__file__).with_name("synth_events.py"))


def spec_text(name: str, *extra: str, max_events: int = 20, **kw: Any) -> str:
    fields: dict[str, Any] = {
        "name": name,
        "command": [sys.executable, SYNTH, "{first}", "{count}", "{output}", *extra],
        "cpu_work_per_event": 0.001,
        "max_events": max_events,
        "min_events": 1,
        "events_per_task": 5,
        **kw,
    }
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


def fixed_lease(time_left: float = 3600.0) -> Callable[[float], Lease]:
    t0 = time.monotonic()
    lease = Lease(
        cores=2, power_per_core=10.0, time_left=time_left, memory=None, now=t0, sources={}
    )
    return lease.at


@pytest.fixture
def service(tmp_path: Path) -> Iterator[JobService]:
    s = JobService(
        tmp_path / "queue",
        tmp_path / "work",
        fixed_lease(),
        confinement=Confinement(user=None),
        recheck=0.2,
    )
    try:
        yield s
    finally:
        s.close()


def state(service: JobService, job_id: str) -> str:
    s: str = service.job(job_id)["state"]
    return s


def test_submit_validates_and_writes_atomically(service: JobService) -> None:
    ids = [service.submit(spec_text(f"j{i}")) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5  # submission order is name order
    files = sorted(p.name for p in service.queue.iterdir() if p.is_file())
    assert files == [".lock", *(f"{i}.toml" for i in ids)]  # no temporary files left
    assert (service.queue / f"{ids[0]}.toml").read_text() == spec_text("j0")
    assert [j["state"] for j in service.jobs()] == ["queued"] * 5
    assert service.job(ids[2])["name"] == "j2"
    with pytest.raises(JobSpecError, match="'command'"):
        service.submit('name = "x"\ncpu_work_per_event = 1.0\nmax_events = 5\n')
    with pytest.raises(JobSpecError, match="not valid TOML"):
        service.submit("name = \n")
    with pytest.raises(JobSpecError, match="larger than"):
        service.submit("# " + "x" * 70_000 + "\n" + spec_text("big"))
    assert len(service.jobs()) == 5


def test_unknown_and_malformed_ids(service: JobService) -> None:
    with pytest.raises(UnknownJob, match="no job"):
        service.job("20250101-000000.000-abcdef")
    with pytest.raises(UnknownJob, match="not a job id"):
        service.job("../../etc/passwd")


def test_masonry_thread_runs_what_is_queued_and_waits_for_more(service: JobService) -> None:
    first = service.submit(spec_text("a"))
    service.start()
    eventually("the first job", lambda: state(service, first) == "done", 30)
    report = service.job(first)["report"]
    assert report["complete"] and report["events_done"] == 20
    # the thread keeps serving: a later submission runs too
    second = service.submit(spec_text("b", max_events=10))
    eventually("the second job", lambda: state(service, second) == "done", 30)
    assert service.status()["running"]
    done = (service.workroot / second / "events.out").read_text().splitlines()
    assert done == [f"event {n}" for n in range(10)]


def test_rejected_and_refused_jobs_are_reported(service: JobService, tmp_path: Path) -> None:
    # dropped in by hand, bypassing submit's validation
    (service.queue / "manual-bad.toml").write_text('name = "bad"\n')
    huge = service.submit(spec_text("huge", max_events=10**9, min_events=10**9))
    service.start()
    eventually("the rejection", lambda: state(service, "manual-bad") == "rejected", 30)
    assert "'command'" in service.job("manual-bad")["reason"]
    eventually("the refusal", lambda: "refused" in service.job(huge), 30)
    assert state(service, huge) == "queued" and "refused" in service.job(huge)["refused"]


def test_stop_cuts_running_tasks_and_the_job_resumes(service: JobService) -> None:
    job = service.submit(spec_text("slow", "--sleep", "0.05", max_events=60))
    service.start()
    eventually("two commits", lambda: service.job(job).get("tasks_committed", 0) >= 2, 30)
    service.stop(grace=0)  # returns once the masonry thread has ended
    assert not service.status()["running"]
    info = service.job(job)
    assert info["state"] == "queued" and info["tasks_committed"] >= 2
    report = json.loads((service.workroot / job / "report.json").read_text())
    assert report["stopped"] == "job service stopped" and report["cut_runs"] >= 1
    service.start()  # resumes from the journal, committed tasks are not rerun
    eventually("the resumed job", lambda: state(service, job) == "done", 60)
    final = service.job(job)["report"]
    assert final["complete"] and final["resumed_tasks"] >= 2
    lines = (service.workroot / job / "events.out").read_text().splitlines()
    assert lines == [f"event {n}" for n in range(60)]


def test_a_lease_moved_earlier_stops_the_job(tmp_path: Path) -> None:
    ends = [time.monotonic() + 3600.0]

    def lease_at(now: float) -> Lease:
        return Lease(
            cores=2,
            power_per_core=10.0,
            time_left=max(0.0, ends[0] - now),
            memory=None,
            now=now,
            sources={"time_left": "test shutdowntime"},
        )

    s = JobService(tmp_path / "q", tmp_path / "w", lease_at, confinement=Confinement())
    try:
        job = s.submit(spec_text("long", "--sleep", "0.1", max_events=400))
        s.start()
        eventually("a commit", lambda: s.job(job).get("tasks_committed", 0) >= 1, 30)
        ends[0] = time.monotonic() + 1.0  # the site announces an early shutdown
        eventually("the job to stop", lambda: (s.workroot / job / "report.json").exists(), 30)
        report = json.loads((s.workroot / job / "report.json").read_text())
        assert (
            "the lease now ends" in report["stopped"] and "test shutdowntime" in report["stopped"]
        )
        assert not report["complete"] and report["events_done"] > 0
    finally:
        s.close()
    assert state(s, job) == "queued"  # back in the queue, resumable


def test_service_from_node_config(tmp_path: Path) -> None:
    s = job_service_from_config(
        {"cores": 2, "power_per_core": 10.0, "time_left": 600}, tmp_path, environ={}
    )
    assert s.queue == tmp_path / "jobs" / "queue" and s.queue.is_dir()
    lease = s.lease_at(0.0)
    assert (lease.cores, lease.power_per_core) == (2, 10.0)
    assert 590 < lease.time_left <= 600
    custom = job_service_from_config(
        {"queue": str(tmp_path / "q"), "cgroup_parent": "", "job_user": "nobody"},
        tmp_path,
        environ={},
    )
    assert custom.queue == tmp_path / "q" and custom.confinement is not None
    assert custom.confinement.cgroup_parent is None
    with pytest.raises(RunnerError, match=r"runner\.queu: unknown key"):
        job_service_from_config({"queu": "x"}, tmp_path)
    with pytest.raises(RunnerError, match=r"runner\.grace"):
        job_service_from_config({"grace": "soon"}, tmp_path)
    s.close()
    custom.close()


def test_a_queue_has_one_owner_and_what_a_dead_one_ran_is_queued_again(tmp_path: Path) -> None:
    first = JobService(tmp_path / "q", tmp_path / "w", fixed_lease())
    try:
        with pytest.raises(
            QueueBusy, match=rf"in use by another pilot or job service \(pid {os.getpid()}\)"
        ):
            JobService(tmp_path / "q", tmp_path / "w2", fixed_lease())
        with pytest.raises(QueueBusy):  # a pilot too
            run_pilot(tmp_path / "q", tmp_path / "w3", fixed_lease(), time.monotonic)
        job = first.submit(spec_text("a"))
    finally:
        first.close()
    # as if its owner had died while the job ran
    os.replace(first.queue / f"{job}.toml", first.queue / "running" / f"{job}.toml")
    second = JobService(tmp_path / "q", tmp_path / "w", fixed_lease())
    try:
        assert second.recovered == [f"{job}.toml"] and state(second, job) == "queued"
    finally:
        second.close()


# --- defect 8: `[runner] cores = -1` was accepted ----------------------------------


@pytest.mark.parametrize(
    ("key", "toml_value"),
    [
        ("cores", "-1"),
        ("cores", "0"),
        ("cores", "1.5"),
        ("cores", '"2"'),
        ("cores", "true"),
        ("cores", "1000000"),
        ("power_per_core", "nan"),
        ("power_per_core", "inf"),
        ("power_per_core", "-10.0"),
        ("power_per_core", "0"),
        ("power_per_core", '"fast"'),
        ("time_left", "nan"),
        ("time_left", "inf"),
        ("time_left", "-5"),
        ("time_left", "0"),
        ("time_left", "1e300"),
        ("shutdowntime", "-1"),
        ("shutdowntime", "0"),
        ("shutdowntime", "nan"),
        ("shutdowntime", "1e300"),
        ("memory", '"lots"'),
        ("memory", "0"),
        ("memory", "-1"),
        ("memory", '"1e400G"'),
        ("memory", "nan"),
        ("memory", "true"),
        ("grace", "nan"),
        ("grace", "inf"),
        ("grace", "-1"),
        ("grace", '"soon"'),
        ("grace", "1e9"),
        ("cgroup_parent", '"../../etc"'),
        ("cgroup_parent", "5"),
        ("job_user", "0"),
        ("queue", "[]"),
    ],
)
def test_runner_cores_minus_1_and_every_bad_runner_value_is_a_one_line_error_naming_the_key(
    tmp_path: Path, key: str, toml_value: str
) -> None:
    table = tomllib.loads(f"[runner]\n{key} = {toml_value}\n")["runner"]
    with pytest.raises(RunnerConfigError) as info:
        job_service_from_config(table, tmp_path, environ={})
    message = str(info.value)
    assert message.startswith(f"runner.{key}: "), message
    assert "expected" in message or "at most" in message  # and what it accepts
    assert "\n" not in message and len(message) < 200
    assert not (tmp_path / "jobs").exists()  # nothing was set up


def test_runner_values_in_their_bounds_are_taken(tmp_path: Path) -> None:
    s = job_service_from_config(
        {"cores": 4096, "power_per_core": 0.5, "time_left": 60, "memory": "10G", "grace": 0},
        tmp_path,
        environ={},
    )
    try:
        lease = s.lease_at(0.0)
        assert (lease.cores, lease.power_per_core, lease.memory) == (4096, 0.5, 10 << 30)
        assert lease.warnings == () and s.grace == 0.0
    finally:
        s.close()
