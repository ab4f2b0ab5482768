"""A real single-host Slurm for tests and the pilot benchmark, always stopped.

::

    with single_host_slurm() as slurm:
        job = slurm.sbatch(script, "--exclusive", "--time=2")
        slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")

:func:`single_host_slurm` starts ``munged``, ``slurmctld`` and ``slurmd`` on
this machine from a minimal ``slurm.conf`` in a fresh temporary directory
(its own munge key and socket, state, spool, logs and free loopback ports;
one node ``localhost`` with this machine's CPUs in one partition; process
tracking without cgroups), waits until the node is idle, and yields a
:class:`Slurm` whose ``env`` points the Slurm commands at that config.

Invariants:

- nothing outside the temporary directory is written, and no system-wide
  Slurm or munge is used or touched (``SLURM_CONF`` and the munge socket are
  ours; ``SLURM_JOB_ID`` and the Machine/Job Features variables are removed
  from ``env``, so a pilot sees only the batch job it is run in);
- on exit, also when the body or the start failed: the jobs are cancelled
  and waited for (slurmstepd and the job's processes go with them), then the
  three daemons started here are stopped by their PIDs (SIGTERM, then
  SIGKILL after a grace), then the directory is removed;
- every wait has a deadline; a daemon that does not come up raises
  :class:`SlurmError` with the tails of the daemons' logs.

Needs root (slurmd launches jobs as their user) and Debian's ``slurm-wlm``
and ``munge``; :func:`missing` says what is absent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
START_TIMEOUT = 30.0  # seconds for munged, then the Slurm node, to come up
STOP_GRACE = 10.0  # seconds a daemon has to stop after SIGTERM


class SlurmError(Exception):
    """The single-host Slurm did not start or a command of it failed; says which."""


@dataclass(frozen=True)
class Slurm:
    """A running single-host Slurm: its directory and the environment of its commands."""

    root: Path
    env: dict[str, str]

    @property
    def logs(self) -> Path:
        return self.root / "log"

    def run(self, *argv: str, timeout: float = 10.0) -> str:
        """Stdout of a Slurm command run against this Slurm.

        Raises:
            subprocess.CalledProcessError, subprocess.TimeoutExpired: as
                :func:`subprocess.run` with ``check=True``.
        """
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, check=True, timeout=timeout
        ).stdout

    def sbatch(self, script: Path, *options: str, env: dict[str, str] | None = None) -> str:
        """Submit ``script`` with ``options``; the job id.

        Raises:
            subprocess.CalledProcessError, subprocess.TimeoutExpired: sbatch failed.
        """
        return subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            env=env if env is not None else self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s ``Key=Value`` fields."""
        out = self.run("scontrol", "show", "job", job_id)
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def log_tails(self, chars: int = 2000) -> str:
        """The end of each daemon's log, for a failure message."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


def slurm_epoch(slurm_time: str) -> float:
    """Epoch seconds of a time ``scontrol`` prints (local time, to the second)."""
    return dt.datetime.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S").timestamp()


def missing() -> str | None:
    """Why a single-host Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "a single-host Slurm (slurmd launching jobs) needs root"
    for tool in TOOLS:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _config(root: Path, sock: Path) -> str:
    return f"""ClusterName=swarmtest
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


def _wait_for(what: str, check: Callable[[], bool], timeout: float, cluster: Slurm) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise SlurmError(f"{what} not within {timeout:g} s\n{cluster.log_tails()}")
        time.sleep(0.2)


@contextlib.contextmanager
def single_host_slurm() -> Iterator[Slurm]:
    """munged, slurmctld and slurmd on this machine; see the module docstring.

    Raises:
        SlurmError: a daemon did not come up in time.
        OSError: a daemon could not be started.
    """
    root = Path(tempfile.mkdtemp(prefix="swarm-slurm-"))
    root.chmod(0o755)
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(_config(root, sock))
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
        _wait_for("munged", sock.exists, START_TIMEOUT, cluster)
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

        _wait_for("the Slurm node idle", idle, START_TIMEOUT, cluster)
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
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE)
        shutil.rmtree(root, ignore_errors=True)
