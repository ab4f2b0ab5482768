"""The job service as a process of its own, over HTTP on 127.0.0.1: what a hostile
spec does to its memory, and what a SIGKILL mid-job does to the job."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.scatter import MAX_TASKS
from runner.spec import MAX_EVENTS, MIN_WORK
from swarm_testing.waiting import eventually

HERE = Path(__file__).parent
DRIVER = str(HERE / "service_driver.py")
SYNTH = str(HERE / "synth_events.py")
ROOT = HERE.parent.parent
TOKEN = "s3cret"
MB = 1 << 20
# The node's own jobs: tasks keep the test's user, no cgroup (nothing to set up).
TABLE: dict[str, Any] = {
    "cores": 2,
    "power_per_core": 10.0,
    "time_left": 7 * 86400,
    "job_user": "",
    "cgroup_parent": "",
    "grace": 0,
}


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str

    def call(self, method: str, path: str, body: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else body.encode(),
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def rss(self) -> int:
        """Resident memory in bytes, from /proc/PID/status."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def daemon(data_dir: Path, table: dict[str, Any] = TABLE) -> Iterator[Daemon]:
    """The service driver running on ``data_dir``; stopped (or killed) afterwards."""
    port_file = data_dir / "port"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, DRIVER, str(data_dir), json.dumps(table)], env=env)
    try:

        def started() -> bool:
            assert proc.poll() is None, f"the job service exited with {proc.returncode}"
            return port_file.exists()

        eventually("the job service to start", started, 20)
        yield Daemon(proc, f"http://127.0.0.1:{port_file.read_text().strip()}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spec(**fields: Any) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


# --- defect 4: one job spec kills the daemon -------------------------------------------

HOSTILE = spec(
    name="evil",
    command=["/bin/true", "{first}", "{count}", "{output}"],
    cpu_work_per_event=1e-300,
    max_events=2**63 - 1,
)
ONE_LINE_PER_TASK = ["/bin/sh", "-c", 'echo "$1 $2" > "$3"', "sh", "{first}", "{count}", "{output}"]


def test_one_job_spec_does_not_kill_the_daemon(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        assert d.call("GET", "/v1/jobs") == (200, [])
        base = d.rss()
        status, answer = d.call("POST", "/v1/jobs", HOSTILE)
        # The daemon's memory stays bounded and it answers, whatever it did with the spec.
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            grown = d.rss() - base
            if grown > 100 * MB:
                d.proc.kill()  # before it eats the machine
                pytest.fail(f"the job service grew {grown // MB} MB after one spec ({status})")
            assert d.call("GET", "/v1/jobs")[0] == 200
            time.sleep(0.05)
        assert (status, d.proc.poll()) == (400, None)
        assert answer["error"].startswith("job spec field 'cpu_work_per_event'")
        assert "\n" not in answer["error"]

        # A spec at every bound is accepted, and running it costs no memory per event
        # or task: 10**12 events in 10**6 tasks, handed out lazily (a list of the
        # tasks alone would be some 36 MB).
        base = d.rss()
        status, job = d.call(
            "POST",
            "/v1/jobs",
            spec(
                name="at-the-bounds",
                command=ONE_LINE_PER_TASK,
                cpu_work_per_event=MIN_WORK,
                max_events=MAX_EVENTS,
                events_per_task=MAX_EVENTS // MAX_TASKS,
            ),
        )
        assert status == 201, job

        def committed() -> int:
            info: dict[str, Any] = d.call("GET", job["url"])[1]
            return int(info.get("tasks_committed", 0))

        eventually("the job to commit tasks", lambda: committed() >= 20, 30)
        info = d.call("GET", job["url"])[1]
        assert info["state"] == "running"
        journal = (tmp_path / "jobs" / "work" / job["id"] / "journal.jsonl").read_text()
        assert json.loads(journal.splitlines()[0])["plan"]["events"] == MAX_EVENTS
        assert d.rss() - base < 16 * MB
        assert d.proc.poll() is None


# --- defect 5: crash recovery is manual --------------------------------------------------


def test_crash_recovery_is_not_manual_a_sigkilled_service_resumes_its_job(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.log"
    text = spec(
        name="synth",
        command=[
            *(sys.executable, SYNTH, "{first}", "{count}", "{output}"),
            *("--sleep", "0.05", "--runs", str(runs)),
        ],
        cpu_work_per_event=0.001,
        max_events=60,
        events_per_task=5,
    )
    work = tmp_path / "jobs" / "work"
    with daemon(tmp_path) as d:
        status, job = d.call("POST", "/v1/jobs", text)
        assert status == 201, job
        eventually(
            "commits", lambda: d.call("GET", job["url"])[1].get("tasks_committed", 0) >= 2, 30
        )
        d.proc.send_signal(signal.SIGKILL)  # a node crash, mid-job
        d.proc.wait()
    assert (tmp_path / "jobs" / "queue" / "running" / f"{job['id']}.toml").exists()
    journal = (work / job["id"] / "journal.jsonl").read_text().splitlines()[1:]
    committed_before = {json.loads(line)["first"] for line in journal}
    assert len(committed_before) >= 2
    runs_before = len(runs.read_text().splitlines())

    with daemon(tmp_path) as d:
        # back in the queue at once, then resumed from its journal
        eventually("the resumed job", lambda: d.call("GET", job["url"])[1]["state"] == "done", 30)
        report = d.call("GET", job["url"])[1]["report"]
    assert report["complete"] and report["resumed_tasks"] == len(committed_before)
    events = (work / job["id"] / "events.out").read_text().splitlines()
    assert events == [f"event {n}" for n in range(60)]  # each event exactly once
    rerun = [int(line.split()[0]) for line in runs.read_text().splitlines()[runs_before:]]
    assert not committed_before & set(rerun), "a committed task ran again"
    journal = (work / job["id"] / "journal.jsonl").read_text().splitlines()[1:]
    tasks = [json.loads(line)["task"] for line in journal]
    assert sorted(tasks) == list(range(12))  # each task committed exactly once
