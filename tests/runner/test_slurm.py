"""A real single-host Slurm: ``swarm pilot`` as a whole-node batch job.

The fixture starts munged, slurmctld and slurmd on this machine (a minimal
slurm.conf in a tmp dir with its own state, spool and ports, the node named
``localhost`` with this machine's CPUs, process tracking without cgroups),
and always stops them by PID and removes their files, also on failure.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SYNTH = str(Path(__file__).with_name("synth_events.py"))
SWARM = str(Path(sys.executable).with_name("swarm"))

pytestmark = pytest.mark.slurm


@dataclass(frozen=True)
class Slurm:
    root: Path
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 10.0) -> str:
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, check=True, timeout=timeout
        ).stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job_id)
        return dict(w.split("=", 1) for w in out.split() if "=" in w)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _wait_for(what: str, check: object, timeout: float, *, logs: Path) -> None:
    assert callable(check)
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            text = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs.glob("*.log"))
            pytest.fail(f"{what} not within {timeout} s\n{text}")
        time.sleep(0.2)


@pytest.fixture
def slurm() -> Iterator[Slurm]:
    root = Path(tempfile.mkdtemp(prefix="swarm-slurm-"))
    root.chmod(0o755)
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=swarmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=localhost CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in ("SLURM_JOB_ID", "MACHINEFEATURES", "JOBFEATURES"):
        env.pop(name, None)
    daemons: list[subprocess.Popen[bytes]] = []
    cluster = Slurm(root, env)
    try:
        munged = [_sbin("munged"), "-F", f"--key-file={key}", f"--socket={sock}"]
        munged += [f"--pid-file={root}/munged.pid", f"--seed-file={root}/munge.seed"]
        munged += [f"--log-file={root}/log/munged.log", "--force"]
        daemons.append(subprocess.Popen(munged, stdin=subprocess.DEVNULL))
        _wait_for("munged", sock.exists, 10, logs=root / "log")
        for argv in ([_sbin("slurmctld"), "-D", "-i"], [_sbin("slurmd"), "-D"]):
            daemons.append(
                subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def idle() -> bool:
            try:
                return cluster.run("sinfo", "-h", "-o", "%t", timeout=5).strip() == "idle"
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                return False

        _wait_for("the Slurm node idle", idle, 30, logs=root / "log")
        yield cluster
    finally:
        # Jobs first (slurmd's slurmstepd children go with them), then the daemons.
        if len(daemons) == 3:
            try:
                subprocess.run(["scancel", "--full", "-u", "root"], env=env, timeout=10)
                end = time.monotonic() + 20
                while time.monotonic() < end and cluster.run("squeue", "-h").strip():
                    time.sleep(0.3)
            except (subprocess.SubprocessError, OSError):
                pass
        for proc in reversed(daemons):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _epoch(slurm_time: str) -> float:
    """Slurm prints local time, to the second."""
    return dt.datetime.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S").timestamp()


def test_pilot_in_slurm_sizes_to_the_limit_honours_a_shortened_one_and_ends_before_it(
    slurm: Slurm,
) -> None:
    work = slurm.root / "pilot"
    queue = work / "queue"
    queue.mkdir(parents=True)
    # Each event sleeps 0.25 s; the spec's estimate (5 HS06.s at 10 HS06) says 0.5 s.
    command = json.dumps(
        [sys.executable, SYNTH, "{first}", "{count}", "{output}", "--sleep", "0.25"]
    )
    for name in ("a", "b"):
        (queue / f"{name}.toml").write_text(
            f'name = "synth"\ncommand = {command}\ncpu_work_per_event = 5.0\n'
            "max_events = 100000\nmin_events = 4\nevents_per_task = 2\nsafety = 0.8\n"
        )
    script = work / "pilot.sbatch"
    script.write_text(
        f"""#!/bin/sh
{SWARM} lease --json --power 10 > {work}/lease.json
date +%s.%N > {work}/started
{SWARM} pilot {queue} --power 10 --job-user root --no-cgroup > {work}/pilot.json
echo $? > {work}/exit
date +%s.%N > {work}/ended
"""
    )
    env = {**slurm.env, "SWARM_RUNNER_STATE": str(work / "state")}
    job_id = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--exclusive",
            "--time=2",
            f"--output={work}/slurm.out",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    logs = slurm.root / "log"

    # 1. The lease comes from Slurm: its cores and its time left, named.
    _wait_for(
        "the pilot's first job",
        lambda: (queue / "running").is_dir() and any((queue / "running").iterdir()),
        40,
        logs=logs,
    )
    lease = json.loads((work / "lease.json").read_text())
    assert lease["cores"] == os.cpu_count()
    assert (
        lease["sources"]["time_left"] == f"Slurm job {job_id} (squeue -h -j {job_id} -o '%L %C %m')"
    )
    assert 100 < lease["time_left"] <= 120

    # 2. Shorten the limit to one minute while the first job runs.
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=1")
    info = slurm.job(job_id)
    start, limit_end = _epoch(info["StartTime"]), _epoch(info["StartTime"]) + 60
    assert info["TimeLimit"] == "00:01:00"

    _wait_for("the pilot's end", (work / "ended").exists, 75, logs=logs)
    assert (work / "exit").read_text().strip() == "0", (work / "slurm.out").read_text()
    report = json.loads((work / "pilot.json").read_text())
    first, second = report["jobs_run"]
    cores = os.cpu_count() or 1
    # The first job was sized to the two-minute limit (safety x time left x
    # power x cores / work per event, in whole rounds), then stopped when
    # Slurm's limit moved: back to the queue, for a later lease.
    sized_for = first["events_planned"] * 5.0 / (0.8 * 10 * cores)
    assert 90 < sized_for <= 120, first
    assert "the lease now ends" in first["stopped"] and f"Slurm job {job_id}" in first["stopped"]
    assert not first["complete"]
    # The second was sized to what was left of the one-minute limit.
    assert 0 < second["events_planned"] < first["events_planned"], second
    assert second["events_planned"] * 0.25 / cores < 60, second
    assert report["stopped"] == "no queued job fits the lease"

    # 3. It ended before Slurm would have killed it.
    ended = float((work / "ended").read_text())
    assert start < ended < limit_end, ended - start
    _wait_for(
        "Slurm to record the job's end",
        lambda: slurm.job(job_id)["JobState"] != "RUNNING",
        30,
        logs=logs,
    )
    assert slurm.job(job_id)["JobState"] == "COMPLETED"
