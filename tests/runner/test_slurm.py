"""A real single-host Slurm: ``swarm pilot`` as a whole-node batch job.

The fixture is :func:`swarm_testing.slurm.single_host_slurm`: munged,
slurmctld and slurmd on this machine from a minimal slurm.conf in a tmp dir,
always stopped by PID and removed, also on failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swarm_testing.slurm import Slurm, single_host_slurm, slurm_epoch
from swarm_testing.waiting import eventually

SYNTH = str(Path(__file__).with_name("synth_events.py"))
SWARM = str(Path(sys.executable).with_name("swarm"))

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm() -> Iterator[Slurm]:
    with single_host_slurm() as cluster:
        yield cluster


def _wait_for(what: str, check: Callable[[], object], timeout: float, *, slurm: Slurm) -> None:
    try:
        eventually(what, check, timeout, interval=0.2)
    except AssertionError as exc:
        pytest.fail(f"{exc}\n{slurm.log_tails()}")


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
    job_id = slurm.sbatch(script, "--exclusive", "--time=2", f"--output={work}/slurm.out", env=env)

    # 1. The lease comes from Slurm: its cores and its time left, named.
    _wait_for(
        "the pilot's first job",
        lambda: (queue / "running").is_dir() and any((queue / "running").iterdir()),
        40,
        slurm=slurm,
    )
    lease = json.loads((work / "lease.json").read_text())
    assert lease["cores"] == os.cpu_count()
    assert (
        lease["sources"]["time_left"] == f"Slurm job {job_id} (squeue -h -j {job_id} -o '%L %C %m')"
    )
    assert 100 < lease["time_left"] <= 120

    # 2. Shorten the limit to one minute while the first job runs.
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=1")
    shortened_at = time.time()
    info = slurm.job(job_id)
    start, limit_end = slurm_epoch(info["StartTime"]), slurm_epoch(info["StartTime"]) + 60
    assert info["TimeLimit"] == "00:01:00"

    _wait_for("the pilot's end", (work / "ended").exists, 75, slurm=slurm)
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
    # Noticed while running: the batch reader asks Slurm again every 10 s, the
    # job probes its lease every second (generous slack for a loaded machine).
    assert first["ended_at"] - shortened_at < 10 + 1 + 15, first
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
        slurm=slurm,
    )
    assert slurm.job(job_id)["JobState"] == "COMPLETED"
