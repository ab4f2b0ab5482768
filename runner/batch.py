"""Lease limits from the batch system the node runs in (Slurm, HTCondor, PBS/Torque, LSF, SGE).

A pilot started by a batch system has a wall-time limit, cores and often
memory given by that system; past the limit the job is killed. As DIRAC's
TimeLeft does, the batch system is detected from the job's environment:

======== ======================= =========================================================
system   detected by             read from (in this order; the first that answers wins)
======== ======================= =========================================================
Slurm    ``SLURM_JOB_ID``        ``squeue -h -j ID -o "%L %C %m"``, ``scontrol show job ID``
HTCondor ``_CONDOR_JOB_AD``      the job ad file (``RequestCpus``, ``RequestMemory``,
                                 ``MaxRuntime`` / ``MaxWallTimeMins`` + ``JobCurrentStartDate``)
PBS      ``PBS_JOBID``           ``qstat -f ID``
LSF      ``LSB_JOBID``           ``bjobs -l ID``
SGE      ``JOB_ID`` + ``SGE_ROOT`` ``qstat -j ID`` (cores from ``NSLOTS``)
======== ======================= =========================================================

Invariants:

- The parsers (``parse_*``) are pure: recorded command output, job ad text or
  environment in, a :class:`BatchLimits` out; malformed text raises
  :class:`BatchParseError` naming what was wrong, never anything else.
- The adapter (:func:`read_batch`, :class:`BatchReader`) runs each command
  with a deadline (``COMMAND_TIMEOUT``, 10 s) in its own process group, killed
  whole when the deadline passes; a command that is missing, fails, hangs or
  prints something unparsable becomes a warning naming the system and the
  command, and the next command is tried. Reading never raises and never hangs.
- A limit is an absolute end (epoch seconds), so a reading stays valid as the
  clock moves; :class:`BatchReader` asks the batch system again at most every
  ``refresh`` seconds (a pilot re-reads its lease once a second).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from runner.exceptions import RunnerError
from runner.sizes import SizeError, parse_size

COMMAND_TIMEOUT = 10.0  # seconds a batch command may take before it is killed
REFRESH = 10.0  # seconds a reading is reused before the batch system is asked again
_MAX_OUTPUT = 1 << 20  # bytes of a command's output or a job ad that are parsed
_MAX_SECONDS = 10 * 365 * 86400  # a limit beyond ten years is no limit we can use
# Slurm counts a job's run time in whole seconds, truncated: the time left it
# prints may be up to a second more than is left.
_SLURM_ROUNDING = 1.0


class BatchParseError(RunnerError):
    """Batch system output that does not say what it should; the message says what."""


@dataclass(frozen=True)
class BatchLimits:
    """What one batch system says about the job: each value ``None`` when it says nothing.

    ``end`` is the epoch second at which the batch system ends the job,
    ``memory`` bytes for the whole job.
    """

    end: float | None = None
    cores: int | None = None
    memory: int | None = None


@dataclass(frozen=True)
class BatchReading:
    """The limits of the job and where they came from.

    ``source`` names the system, the job and the command or file that answered
    (``Slurm job 12 (squeue -h -j 12 -o '%L %C %m')``); ``limits`` is empty when
    nothing answered. ``warnings`` name each command that failed and why.
    """

    system: str
    job: str
    source: str
    limits: BatchLimits = BatchLimits()
    warnings: tuple[str, ...] = ()


# --- pure core: durations, sizes, dates --------------------------------------------------

_UNLIMITED = {"UNLIMITED", "INFINITE", "NOT_SET", "NONE", "N/A"}


def parse_slurm_duration(text: str) -> float | None:
    """Seconds of a Slurm duration: ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``, ``MM``.

    ``None`` for ``UNLIMITED`` / ``NOT_SET`` (no limit).

    Raises:
        BatchParseError: not a Slurm duration.
    """
    t = text.strip()
    if t.upper() in _UNLIMITED:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if m is None:
        raise BatchParseError(f"not a duration: {t[:40]!r}")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hms = (int(a), int(b or 0), int(c or 0))
        return _bounded(int(days) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2], t)
    if c is not None:  # HH:MM:SS
        return _bounded(int(a) * 3600 + int(b) * 60 + int(c), t)
    if b is not None:  # MM:SS
        return _bounded(int(a) * 60 + int(b), t)
    return _bounded(int(a) * 60, t)  # MM


def parse_hms(text: str) -> float:
    """Seconds of ``[[HH:]MM:]SS`` or plain seconds (PBS, SGE).

    Raises:
        BatchParseError: not such a duration.
    """
    t = text.strip()
    m = re.fullmatch(r"(?:(?:(\d+):)?(\d+):)?(\d+)(?:\.\d*)?", t)
    if m is None:
        raise BatchParseError(f"not a duration: {t[:40]!r}")
    h, mi, s = m.groups()
    return _bounded(int(h or 0) * 3600 + int(mi or 0) * 60 + int(s), t)


def _bounded(seconds: int, text: str) -> float:
    if seconds > _MAX_SECONDS:
        raise BatchParseError(f"duration out of range: {text[:40]!r}")
    return float(seconds)


def _size(text: str, what: str) -> int | None:
    """Bytes of a batch system's size (``4000M``, ``16gb``, ``2G``); ``None`` for 0."""
    t = text.strip()
    if t in ("0", "0M", "0K", "0G"):
        return None
    try:
        return parse_size(t)
    except SizeError as exc:
        raise BatchParseError(f"{what}: {exc}") from None


def _whole(text: str, what: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"\d{1,6}", t) or int(t) == 0:
        raise BatchParseError(f"{what} is not a positive whole number: {t[:40]!r}")
    return int(t)


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def _ctime_like(text: str, now: float) -> float:
    """Epoch of ``Tue Dec  1 04:00:05[ 2026]`` in local time; a date without a
    year (LSF) is the latest such date not after ``now``."""
    m = re.fullmatch(
        r"\w{3}\s+(\w{3})\s+(\d{1,2})\s+(\d{1,2}):(\d{2}):(\d{2})(?:\s+(\d{4}))?", text
    )
    if m is None or m.group(1) not in _MONTHS:
        raise BatchParseError(f"not a date: {text[:40]!r}")
    mon, day, hh, mm, ss, year = m.groups()
    years = [int(year)] if year else [dt.datetime.fromtimestamp(now).year - k for k in (0, 1)]
    for y in years:
        try:
            when = dt.datetime(y, _MONTHS[mon], int(day), int(hh), int(mm), int(ss)).timestamp()
        except ValueError:
            continue
        if year or when <= now + 60:  # a minute of clock skew between hosts
            return when
    raise BatchParseError(f"not a date: {text[:40]!r}")


# --- pure core: one parser per batch system -----------------------------------------------


def parse_squeue(text: str, now: float) -> BatchLimits:
    """``squeue -h -j ID -o "%L %C %m"``: time left, CPUs, minimum memory.

    The end is a second early (``_SLURM_ROUNDING``). ``%m`` is per node
    unless the job asked memory per CPU; that case is told apart by the
    caller (``SLURM_MEM_PER_CPU``), so here memory is per node.

    Raises:
        BatchParseError: not one line of three fields.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1 or len(lines[0].split()) != 3:
        raise BatchParseError(f"expected one line 'TIME_LEFT CPUS MEMORY', got {text[:60]!r}")
    left, cpus, mem = lines[0].split()
    seconds = parse_slurm_duration(left)
    return BatchLimits(
        end=None if seconds is None else now + seconds - _SLURM_ROUNDING,
        cores=_whole(cpus, "CPUs"),
        memory=_size(mem, "memory"),
    )


def _key_values(text: str) -> dict[str, str]:
    """``Key=Value`` words of ``scontrol show job`` (values have no spaces there)."""
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def parse_scontrol_job(text: str, now: float) -> BatchLimits:
    """``scontrol show job ID``: ``TimeLimit`` - ``RunTime``, ``NumCPUs``,
    ``MinMemoryNode`` (or ``MinMemoryCPU`` x CPUs).

    Raises:
        BatchParseError: no ``JobId=``, or a field that is malformed.
    """
    kv = _key_values(text)
    if "JobId" not in kv or "TimeLimit" not in kv:
        raise BatchParseError(f"no JobId=/TimeLimit= in {text[:60]!r}")
    limit = parse_slurm_duration(kv["TimeLimit"])
    run = parse_slurm_duration(kv.get("RunTime", "0")) or 0.0
    cores = _whole(kv["NumCPUs"], "NumCPUs") if "NumCPUs" in kv else None
    memory = None
    if "MinMemoryNode" in kv:
        memory = _size(kv["MinMemoryNode"], "MinMemoryNode")
    elif "MinMemoryCPU" in kv and cores is not None:
        per_cpu = _size(kv["MinMemoryCPU"], "MinMemoryCPU")
        memory = None if per_cpu is None else per_cpu * cores
    end = None if limit is None else now + limit - run - _SLURM_ROUNDING
    return BatchLimits(end=end, cores=cores, memory=memory)


def _class_ad(text: str) -> dict[str, str]:
    """``Name = value`` lines of a ClassAd file; attribute names are case-insensitive."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(r"\s*[A-Za-z_][\w.]*\s*", name):
            out.setdefault(name.strip().lower(), value.strip())
    return out


# Wall-time limits sites put in the job ad: (attribute, seconds per unit).
CONDOR_WALLTIME_ATTRS = (("MaxRuntime", 1), ("MaxWallTimeMins", 60))


def parse_condor_job_ad(text: str, now: float) -> BatchLimits:
    """The HTCondor job ad (``$_CONDOR_JOB_AD``): ``RequestCpus``,
    ``RequestMemory`` (MiB), and the first of ``CONDOR_WALLTIME_ATTRS`` counted
    from ``JobCurrentStartDate`` (or ``JobStartDate``). An attribute that is an
    expression rather than a number is an error.

    Raises:
        BatchParseError: not a job ad, or a value that is not a number.
    """
    ad = _class_ad(text)
    if not ad:
        raise BatchParseError(f"no 'Name = value' lines in {text[:60]!r}")

    def number(name: str) -> int | None:
        raw = ad.get(name.lower())
        if raw is None or raw.lower() == "undefined":
            return None
        if not re.fullmatch(r"\d{1,12}", raw):
            raise BatchParseError(f"{name} is not a number: {raw[:40]!r}")
        return int(raw)

    cores = number("RequestCpus")
    memory_mib = number("RequestMemory")
    end = None
    for name, unit in CONDOR_WALLTIME_ATTRS:
        limit = number(name)
        if limit is None:
            continue
        start = number("JobCurrentStartDate") or number("JobStartDate")
        if start is None:
            raise BatchParseError(f"{name} is set but no JobCurrentStartDate / JobStartDate")
        end = float(start + limit * unit)
        break
    return BatchLimits(
        end=end,
        cores=cores or None,
        memory=memory_mib * (1 << 20) if memory_mib else None,
    )


def _pbs_attributes(text: str) -> dict[str, str]:
    """``qstat -f``: ``    name = value`` lines, long values continued on tab-indented lines."""
    out: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith("\t") and last is not None:
            out[last] += line.strip()
            continue
        name, sep, value = line.partition(" = ")
        if sep:
            last = name.strip()
            out[last] = value.strip()
    return out


def parse_pbs_qstat(text: str, now: float) -> BatchLimits:
    """``qstat -f ID`` (PBS Pro, Torque): ``Resource_List.walltime`` less
    ``resources_used.walltime``; ``Resource_List.ncpus`` (or ``ppn`` of
    ``Resource_List.nodes``); ``Resource_List.mem``.

    Raises:
        BatchParseError: no ``Job Id:``, or a malformed value.
    """
    if "Job Id:" not in text:
        raise BatchParseError(f"no 'Job Id:' in {text[:60]!r}")
    attrs = _pbs_attributes(text)
    end = None
    if "Resource_List.walltime" in attrs:
        limit = parse_hms(attrs["Resource_List.walltime"])
        used = parse_hms(attrs.get("resources_used.walltime", "0"))
        end = now + limit - used
    cores = None
    if "Resource_List.ncpus" in attrs:
        cores = _whole(attrs["Resource_List.ncpus"], "Resource_List.ncpus")
    elif m := re.search(r"ppn=(\d+)", attrs.get("Resource_List.nodes", "")):
        cores = _whole(m.group(1), "ppn")
    memory = _size(attrs["Resource_List.mem"], "mem") if "Resource_List.mem" in attrs else None
    return BatchLimits(end=end, cores=cores, memory=memory)


def _lsf_unwrapped(text: str) -> str:
    """``bjobs -l`` wraps long lines at 80 columns, continuing them after 21 spaces."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(" " * 21) and out:
            out[-1] += line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def parse_lsf_bjobs(text: str, now: float) -> BatchLimits:
    """``bjobs -l ID``: ``RUNLIMIT`` (minutes) from the ``Started`` date;
    slots from ``Started N Task(s)`` / ``Allocated N Slot(s)``; ``MEMLIMIT``.

    Raises:
        BatchParseError: not a ``Job <ID>`` description, or a malformed value.
    """
    t = _lsf_unwrapped(text)
    if not re.search(r"^Job <[^>]*>, User <", t, re.M):
        raise BatchParseError(f"no 'Job <ID>, User <...>' in {text[:60]!r}")
    end = None
    if m := re.search(r"RUNLIMIT\s*\n\s*([\d.]+) min", t):
        started = re.search(r"^(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d(?: \d{4})?): Started", t, re.M)
        if started is None:
            raise BatchParseError("RUNLIMIT is set but no 'Started' date")
        end = _ctime_like(started.group(1), now) + float(m.group(1)) * 60
    cores = None
    if m := re.search(r"Allocated (\d+) Slot|Started (\d+) Task", t):
        cores = _whole(m.group(1) or m.group(2), "slots")
    memory = None
    if m := re.search(r"MEMLIMIT\s*\n\s*([\d.]+)\s*([KMGT])", t):
        memory = _size(m.group(1) + m.group(2), "MEMLIMIT")
    return BatchLimits(end=end, cores=cores, memory=memory)


def parse_sge_qstat(text: str, now: float, slots: int | None = None) -> BatchLimits:
    """``qstat -j ID`` (SGE, Son of Grid Engine): ``h_rt`` (or ``s_rt``) of the
    hard resource list from ``start_time``; ``h_vmem`` per slot x ``slots``
    (``$NSLOTS``, else the parallel environment's range).

    Raises:
        BatchParseError: no ``job_number:``, or a malformed value.
    """
    if not re.search(r"^job_number:", text, re.M):
        raise BatchParseError(f"no 'job_number:' in {text[:60]!r}")
    resources: dict[str, str] = {}
    if m := re.search(r"^hard resource_list:\s*(\S+)", text, re.M):
        for item in m.group(1).split(","):
            k, _, v = item.partition("=")
            resources[k.strip()] = v.strip()
    if slots is None and (
        m := re.search(r"^parallel environment:.*range:\s*(\d+)\s*$", text, re.M)
    ):
        slots = _whole(m.group(1), "parallel environment range")
    end = None
    limit_text = resources.get("h_rt") or resources.get("s_rt")
    if limit_text is not None:
        limit = parse_hms(limit_text)
        m = re.search(r"^start_time(?:\s+\d+)?:\s*(.+?)\s*$", text, re.M)
        if m is None:
            raise BatchParseError("h_rt is set but no start_time")
        raw = m.group(1)
        try:
            start = dt.datetime.strptime(raw, "%m/%d/%Y %H:%M:%S").timestamp()
        except ValueError:
            start = _ctime_like(raw, now)
        end = start + limit
    memory = None
    if "h_vmem" in resources:
        per_slot = _size(resources["h_vmem"], "h_vmem")
        memory = None if per_slot is None else per_slot * (slots or 1)
    return BatchLimits(end=end, cores=slots, memory=memory)


# --- detection: which system, which commands --------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One way of asking: a command (or a file to read) and its parser."""

    argv: tuple[str, ...]  # empty: read ``path`` instead
    parse: Callable[[str, float], BatchLimits]
    path: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"job ad {self.path}"
        return " ".join(_quoted(a) for a in self.argv)


def _quoted(arg: str) -> str:
    return f"'{arg}'" if not arg or re.search(r"[^\w./:=-]", arg) else arg


@dataclass(frozen=True)
class Detected:
    system: str
    job: str
    probes: tuple[Probe, ...] = field(default_factory=tuple)


def _slurm_squeue(environ: Mapping[str, str]) -> Callable[[str, float], BatchLimits]:
    """``parse_squeue`` with memory per CPU made memory per job (``--mem-per-cpu``)."""

    def parse(text: str, now: float) -> BatchLimits:
        limits = parse_squeue(text, now)
        if environ.get("SLURM_MEM_PER_CPU") and limits.memory and limits.cores:
            return BatchLimits(limits.end, limits.cores, limits.memory * limits.cores)
        return limits

    return parse


def _job_id(value: str) -> str | None:
    """A job id as batch systems print them (``12``, ``12.server``, ``12[3]``), else None."""
    v = value.strip()
    return v if re.fullmatch(r"\w[\w.\[\]-]{0,127}", v) else None  # never an option


def detect(environ: Mapping[str, str]) -> Detected | None:
    """The batch system this process runs in and how to ask it, or None (pure).

    A job id that is not a plain id (it would be an argument of a command) is
    not used: the system is reported with no probes.
    """
    if "SLURM_JOB_ID" in environ:
        job = _job_id(environ["SLURM_JOB_ID"])
        probes: tuple[Probe, ...] = (
            (
                Probe(("squeue", "-h", "-j", job, "-o", "%L %C %m"), _slurm_squeue(environ)),
                Probe(("scontrol", "show", "job", job), parse_scontrol_job),
            )
            if job
            else ()
        )
        return Detected("Slurm", environ["SLURM_JOB_ID"][:40], probes)
    if environ.get("_CONDOR_JOB_AD"):
        path = environ["_CONDOR_JOB_AD"]
        return Detected(
            "HTCondor", environ.get("CONDOR_ID", "?")[:40], (Probe((), parse_condor_job_ad, path),)
        )
    if "PBS_JOBID" in environ:
        job = _job_id(environ["PBS_JOBID"])
        probes = (Probe(("qstat", "-f", job), parse_pbs_qstat),) if job else ()
        return Detected("PBS", environ["PBS_JOBID"][:40], probes)
    if "LSB_JOBID" in environ:
        job = _job_id(environ["LSB_JOBID"])
        probes = (Probe(("bjobs", "-l", job), parse_lsf_bjobs),) if job else ()
        return Detected("LSF", environ["LSB_JOBID"][:40], probes)
    if "JOB_ID" in environ and ("SGE_ROOT" in environ or "SGE_CELL" in environ):
        job = _job_id(environ["JOB_ID"])
        slots = environ.get("NSLOTS", "")
        n = int(slots) if slots.isdigit() and int(slots) > 0 else None

        def parse(text: str, now: float) -> BatchLimits:
            return parse_sge_qstat(text, now, n)

        probes = (Probe(("qstat", "-j", job), parse),) if job else ()
        return Detected("SGE", environ["JOB_ID"][:40], probes)
    return None


# --- adapter: run the commands with a deadline -------------------------------------------


class CommandFailed(RunnerError):
    """A batch command that could not be run, failed or did not finish in time."""


def run_command(argv: Sequence[str], timeout: float) -> str:
    """The standard output of ``argv``, run in its own process group.

    When ``timeout`` passes the whole group is killed (a wrapper script's
    children too), so a hanging command never holds its pipe open.

    Raises:
        CommandFailed: not found, exit status other than 0, or timed out.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run: {exc.strerror or exc}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created with the child
        proc.communicate()
        raise CommandFailed(f"timed out after {timeout:g} s (killed)") from None
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()
        first = detail[0][:120] if detail else "no message"
        raise CommandFailed(f"exit status {proc.returncode}: {first}")
    return out[:_MAX_OUTPUT].decode(errors="replace")


def _read_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_OUTPUT).decode(errors="replace")
    except OSError as exc:
        raise CommandFailed(f"unreadable: {exc.strerror or exc}") from None


def read_batch(
    environ: Mapping[str, str],
    now: float,
    run: Callable[[Sequence[str], float], str] = run_command,
    timeout: float = COMMAND_TIMEOUT,
) -> BatchReading | None:
    """Ask the batch system named by ``environ`` about this job; None outside one.

    Each probe is tried in order until one answers; every failure is a warning
    naming the system and the command. Never raises.
    """
    found = detect(environ)
    if found is None:
        return None
    name = f"{found.system} job {found.job}"
    warnings: list[str] = []
    if not found.probes:
        warnings.append(f"{name}: the job id is not a plain id, not asked")
    for probe in found.probes:
        what = probe.describe()
        try:
            text = _read_file(probe.path) if probe.path is not None else run(probe.argv, timeout)
            limits = probe.parse(text, now)
        except (CommandFailed, BatchParseError) as exc:
            warnings.append(f"{name}: {what}: {exc}")
            continue
        return BatchReading(found.system, found.job, f"{name} ({what})", limits, tuple(warnings))
    return BatchReading(found.system, found.job, name, BatchLimits(), tuple(warnings))


class BatchReader:
    """:func:`read_batch`, asked again at most every ``refresh`` seconds.

    Only the first reading of a job is waited for (bounded by the commands'
    deadlines); later ones are refreshed in a background thread while the
    last reading is returned, so a lease re-read (once a second, from a
    running job's gather loop) never waits on a slow or hanging batch system.
    A failed reading is kept just as long as a good one. Thread-safe.
    """

    def __init__(
        self,
        run: Callable[[Sequence[str], float], str] = run_command,
        *,
        refresh: float = REFRESH,
        timeout: float = COMMAND_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run, self._refresh, self._timeout, self._clock = run, refresh, timeout, clock
        self._lock = threading.Lock()
        self._last: tuple[tuple[str, ...] | None, float, BatchReading | None] | None = None
        self._refreshing = False

    def read(self, environ: Mapping[str, str], now: float) -> BatchReading | None:
        """The batch system's word on this job as of at most ``refresh`` s ago
        (or as of the running refresh); None outside a batch system."""
        found = detect(environ)
        key = (
            None
            if found is None
            else (found.system, found.job, *(p.describe() for p in found.probes))
        )
        with self._lock:
            last = self._last
            if last is not None and last[0] == key:
                if self._clock() - last[1] >= self._refresh and not self._refreshing:
                    self._refreshing = True
                    threading.Thread(
                        target=self._refresh_in_background,
                        args=(dict(environ), now, key),
                        name="batch-lease",
                        daemon=True,  # bounded by the deadlines; never holds up an exit
                    ).start()
                return last[2]
        reading = read_batch(environ, now, self._run, self._timeout)
        with self._lock:
            self._last = (key, self._clock(), reading)
        return reading

    def _refresh_in_background(
        self, environ: Mapping[str, str], now: float, key: tuple[str, ...] | None
    ) -> None:
        # ``now`` is the clock when the refresh was asked for, before the
        # command ran: a time left measured later gives an end that is early,
        # never late.
        try:
            reading = read_batch(environ, now, self._run, self._timeout)
            with self._lock:
                self._last = (key, self._clock(), reading)
        finally:
            with self._lock:
                self._refreshing = False
