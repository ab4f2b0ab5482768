"""Confinement of tasks: the job user, the job's memory limit, hostile outputs.

The tests that switch users need root; the memory ones also need a memory
cgroup hierarchy (v2, or v1 as on hybrid hosts) and clean it up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from runner import task_launch
from runner.confine import Confinement
from runner.exceptions import ConfinementError, TaskError
from runner.job_user import JobUser, check_reachable, job_user_for_node
from runner.memory_cgroup import find_memory_hierarchy
from runner.node_run import run_job
from runner.service import job_service_from_config
from runner.spec import JobSpec, parse_spec
from swarm_testing.waiting import eventually

HERE = Path(__file__).parent
PROBE = str(HERE / "probe_task.sh")
ROOT = HERE.parent.parent
MiB = 1 << 20


def _spec(*extra: str, **kw: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "probe",
        "command": ["/bin/sh", PROBE, "{first}", "{count}", "{output}", *extra],
        "cpu_work_per_event": 1.0,
        "max_events": 10**6,
        "events_per_task": 5,
    }
    data.update(kw)
    return parse_spec(data)


def _events(path: str | Path) -> list[int]:
    return [int(line.split()[1]) for line in Path(path).read_text().splitlines()]


def _nobody() -> JobUser:
    return JobUser.lookup("nobody")


# --- pure parts ---------------------------------------------------------------

MOUNTS_HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_memory_hierarchy_prefers_v2_with_the_memory_controller() -> None:
    v2_mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
    h = find_memory_hierarchy(v2_mounts, lambda mp: "cpuset cpu io memory pids\n")
    assert h is not None and (h.version, h.mountpoint) == (2, Path("/sys/fs/cgroup"))
    # hybrid: the unified mount has no controllers, memory is bound to v1
    h = find_memory_hierarchy(MOUNTS_HYBRID, lambda mp: "")
    assert h is not None and (h.version, h.mountpoint) == (1, Path("/sys/fs/cgroup/memory"))
    assert find_memory_hierarchy("proc /proc proc rw 0 0\n", lambda mp: "memory") is None


def test_job_user_only_when_the_node_is_root() -> None:
    assert job_user_for_node("nobody", euid=1000) is None
    assert job_user_for_node(None, euid=0) is None
    user = job_user_for_node("nobody", euid=0)
    assert user is not None and user.uid != 0 and user.name == "nobody"
    with pytest.raises(ConfinementError, match="no-such-user-here"):
        job_user_for_node("no-such-user-here", euid=0)


def test_unreachable_work_directory_is_named(open_dir: Path) -> None:
    closed = open_dir / "closed"
    (closed / "w").mkdir(parents=True)
    closed.chmod(0o700)
    with pytest.raises(ConfinementError, match=re.escape(f"{closed} is mode 700")):
        check_reachable(closed / "w", JobUser("x", 54321, 54321))


def test_symlinked_output_is_refused_not_gathered(tmp_path: Path) -> None:
    # A task that plants a symlink to a node file as its output.
    spec = _spec(
        command=["/bin/sh", "-c", 'ln -s /etc/passwd "$3"', "sh", "{first}", "{count}", "{output}"]
    )
    report = run_job(spec, 5, tmp_path / "w", cores=1, max_attempts=1)
    assert not report.complete and report.events_done == 0
    assert "not a regular file" in report.failures[0]
    assert Path(report.output).read_bytes() == b""
    assert not list((tmp_path / "w" / "tasks").glob("*.out"))


def test_memory_falls_back_to_rlimit_without_cgroups(open_dir: Path, launcher: str) -> None:
    conf = Confinement(cgroup_parent=None)
    report = run_job(_spec(), 10, open_dir / "w", cores=2, memory=256 * MiB, confinement=conf)
    assert report.complete
    assert report.memory_limit.startswith(f"RLIMIT_DATA {128 * MiB} bytes per task")
    assert "cgroups are disabled" in report.memory_limit
    # a task allocating beyond its share fails (dash even segfaults), it does not hang
    report = run_job(
        _spec("300"), 5, open_dir / "x", cores=2, memory=64 * MiB, confinement=conf, max_attempts=1
    )
    assert not report.complete and report.events_done == 0
    assert re.search(r"exit status [1-9]|killed by signal", report.failures[0])


# --- as root --------------------------------------------------------------------


def _log(work: Path, task: int = 0, attempt: int = 1) -> str:
    return (work / "tasks" / f"{task:06d}.{attempt}.log").read_text()


@pytest.fixture(params=["setpriv", "preexec"])
def launcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of starting a task: exec'd sh + setpriv, and the preexec_fn fallback."""
    if request.param == "preexec":
        monkeypatch.setattr("runner.task_launch._setpriv", lambda: None)
    elif task_launch._setpriv() is None:
        _missing_setpriv()
    return str(request.param)


def _missing_setpriv() -> None:
    if os.environ.get("SWARM_REQUIRE_ALL") == "1":
        pytest.fail("setpriv with --pdeathsig (util-linux >= 2.33) is required")
    pytest.skip("no setpriv with --pdeathsig")


def test_tasks_run_as_the_job_user(as_root: None, open_dir: Path, launcher: str) -> None:
    nobody = _nobody()
    work = open_dir / "w"
    conf = Confinement(user=nobody, cgroup_parent=None)
    report = run_job(_spec(), 12, work, cores=2, confinement=conf)
    assert report.complete and _events(report.output) == list(range(12))
    assert report.user.startswith("nobody (uid")
    for task in range(3):
        who = _log(work, task).splitlines()[0]
        assert f"uid={nobody.uid} gid={nobody.gid} groups={nobody.gid} " in who
        assert f"home={work / 'scratch'} cwd={work / 'scratch'}" in who
    assert nobody.uid != 0
    # the job user writes its parts; committed outputs are the gather's, read-only to it
    assert os.stat(work / "parts").st_uid == nobody.uid
    out = os.stat(work / "tasks" / "000000.out")
    assert (out.st_uid, out.st_mode & 0o777) == (0, 0o644)
    assert os.stat(work / "tasks").st_uid == 0


def test_command_the_job_user_cannot_run_is_refused(as_root: None, open_dir: Path) -> None:
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    script = private / "simulate"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    conf = Confinement(user=_nobody(), cgroup_parent=None)
    spec = _spec(command=[str(script), "{first}", "{count}", "{output}"])
    with pytest.raises(TaskError, match=f"cannot start .*{private} is mode 700"):
        run_job(spec, 5, open_dir / "w", cores=1, confinement=conf)
    private.chmod(0o755)
    script.chmod(0o700)
    with pytest.raises(TaskError, match="job user nobody may not execute"):
        run_job(spec, 5, open_dir / "w", cores=1, confinement=conf)


def test_unreachable_work_directory_refuses_the_job(as_root: None, tmp_path: Path) -> None:
    # tmp_path's parents are mode 0700: nobody cannot reach it
    conf = Confinement(user=_nobody(), cgroup_parent=None)
    with pytest.raises(ConfinementError, match="cannot reach"):
        run_job(_spec(), 5, tmp_path / "w", cores=1, confinement=conf)


def test_job_memory_cgroup_limits_and_is_removed(
    cgroup_parent: tuple[str, Path], open_dir: Path, launcher: str
) -> None:
    name, base = cgroup_parent
    conf = Confinement(user=_nobody(), cgroup_parent=name)
    work = open_dir / "w"
    report = run_job(_spec(), 10, work, cores=2, memory=128 * MiB, confinement=conf)
    assert report.complete and report.memory_kills == 0
    assert (
        report.memory_limit.startswith("cgroup v") and f"{128 * MiB} bytes" in report.memory_limit
    )
    # the task ran inside the job's cgroup, which is gone afterwards
    m = re.search(rf"/{name}/(probe\.{os.getpid()}\.\d+)$", _log(work), re.M)
    assert m is not None, _log(work)
    assert not (base / m.group(1)).exists()
    # the descriptor the task joined the cgroup through does not reach the job
    assert "cgroup.procs" not in _log(work)
    assert [p for p in base.iterdir() if p.is_dir()] == []


def test_task_over_the_memory_limit_is_killed_and_reported(
    cgroup_parent: tuple[str, Path], open_dir: Path, launcher: str
) -> None:
    name, base = cgroup_parent
    conf = Confinement(user=_nobody(), cgroup_parent=name)
    spec = _spec("200")  # holds 200 MB (twice that while building it); the job gets 64 MiB
    report = run_job(
        spec, 5, open_dir / "w", cores=1, memory=64 * MiB, confinement=conf, max_attempts=2
    )
    assert not report.complete and report.events_done == 0
    assert report.failed_runs == 2 and report.memory_kills >= 1
    assert "killed by the memory limit" in report.failures[0], report.failures
    assert list(report.abandoned) == [0]
    assert [p for p in base.iterdir() if p.is_dir()] == []


def test_stale_cgroup_of_a_dead_gather_is_swept(
    cgroup_parent: tuple[str, Path], open_dir: Path
) -> None:
    name, base = cgroup_parent
    proc = subprocess.Popen(["true"])  # its pid is gone once waited for
    proc.wait()
    base.mkdir(exist_ok=True)
    stale = base / f"probe.{proc.pid}.1"
    stale.mkdir()
    conf = Confinement(cgroup_parent=name)
    report = run_job(_spec(), 5, open_dir / "w", cores=1, memory=64 * MiB, confinement=conf)
    assert report.complete and not stale.exists()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped


GATHER_AS_NOBODY = """
import sys
import runner.task_launch
from runner.confine import Confinement
from runner.job_user import JobUser
if sys.argv[2] == "preexec":
    runner.task_launch._setpriv = lambda: None
from runner.node_run import run_job
from runner.spec import parse_spec
spec = parse_spec({
    "name": "sleepy",
    "command": ["/bin/sh", "-c", 'echo $$ > "$3.pid"; exec sleep 60', "sh",
                "{first}", "{count}", "{output}"],
    "cpu_work_per_event": 1.0, "max_events": 10, "events_per_task": 5,
})
conf = Confinement(user=JobUser.lookup("nobody"), cgroup_parent=None)
run_job(spec, 10, sys.argv[1], cores=2, confinement=conf)
"""


def test_sigkilled_gather_takes_job_user_tasks_with_it(
    as_root: None, open_dir: Path, launcher: str
) -> None:
    # The kernel clears PR_SET_PDEATHSIG on a credential change: it must be set after setuid.
    work = open_dir / "w"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", GATHER_AS_NOBODY, str(work), launcher]
    gather = subprocess.Popen(argv, env=env)
    pids: list[int] = []
    try:

        def started() -> bool:
            files = list((work / "parts").glob("*.pid")) if (work / "parts").exists() else []
            pids[:] = [int(t) for f in files if (t := f.read_text().strip())]
            return len(pids) == 2

        eventually("both tasks to start", started, 20)
        assert all(os.stat(f"/proc/{p}").st_uid == _nobody().uid for p in pids)
    finally:
        gather.send_signal(signal.SIGKILL)
        gather.wait()
    try:
        eventually("the tasks to go with their gather", lambda: not any(map(_alive, pids)), 10)
    finally:
        for p in pids:  # clean up before failing
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# --- defect 6: `[runner] memory = "200M"` silently turned confinement off -------------


def test_memory_200M_makes_a_cgroup(cgroup_parent: tuple[str, Path], open_dir: Path) -> None:
    name, base = cgroup_parent
    table = {
        "memory": "200M",
        "cores": 1,
        "power_per_core": 10.0,
        "time_left": 600,
        "cgroup_parent": name,
        "job_user": "nobody",
    }
    service = job_service_from_config(table, open_dir, environ={})
    try:
        lease = service.lease_at(0.0)
        assert lease.memory == 200 * MiB and lease.sources["memory"] == "config memory"
        assert lease.warnings == ()
        spec = "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in {
                "name": "probe",
                "command": ["/bin/sh", PROBE, "{first}", "{count}", "{output}"],
                "cpu_work_per_event": 0.001,
                "max_events": 5,
                "events_per_task": 5,
            }.items()
        )
        job = service.submit(spec)
        service.start()
        eventually("the job to be done", lambda: service.job(job)["state"] == "done", 30)
        report = service.job(job)["report"]
    finally:
        service.close()
    assert report["complete"] and report["memory_limit"].startswith("cgroup v")
    assert f" {200 * MiB} bytes for the job)" in report["memory_limit"]
    work = open_dir / "jobs" / "work" / job
    assert re.search(rf"/{name}/probe\.{os.getpid()}\.\d+$", _log(work), re.M), _log(work)
    assert [p for p in base.iterdir() if p.is_dir()] == []


ESCAPE = (
    'setsid sh -c \'echo $$ > "$1"; exec sleep 60\' sh "$3.pid" &\n'
    'while [ ! -s "$3.pid" ]; do sleep 0.01; done\n'
    'echo "event $1" > "$3"\n'
)


@pytest.mark.parametrize("mode", ["job user, no cgroup", "node's user, no cgroup", "cgroup"])
def test_a_setsid_child_does_not_outlive_its_job(
    as_root: None, open_dir: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    memory = None
    if mode == "cgroup":
        parent, _ = request.getfixturevalue("cgroup_parent")
        conf = Confinement(user=_nobody(), cgroup_parent=parent)
        memory = 256 * MiB
    elif mode == "job user, no cgroup":
        conf = Confinement(user=_nobody(), cgroup_parent=None)
    else:
        conf = Confinement(user=None, cgroup_parent=None)
    spec = _spec(command=["/bin/sh", "-c", ESCAPE, "sh", "{first}", "{count}", "{output}"])
    work = open_dir / "w"
    report = run_job(spec, 1, work, cores=1, memory=memory, confinement=conf)
    pid = int(next((work / "parts").glob("*.pid")).read_text())
    try:
        assert report.complete
        assert os.getsid(0) != pid  # the child did leave the task's session
        assert not _alive(pid), f"{mode}: the task's setsid child outlived its job"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_memory_kills_counts_an_oom_kill_of_a_child_even_if_the_task_exits_0(
    cgroup_parent: tuple[str, Path], open_dir: Path
) -> None:
    name, _ = cgroup_parent
    conf = Confinement(user=_nobody(), cgroup_parent=name)
    # A child of the task holds 200 MB (the job gets 64 MiB) and is killed for it;
    # the task itself carries on and exits 0.
    script = (
        "(x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo held ${#x})\n"
        'echo "child: $?"\n'
        'echo "event $1" > "$3"\n'
    )
    spec = _spec(command=["/bin/sh", "-c", script, "sh", "{first}", "{count}", "{output}"])
    work = open_dir / "w"
    report = run_job(spec, 1, work, cores=1, memory=64 * MiB, confinement=conf)
    assert report.complete and report.failed_runs == 0
    assert "child: 137" in _log(work), _log(work)  # SIGKILLed by the kernel
    assert report.memory_kills >= 1


def test_the_end_of_one_job_does_not_sweep_another_jobs_tasks(
    as_root: None, open_dir: Path
) -> None:
    # Two gathers in one process, tasks as nobody, no cgroup: both sweep this
    # process's children of the job user, and must spare each other's tasks.
    conf = Confinement(user=_nobody(), cgroup_parent=None)
    slow = _spec(
        name="slow",
        command=[
            *("/bin/sh", "-c", 'sleep 1; echo "event $1" > "$3"', "sh"),
            *("{first}", "{count}", "{output}"),
        ],
        events_per_task=1,
    )
    reports: list[Any] = []
    thread = threading.Thread(
        target=lambda: reports.append(run_job(slow, 2, open_dir / "b", cores=1, confinement=conf))
    )
    thread.start()
    try:
        eventually(
            "the slow job to start", lambda: list((open_dir / "b" / "tasks").glob("*.log")), 10
        )
        assert run_job(_spec(), 5, open_dir / "a", cores=1, confinement=conf).complete
    finally:
        thread.join(timeout=30)
    (report,) = reports
    assert report.complete and report.failed_runs == 0, report.failures
