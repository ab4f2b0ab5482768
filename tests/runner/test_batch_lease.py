"""Lease limits from batch systems: recorded command output, job ads and
environments (pure parsers), then real commands on PATH that fail, print
garbage or hang (the adapter's deadline)."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from runner.batch import (
    BatchParseError,
    BatchReader,
    BatchReading,
    CommandFailed,
    detect,
    parse_condor_job_ad,
    parse_lsf_bjobs,
    parse_pbs_qstat,
    parse_scontrol_job,
    parse_sge_qstat,
    parse_slurm_duration,
    parse_squeue,
    read_batch,
    run_command,
)
from runner.lease import FeatureDir, LeaseOptions, assemble_lease, discover_lease

NOW = 1_800_000_000.0
MIB = 1 << 20

# Recorded on this machine's single-host Slurm 22.05 (sbatch --exclusive --time=2).
SQUEUE = "2:00 2 0\n"
SCONTROL = """JobId=1 JobName=wrap
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   RunTime=00:00:20 TimeLimit=00:02:00 TimeMin=N/A
   StartTime=2026-12-01T04:51:58 EndTime=2026-12-01T04:53:58 Deadline=N/A
   NodeList=localhost
   NumNodes=1 NumCPUs=2 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=2,node=1,billing=2
   MinCPUsNode=1 MinMemoryNode=4000M MinTmpDiskNode=0
"""

CONDOR_AD = f"""ClusterId = 4711
ProcId = 0
RequestCpus = 8
RequestMemory = 16000
RequestDisk = 20000000
MaxRuntime = 7200
JobCurrentStartDate = {int(NOW) - 200}
Cmd = "/usr/bin/swarm"
Requirements = (TARGET.Arch == "X86_64")
"""

PBS_QSTAT = """Job Id: 1234.pbs.example.org
    Job_Name = pilot
    Job_Owner = grid@ce.example.org
    resources_used.cput = 00:20:00
    resources_used.walltime = 00:10:00
    job_state = R
    queue = grid
    Resource_List.mem = 16gb
    Resource_List.nodect = 1
    Resource_List.nodes = 1:ppn=8
    Resource_List.walltime = 02:00:00
    Variable_List = PBS_O_HOME=/home/grid,PBS_O_LANG=C,PBS_O_PATH=/usr/bin:/bi
\tn,PBS_O_WORKDIR=/home/grid
"""

SGE_QSTAT = """==============================================================
job_number:                 777
submission_time:            Tue Jan 15 08:00:00 2027
owner:                      grid
hard resource_list:         h_rt=3600,h_vmem=2G
parallel environment:  smp range: 4
start_time            1:    01/15/2027 09:00:00
"""


def _lsf(started: str) -> str:
    return f"""
Job <5555>, User <grid>, Project <default>, Status <RUN>, Queue <grid>, Command
                     <swarm pilot /q>
{started}: Submitted from host <ce01>, CWD <$HOME>, 4 Task(s);
{started}: Started 4 Task(s) on Host(s) <4*wn01>, Allocated 4 Slot(s) on Hos
                     t(s) <4*wn01>, Execution Home </home/grid>;

 RUNLIMIT
 120.0 min of wn01

 MEMLIMIT
      8 G
"""


# --- pure parsers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2:00", 120.0),  # MM:SS, as squeue %L prints under an hour
        ("1:02:03", 3723.0),
        ("1-00:00:00", 86400.0),
        ("2-3", 2 * 86400 + 3 * 3600.0),
        ("30", 1800.0),  # plain minutes (TimeLimit)
        ("UNLIMITED", None),
        ("NOT_SET", None),
    ],
)
def test_slurm_durations(text: str, seconds: float | None) -> None:
    assert parse_slurm_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "99999999999:00"])
def test_malformed_slurm_duration_is_an_error(text: str) -> None:
    with pytest.raises(BatchParseError):
        parse_slurm_duration(text)


def test_squeue_gives_time_left_and_cpus() -> None:
    limits = parse_squeue(SQUEUE, NOW)
    assert (
        limits.end == NOW + 120 - 1 and limits.cores == 2
    )  # a second early: Slurm truncates and limits.memory is None
    assert parse_squeue("1-00:00:00 16 4000M", NOW).memory == 4000 * MIB


@pytest.mark.parametrize("text", ["", "2:00 2", "2:00 x 0", "garbage out", "2:00 2 0\n1:00 2 0"])
def test_malformed_squeue_is_an_error(text: str) -> None:
    with pytest.raises(BatchParseError):
        parse_squeue(text, NOW)


def test_scontrol_gives_limit_less_run_time() -> None:
    limits = parse_scontrol_job(SCONTROL, NOW)
    assert limits.end == NOW + 100 - 1 and limits.cores == 2 and limits.memory == 4000 * MIB
    per_cpu = SCONTROL.replace("MinMemoryNode=4000M", "MinMemoryCPU=1G")
    assert parse_scontrol_job(per_cpu, NOW).memory == 2 << 30
    with pytest.raises(BatchParseError):
        parse_scontrol_job("slurm_load_jobs error: Invalid job id specified", NOW)


def test_condor_job_ad_gives_every_field() -> None:
    limits = parse_condor_job_ad(CONDOR_AD, NOW)
    assert limits.end == NOW - 200 + 7200 and limits.cores == 8 and limits.memory == 16000 * MIB
    cms = CONDOR_AD.replace("MaxRuntime = 7200", "MaxWallTimeMins = 60")
    assert parse_condor_job_ad(cms, NOW).end == NOW - 200 + 3600
    no_limit = CONDOR_AD.replace("MaxRuntime = 7200", "")
    assert parse_condor_job_ad(no_limit, NOW).end is None


def test_condor_expression_or_missing_start_is_an_error() -> None:
    expr = CONDOR_AD.replace("RequestMemory = 16000", "RequestMemory = ifThenElse(x, 1, 2)")
    with pytest.raises(BatchParseError, match="RequestMemory"):
        parse_condor_job_ad(expr, NOW)
    no_start = "\n".join(ln for ln in CONDOR_AD.splitlines() if "StartDate" not in ln)
    with pytest.raises(BatchParseError, match="MaxRuntime"):
        parse_condor_job_ad(no_start, NOW)
    with pytest.raises(BatchParseError):
        parse_condor_job_ad("\x00\x01 not an ad", NOW)


def test_pbs_qstat_gives_walltime_left_ppn_and_mem() -> None:
    limits = parse_pbs_qstat(PBS_QSTAT, NOW)
    assert limits.end == NOW + 7200 - 600 and limits.cores == 8 and limits.memory == 16 << 30
    pro = PBS_QSTAT.replace("Resource_List.nodes = 1:ppn=8", "Resource_List.ncpus = 16")
    assert parse_pbs_qstat(pro, NOW).cores == 16
    with pytest.raises(BatchParseError):
        parse_pbs_qstat(PBS_QSTAT.replace("02:00:00", "two hours"), NOW)
    with pytest.raises(BatchParseError):
        parse_pbs_qstat("qstat: Unknown Job Id 1234.pbs", NOW)


def test_lsf_bjobs_gives_runlimit_from_start_slots_and_memlimit() -> None:
    start = dt.datetime(2027, 3, 10, 12, 0, 0)
    now = start.timestamp() + 600
    text = _lsf(start.strftime("%a %b %e %H:%M:%S"))  # LSF prints no year
    limits = parse_lsf_bjobs(text, now)
    assert limits.end == start.timestamp() + 7200
    assert limits.cores == 4 and limits.memory == 8 << 30
    with_year = parse_lsf_bjobs(_lsf(start.strftime("%a %b %e %H:%M:%S %Y")), now)
    assert with_year.end == limits.end


def test_lsf_date_without_year_is_last_year_across_new_year() -> None:
    start = dt.datetime(2026, 12, 31, 23, 0, 0)
    now = dt.datetime(2027, 1, 1, 0, 30, 0).timestamp()
    limits = parse_lsf_bjobs(_lsf(start.strftime("%a %b %e %H:%M:%S")), now)
    assert limits.end == start.timestamp() + 7200


def test_malformed_lsf_is_an_error() -> None:
    with pytest.raises(BatchParseError):
        parse_lsf_bjobs("Job <5555> is not found", NOW)
    no_start = "Job <5555>, User <grid>\n RUNLIMIT\n 120.0 min of wn01\n"
    with pytest.raises(BatchParseError, match="Started"):
        parse_lsf_bjobs(no_start, NOW)


def test_sge_qstat_gives_h_rt_from_start_and_vmem_per_slot() -> None:
    start = dt.datetime(2027, 1, 15, 9, 0, 0).timestamp()
    limits = parse_sge_qstat(SGE_QSTAT, start + 60)
    assert limits.end == start + 3600 and limits.cores == 4 and limits.memory == 8 << 30
    assert parse_sge_qstat(SGE_QSTAT, start, slots=2).memory == 4 << 30
    ctime = SGE_QSTAT.replace("01/15/2027 09:00:00", "Fri Jan 15 09:00:00 2027")
    assert parse_sge_qstat(ctime, start).end == start + 3600
    with pytest.raises(BatchParseError):
        parse_sge_qstat(SGE_QSTAT.replace("01/15/2027 09:00:00", "soon"), start)
    with pytest.raises(BatchParseError):
        parse_sge_qstat("Following jobs do not exist: 777", start)


@pytest.mark.parametrize(
    ("environ", "system", "first"),
    [
        ({"SLURM_JOB_ID": "12"}, "Slurm", ("squeue", "-h", "-j", "12", "-o", "%L %C %m")),
        ({"_CONDOR_JOB_AD": "/scratch/.job.ad"}, "HTCondor", ()),
        ({"PBS_JOBID": "1234.pbs"}, "PBS", ("qstat", "-f", "1234.pbs")),
        ({"LSB_JOBID": "5555"}, "LSF", ("bjobs", "-l", "5555")),
        ({"JOB_ID": "777", "SGE_ROOT": "/opt/sge"}, "SGE", ("qstat", "-j", "777")),
    ],
)
def test_each_system_is_detected_from_its_environment(
    environ: dict[str, str], system: str, first: tuple[str, ...]
) -> None:
    found = detect(environ)
    assert found is not None and found.system == system
    assert found.probes[0].argv == first


def test_no_batch_system_and_a_bare_job_id_are_not_detected() -> None:
    assert detect({"HOME": "/root"}) is None
    assert detect({"JOB_ID": "7"}) is None  # JOB_ID alone is too common to mean SGE


def test_a_job_id_that_is_not_an_id_is_never_passed_to_a_command() -> None:
    found = detect({"SLURM_JOB_ID": "12 --all"})
    assert found is not None and found.probes == ()
    calls: list[Sequence[str]] = []

    def run(argv: Sequence[str], timeout: float) -> str:
        calls.append(argv)
        return ""

    reading = read_batch({"SLURM_JOB_ID": "-oall"}, NOW, run)
    assert calls == [] and reading is not None and "not a plain id" in reading.warnings[0]


# --- the lease: a batch limit is a limit like MJF -------------------------------------


def test_batch_limit_is_the_minimum_and_named_as_source() -> None:
    reading = read_batch({"SLURM_JOB_ID": "12"}, NOW, lambda argv, t: "30:00 4 8G")
    lease = assemble_lease(
        now=NOW,
        batch=reading,
        config={"time_left": 7200, "cores": 16, "memory": "64G"},
        options=LeaseOptions(power_per_core=10.0),
    )
    assert lease.time_left == 1799.0
    assert lease.sources["time_left"] == "Slurm job 12 (squeue -h -j 12 -o '%L %C %m')"
    # The batch system's allocation comes before the config's cores and memory
    assert lease.cores == 4 and lease.memory == 8 << 30
    assert lease.sources["cores"].startswith("Slurm job 12")
    # ... and after MJF's; a nearer MJF shutdowntime still wins the time left
    job = FeatureDir("JOBFEATURES", "/j", {"allocated_cpu": "2"})
    machine = FeatureDir("MACHINEFEATURES", "/m", {"shutdowntime": str(int(NOW) + 600)})
    lease = assemble_lease(
        now=NOW, batch=reading, job=job, machine=machine, options=LeaseOptions(power_per_core=1.0)
    )
    assert lease.cores == 2 and lease.time_left == 600.0
    assert "shutdowntime" in lease.sources["time_left"]


def test_failing_first_command_falls_back_to_the_next_with_a_warning() -> None:
    def run(argv: Sequence[str], timeout: float) -> str:
        if argv[0] == "squeue":
            raise CommandFailed("exit status 1: slurm_load_jobs error: Socket timed out")
        return SCONTROL

    reading = read_batch({"SLURM_JOB_ID": "1"}, NOW, run)
    assert reading is not None and reading.limits.end == NOW + 99
    assert reading.source == "Slurm job 1 (scontrol show job 1)"
    assert reading.warnings == (
        "Slurm job 1: squeue -h -j 1 -o '%L %C %m': "
        "exit status 1: slurm_load_jobs error: Socket timed out",
    )


def test_unreadable_job_ad_is_a_warning_and_the_lease_falls_back(tmp_path: Path) -> None:
    lease = discover_lease(
        now=NOW,
        environ={"_CONDOR_JOB_AD": str(tmp_path / "missing.ad")},
        config={"time_left": 500},
        detected_cores=2,
        options=LeaseOptions(power_per_core=1.0),
        batch=BatchReader(),
    )
    assert lease.time_left == 500 and lease.sources["time_left"] == "config time_left"
    assert any(
        w.startswith("HTCondor job ?: job ad ") and "unreadable" in w for w in lease.warnings
    )


def test_condor_job_ad_file_gives_the_lease(tmp_path: Path) -> None:
    ad = tmp_path / ".job.ad"
    ad.write_text(CONDOR_AD)
    lease = discover_lease(
        now=NOW,
        environ={"_CONDOR_JOB_AD": str(ad), "CONDOR_ID": "4711.0"},
        options=LeaseOptions(power_per_core=1.0),
        batch=BatchReader(),
    )
    assert (lease.cores, lease.time_left, lease.memory) == (8, 7000.0, 16000 * MIB)
    assert lease.sources["time_left"] == f"HTCondor job 4711.0 (job ad {ad})"


# --- the adapter with real commands on PATH -------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH for stand-in batch commands."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")
    return d


def _script(d: Path, name: str, body: str) -> None:
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)


def test_recorded_output_through_real_commands(fake_bin: Path) -> None:
    _script(fake_bin, "qstat", f"cat <<'EOF'\n{PBS_QSTAT}EOF")
    reading = read_batch({"PBS_JOBID": "1234.pbs"}, NOW)
    assert reading is not None and reading.limits.end == NOW + 7200 - 600
    assert reading.source == "PBS job 1234.pbs (qstat -f 1234.pbs)" and reading.warnings == ()


def test_malformed_output_is_a_warning_naming_the_command(fake_bin: Path) -> None:
    _script(fake_bin, "bjobs", "echo 'LSF is down for maintenance'")
    reading = read_batch({"LSB_JOBID": "5555"}, NOW)
    assert reading is not None and reading.limits.end is None
    assert reading.warnings[0].startswith("LSF job 5555: bjobs -l 5555: no 'Job <ID>, User")


def test_missing_command_is_a_warning(fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_bin))
    reading = read_batch({"JOB_ID": "777", "SGE_ROOT": "/opt/sge"}, NOW)
    assert reading is not None and "qstat -j 777: cannot run" in reading.warnings[0]


def test_hanging_command_is_killed_at_its_deadline_and_the_next_is_used(
    fake_bin: Path, tmp_path: Path
) -> None:
    # squeue hangs in a child of the script, holding the output pipe open:
    # killing the script alone would still leave the read waiting.
    pidfile = tmp_path / "sleep.pid"
    _script(fake_bin, "squeue", f"sleep 60 & echo $! > {pidfile}; wait")
    _script(fake_bin, "scontrol", f"cat <<'EOF'\n{SCONTROL}EOF")
    start = time.monotonic()
    reading = read_batch(
        {"SLURM_JOB_ID": "1"}, NOW, lambda argv, t: run_command(argv, 1.0), timeout=1.0
    )
    took = time.monotonic() - start
    assert took < 1.0 + 5.0  # the deadline plus generous slack, never the sleep's 60 s
    assert reading is not None and reading.source == "Slurm job 1 (scontrol show job 1)"
    assert reading.limits.end == NOW + 99
    assert "squeue -h -j 1 -o '%L %C %m': timed out after 1 s (killed)" in reading.warnings[0]
    with pytest.raises(ProcessLookupError):  # the sleeping grandchild went with its group
        for _ in range(100):
            os.kill(int(pidfile.read_text()), 0)
            time.sleep(0.05)


def test_lease_command_names_the_batch_source(
    fake_bin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from swarm.cli import main

    _script(fake_bin, "squeue", "echo '1:00:00 2 2G'")
    _script(fake_bin, "scontrol", "exit 1")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.delenv("MACHINEFEATURES", raising=False)
    monkeypatch.delenv("JOBFEATURES", raising=False)
    monkeypatch.setattr("runner.lease._BATCH", BatchReader())
    assert main(["lease", "--power", "10"]) == 0
    out = capsys.readouterr().out
    assert "time_left" in out and "from Slurm job 99 (squeue -h -j 99 -o '%L %C %m')" in out
    assert "memory" in out and str(2 << 30) in out


def _next_reading(reader: BatchReader, env: dict[str, str], now: float, old: object) -> object:
    """The reading once the background refresh has replaced ``old`` (5 s at most)."""
    end = time.monotonic() + 5.0
    while (reading := reader.read(env, now)) is old:
        assert time.monotonic() < end, "the refresh never arrived"
        time.sleep(0.01)
    return reading


def test_reader_asks_again_only_after_refresh() -> None:
    calls: list[str] = []
    clock = [0.0]

    def run(argv: Sequence[str], timeout: float) -> str:
        calls.append(argv[0])
        return "10:00 2 0" if len(calls) == 1 else "5:00 2 0"

    reader = BatchReader(run, refresh=10.0, clock=lambda: clock[0])
    env = {"SLURM_JOB_ID": "1"}
    first = reader.read(env, NOW)
    clock[0] = 9.0
    assert reader.read(env, NOW + 9) is first and calls == ["squeue"]
    clock[0] = 10.0
    shortened = _next_reading(reader, env, NOW + 10, first)
    assert isinstance(shortened, BatchReading) and shortened.limits.end == NOW + 10 + 300 - 1
    assert calls == ["squeue", "squeue"]


def test_a_hanging_batch_command_never_blocks_a_lease_reread() -> None:
    # A pilot re-reads its lease once a second from the running job's gather
    # loop: waiting there on a hanging squeue would hold up dispatch, reaping
    # and the job's own deadline.
    release = threading.Event()
    calls: list[str] = []

    def run(argv: Sequence[str], timeout: float) -> str:
        calls.append(argv[0])
        if len(calls) > 1:
            release.wait(5.0)  # hangs until the test lets it go
        return "10:00 2 0" if len(calls) == 1 else "5:00 2 0"

    clock = [0.0]
    reader = BatchReader(run, refresh=10.0, clock=lambda: clock[0])
    env = {"SLURM_JOB_ID": "1"}
    first = reader.read(env, NOW)
    clock[0] = 10.0
    started = time.monotonic()
    for _ in range(3):  # the refresh hangs: each read still returns at once
        assert reader.read(env, NOW + 10) is first
    assert time.monotonic() - started < 2.0
    release.set()
    refreshed = _next_reading(reader, env, NOW + 10, first)
    assert isinstance(refreshed, BatchReading) and refreshed.limits.end == NOW + 10 + 300 - 1
    assert calls == ["squeue", "squeue"]  # one refresh in flight at a time
