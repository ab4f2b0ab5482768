"""The node's lease: how many cores, how fast, for how long, how much memory.

A lease is assembled from up to five kinds of source, in this order of trust:

1. explicit options (command line, API),
2. WLCG Machine/Job Features (``$MACHINEFEATURES``, ``$JOBFEATURES``: directories
   of one-value files, see HEPiX MJF, CERN-IT-Note-2016-001),
3. the batch system the node runs in (Slurm, HTCondor, PBS, LSF, SGE:
   :mod:`runner.batch`),
4. the node's configuration mapping,
5. what the machine itself says (``os.cpu_count()``, a benchmark).

Single-valued fields (cores, power per core, memory) take the first source that
gives a usable value. Values an operator gives (the ``[runner]`` config keys,
command options) are checked first by :func:`lease_value`: a bad one is an
error naming the key, never a silent fallback. Memory is a size
(:func:`runner.sizes.parse_size`: ``4096``, ``"200M"``, ``"10G"``). Time left
is the *minimum* over every source that gives one, because each of them is a
limit that can end the slot.

The core (:func:`assemble_lease`) is pure: the clock, the environment and the
contents of the feature directories are passed in. :func:`read_feature_dir` and
:func:`discover_lease` are the thin adapter that touches the disk. Nothing here
prints: a missing or malformed file becomes a line in ``Lease.warnings`` that
names the file and the source the value fell back to.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from runner.batch import BatchReader, BatchReading
from runner.exceptions import LeaseError, RunnerConfigError
from runner.sizes import SizeError, parse_size

# MJF files this module reads. machine: shutdowntime, total_cpu, hs06;
# job: jobstart_secs, wall_limit_secs, cpu_limit_secs, allocated_cpu,
# max_rss_bytes, shutdowntime_job.
MACHINE_FILES = ("shutdowntime", "total_cpu", "hs06")
JOB_FILES = (
    "jobstart_secs",
    "wall_limit_secs",
    "cpu_limit_secs",
    "allocated_cpu",
    "max_rss_bytes",
    "shutdowntime_job",
)
_MAX_FEATURE_BYTES = 4096

# Bounds of the lease values an operator may give. Beyond them a value is a
# typo or an attack, not a node: a worker slot per core is allocated, times
# end up in the gather's timers, and sizing divides by them.
MAX_CORES = 4096
MAX_POWER = 1e6  # HS06 per core (a core today is 10-30)
MAX_SECONDS = 10 * 365 * 86400.0  # time_left: ten years
MAX_EPOCH = 1e11  # shutdowntime: epoch seconds (year 5138)
LEASE_KEYS = ("cores", "power_per_core", "time_left", "shutdowntime", "memory")
_ACCEPTS = {
    "cores": f"a whole number of cores from 1 to {MAX_CORES}",
    "power_per_core": f"HS06 per core, a number above 0 and at most {MAX_POWER:g}",
    "time_left": f"seconds, a number above 0 and at most {MAX_SECONDS:g}",
    "shutdowntime": f"epoch seconds, a number above 0 and at most {MAX_EPOCH:g}",
}


def lease_value(key: str, value: object, name: str | None = None) -> int | float:
    """``value`` of the lease field ``key`` as an operator gave it, checked.

    ``cores`` is a whole number, ``memory`` a size (``parse_size``), the
    others finite numbers above 0, each below its bound (``MAX_*``).
    ``name`` is how the caller calls the key in errors (``runner.cores``).

    Raises:
        RunnerConfigError: one line naming ``name`` and what it accepts.
    """
    checked, problem = _checked(key, value)
    if problem is not None:
        raise RunnerConfigError(f"{key if name is None else name}: {problem}")
    return checked


def _checked(key: str, value: object) -> tuple[int | float, str | None]:
    """(the value, None) or (0, what is wrong with it)."""
    if key == "memory":
        try:
            return parse_size(value), None
        except SizeError as exc:
            return 0, str(exc)
    if key not in _ACCEPTS:
        return 0, f"not a lease field ({', '.join(LEASE_KEYS)})"
    bound = {
        "cores": MAX_CORES,
        "power_per_core": MAX_POWER,
        "time_left": MAX_SECONDS,
        "shutdowntime": MAX_EPOCH,
    }[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (key == "cores" and not isinstance(value, int))
        or not math.isfinite(value)
        or not 0 < value <= bound
    ):
        text = repr(value)
        return 0, f"expected {_ACCEPTS[key]}, got {text if len(text) <= 40 else text[:37] + '...'}"
    return value, None


def lease_config(table: Mapping[str, object], prefix: str = "runner.") -> dict[str, int | float]:
    """The lease keys of a config table, each checked by :func:`lease_value`.

    Raises:
        RunnerConfigError: the first bad value, named ``prefix + key``.
    """
    return {k: lease_value(k, table[k], f"{prefix}{k}") for k in LEASE_KEYS if k in table}


def lease_option(key: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` for the lease field ``key``: a bad value is a
    one-line usage error saying what is accepted."""

    def parse(text: str) -> int | float:
        try:
            value: object = text
            if key == "cores":
                value = int(text)
            elif key != "memory":
                value = float(text)
        except ValueError:
            value = text
        checked, problem = _checked(key, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return checked

    parse.__name__ = key  # argparse names the type in some messages
    return parse


@dataclass(frozen=True)
class FeatureDir:
    """The raw contents of one MJF directory.

    ``values`` maps a file name to its text; a file absent from it is missing.
    ``error`` is set when the directory itself could not be read.
    """

    kind: str  # "MACHINEFEATURES" or "JOBFEATURES"
    path: str
    values: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class LeaseOptions:
    """Explicit values; each one given overrides every other source."""

    cores: int | None = None
    power_per_core: float | None = None
    time_left: float | None = None
    memory: int | None = None


@dataclass(frozen=True)
class Lease:
    """What the node can give a job now.

    ``time_left`` is in seconds from ``now`` (the clock value used to build it),
    ``power_per_core`` in HS06 per core, ``memory`` in bytes or ``None`` when no
    source limits it. ``sources`` maps each field to where its value came from.
    """

    cores: int
    power_per_core: float
    time_left: float
    memory: int | None
    now: float
    sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()

    @property
    def deadline(self) -> float:
        """Absolute clock time at which the lease ends."""
        return self.now + self.time_left

    def at(self, now: float) -> Lease:
        """The same lease seen at a later clock time (less time left)."""
        return replace(self, now=now, time_left=max(0.0, self.deadline - now))

    def to_json(self) -> dict[str, object]:
        return {
            "cores": self.cores,
            "power_per_core": self.power_per_core,
            "time_left": self.time_left,
            "memory": self.memory,
            "sources": dict(self.sources),
            "warnings": list(self.warnings),
        }


class _Collector:
    """Parses feature files and config values, remembering what went wrong."""

    def __init__(self, machine: FeatureDir | None, job: FeatureDir | None) -> None:
        self.dirs = {"MACHINEFEATURES": machine, "JOBFEATURES": job}
        # (field, message-without-fallback) pairs, completed once the field is decided
        self.problems: list[tuple[str, str]] = []

    def feature(self, kind: str, name: str, for_field: str, *, integer: bool) -> float | None:
        d = self.dirs[kind]
        if d is None:
            return None
        where = f"${kind}/{name}"
        file = f"(file {os.path.join(d.path, name)})"
        if d.error is not None:
            # The directory problem is reported once, against the first field that needed it.
            msg = f"${kind} ({d.path}) unreadable: {d.error}"
            if all(m != msg for _, m in self.problems):
                self.problems.append((for_field, msg))
            return None
        raw = d.values.get(name)
        if raw is None:
            self.problems.append((for_field, f"{where} is missing {file}"))
            return None
        text = raw.strip()
        try:
            value = float(int(text)) if integer else float(text)
        except ValueError:
            self.problems.append((for_field, f"{where} is malformed: {raw[:40]!r} {file}"))
            return None
        if (
            not math.isfinite(value)
            or value < 0
            or (integer and value == 0 and name != "jobstart_secs")
        ):
            self.problems.append((for_field, f"{where} is out of range: {raw[:40]!r} {file}"))
            return None
        return value

    def sourced(
        self, kind: str, name: str, for_field: str, *, integer: bool
    ) -> tuple[float, str] | None:
        """``feature`` with where it came from, for ``_first_source``."""
        v = self.feature(kind, name, for_field, integer=integer)
        return None if v is None else (v, self.source(kind, name))

    def source(self, kind: str, name: str) -> str:
        d = self.dirs[kind]
        assert d is not None
        return f"${kind}/{name} ({os.path.join(d.path, name)})"


def _given(value: float | None, source: str) -> tuple[float, str] | None:
    return None if value is None else (value, source)


def _first_source(
    field: str,
    sources: dict[str, str],
    *candidates: Callable[[], tuple[float, str] | None],
) -> float | None:
    """The first candidate that yields a value, in order of precedence; later
    candidates are not even read (so they add no warnings)."""
    for candidate in candidates:
        found = candidate()
        if found is not None:
            sources[field] = found[1]
            return found[0]
    return None


def _config_number(
    config: Mapping[str, object], key: str, problems: list[tuple[str, str]], for_field: str
) -> float | None:
    if key not in config:
        return None
    try:
        return float(lease_value(key, config[key], f"config {key}"))
    except RunnerConfigError as exc:
        problems.append((for_field, str(exc)))
        return None


def assemble_lease(
    *,
    now: float,
    machine: FeatureDir | None = None,
    job: FeatureDir | None = None,
    config: Mapping[str, object] | None = None,
    options: LeaseOptions | None = None,
    batch: BatchReading | None = None,
    detected_cores: int | None = None,
    benchmark: Callable[[int], tuple[float, str]] | None = None,
) -> Lease:
    """Build a lease from every source given (pure: no I/O of its own).

    ``batch`` is what the batch system said (:func:`runner.batch.read_batch`):
    its end is a limit like MJF's, its cores and memory come after MJF's.

    ``config`` may hold ``cores``, ``power_per_core``, ``time_left`` (seconds
    from ``now``), ``shutdowntime`` (epoch seconds) and ``memory`` (bytes).
    ``benchmark(cores)`` is called only when no other source gives the power;
    it returns ``(power_per_core, description of where it came from)``.

    Raises:
        LeaseError: no source gives cores, power per core or time left.
    """
    config = config or {}
    options = options or LeaseOptions()
    c = _Collector(machine, job)
    sources: dict[str, str] = {}
    limits = batch.limits if batch is not None else None
    if batch is not None:
        c.problems.extend(("time_left", w) for w in batch.warnings)

    # --- cores: option > allocated_cpu (job) > batch > config > total_cpu (machine) > detected
    total_cpu = c.feature("MACHINEFEATURES", "total_cpu", "cores", integer=True)
    cores_f = _first_source(
        "cores",
        sources,
        lambda: _given(options.cores, "option cores"),
        lambda: c.sourced("JOBFEATURES", "allocated_cpu", "cores", integer=True),
        lambda: _given(limits.cores if limits else None, batch.source if batch else ""),
        lambda: _given(_config_number(config, "cores", c.problems, "cores"), "config cores"),
        lambda: _given(total_cpu, c.source("MACHINEFEATURES", "total_cpu") if total_cpu else ""),
        lambda: _given(detected_cores or None, "detected (os.cpu_count)"),
    )
    cores = None if cores_f is None else int(cores_f)

    # --- power per core: option > config > hs06 / total_cpu (machine) > benchmark
    power: float | None = None
    if options.power_per_core is not None:
        power, sources["power_per_core"] = options.power_per_core, "option power_per_core"
    if power is None:
        v = _config_number(config, "power_per_core", c.problems, "power_per_core")
        if v is not None:
            power, sources["power_per_core"] = v, "config power_per_core"
    if power is None:
        hs06 = c.feature("MACHINEFEATURES", "hs06", "power_per_core", integer=False)
        if hs06 is not None:
            if total_cpu is not None:
                power = hs06 / total_cpu
                sources["power_per_core"] = (
                    f"{c.source('MACHINEFEATURES', 'hs06')} / "
                    f"{c.source('MACHINEFEATURES', 'total_cpu')}"
                )
            else:
                c.problems.append(
                    ("power_per_core", "$MACHINEFEATURES/hs06 is unusable without total_cpu")
                )
    if power is None and benchmark is not None and cores is not None:
        power, sources["power_per_core"] = benchmark(cores)

    # --- time left: minimum over every source
    candidates: list[tuple[float, str]] = []
    if options.time_left is not None:
        candidates.append((options.time_left, "option time_left"))
    v = c.feature("MACHINEFEATURES", "shutdowntime", "time_left", integer=True)
    if v is not None:
        candidates.append((v - now, c.source("MACHINEFEATURES", "shutdowntime")))
    v = c.feature("JOBFEATURES", "shutdowntime_job", "time_left", integer=True)
    if v is not None:
        candidates.append((v - now, c.source("JOBFEATURES", "shutdowntime_job")))
    start = c.feature("JOBFEATURES", "jobstart_secs", "time_left", integer=True)
    wall = c.feature("JOBFEATURES", "wall_limit_secs", "time_left", integer=True)
    if start is not None and wall is not None:
        candidates.append(
            (start + wall - now, "$JOBFEATURES/jobstart_secs + $JOBFEATURES/wall_limit_secs")
        )
    cpu_limit = c.feature("JOBFEATURES", "cpu_limit_secs", "time_left", integer=True)
    if start is not None and cpu_limit is not None and cores:
        # The CPU limit is summed over all processes: on a whole node it runs out
        # after cpu_limit / cores seconds of wall time.
        candidates.append(
            (
                start + cpu_limit / cores - now,
                "$JOBFEATURES/jobstart_secs + $JOBFEATURES/cpu_limit_secs / cores",
            )
        )
    if batch is not None and limits is not None and limits.end is not None:
        candidates.append((limits.end - now, batch.source))
    v = _config_number(config, "time_left", c.problems, "time_left")
    if v is not None:
        candidates.append((v, "config time_left"))
    v = _config_number(config, "shutdowntime", c.problems, "time_left")
    if v is not None:
        candidates.append((v - now, "config shutdowntime"))
    time_left: float | None = None
    if candidates:
        time_left, sources["time_left"] = min(candidates, key=lambda t: t[0])
        time_left = max(0.0, time_left)

    # --- memory: option > max_rss_bytes (job) > batch > config > none
    memory_f = _first_source(
        "memory",
        sources,
        lambda: _given(options.memory, "option memory"),
        lambda: c.sourced("JOBFEATURES", "max_rss_bytes", "memory", integer=True),
        lambda: _given(limits.memory if limits else None, batch.source if batch else ""),
        lambda: _given(_config_number(config, "memory", c.problems, "memory"), "config memory"),
    )
    memory = None if memory_f is None else int(memory_f)
    if memory is None:
        sources["memory"] = "no limit (no source)"

    warnings = tuple(
        f"{msg}; {fld} from {sources.get(fld, 'no source')}" for fld, msg in c.problems
    )
    missing = [
        name
        for name, value in (("cores", cores), ("power_per_core", power), ("time_left", time_left))
        if value is None
    ]
    if missing:
        detail = "; ".join(warnings) if warnings else "no source was given"
        raise LeaseError(f"no usable source for {', '.join(missing)} ({detail})")
    assert cores is not None and power is not None and time_left is not None
    return Lease(
        cores=cores,
        power_per_core=power,
        time_left=time_left,
        memory=memory,
        now=now,
        sources=sources,
        warnings=warnings,
    )


def read_feature_dir(kind: str, path: str) -> FeatureDir:
    """Read every small regular file of an MJF directory (adapter: touches disk).

    Never raises for a bad directory: the problem is kept in ``FeatureDir.error``.
    """
    values: dict[str, str] = {}
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        return FeatureDir(kind=kind, path=path, error=exc.strerror or str(exc))
    for entry in entries:
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as f:
                data = f.read(_MAX_FEATURE_BYTES)
            values[entry.name] = data.decode("ascii", errors="replace")
        except OSError:
            continue  # reported as missing if it is ever needed
    return FeatureDir(kind=kind, path=path, values=values)


def discover_lease(
    *,
    now: float,
    environ: Mapping[str, str],
    config: Mapping[str, object] | None = None,
    options: LeaseOptions | None = None,
    detected_cores: int | None = None,
    benchmark: Callable[[int], tuple[float, str]] | None = None,
    batch: BatchReader | None = None,
) -> Lease:
    """Read MJF directories named in ``environ``, ask the batch system named
    there (``batch``, default: one reader per process, asked at most every
    ``runner.batch.REFRESH`` seconds) and assemble the lease.

    Raises:
        LeaseError: as :func:`assemble_lease`.
    """
    machine = job = None
    if environ.get("MACHINEFEATURES"):
        machine = read_feature_dir("MACHINEFEATURES", environ["MACHINEFEATURES"])
    if environ.get("JOBFEATURES"):
        job = read_feature_dir("JOBFEATURES", environ["JOBFEATURES"])
    return assemble_lease(
        now=now,
        machine=machine,
        job=job,
        config=config,
        options=options,
        batch=(batch or _BATCH).read(environ, now),
        detected_cores=detected_cores,
        benchmark=benchmark,
    )


# The process's batch reader: a pilot re-reads its lease once a second, the
# batch system is asked at most every REFRESH seconds.
_BATCH = BatchReader()


def shutdown_probe(
    environ: Mapping[str, str], deadline: float, clock: Callable[[], float]
) -> Callable[[], str | None]:
    """A ``should_stop`` for a running job: a reason once MJF moves the end earlier.

    Re-reads ``shutdowntime`` and ``shutdowntime_job`` (a site announcing a
    drain); returns None while neither is earlier than ``deadline``.
    """

    def probe() -> str | None:
        for kind, name in (
            ("MACHINEFEATURES", "shutdowntime"),
            ("JOBFEATURES", "shutdowntime_job"),
        ):
            directory = environ.get(kind)
            if not directory:
                continue
            try:
                with open(os.path.join(directory, name)) as f:
                    value = float(int(f.read(64).strip()))
            except (OSError, ValueError):
                continue
            if value < deadline - 1.0:
                return f"${kind}/{name} moved to {value:.0f} ({value - clock():.0f} s from now)"
        return None

    return probe
