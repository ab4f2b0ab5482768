"""The Vacuum platform contract, host side: what a VM is told and how its end is judged.

Pure: no clock, disk or socket of its own; every time is passed in (epoch
seconds), so the rules are tested without qemu.

* :func:`machine_job_features` builds the MJF files a guest gets
  (``$MACHINEFEATURES``, ``$JOBFEATURES``, HEPiX MJF, CERN-IT-Note-2016-001)
  from the node's lease and the VM's share of it; the caller diffs two
  results to send what changed (a moved ``shutdowntime``).
* :func:`parse_shutdown_message` is the one strict parser of Vac's
  ``shutdown_message`` (``NNN text``, NNN one of :data:`SHUTDOWN_CODES`).
* :func:`judge` turns how a VM ended into its :class:`Outcome`: the guest's
  code, a stale heartbeat (``700 heartbeat``), a fizzle (stopped within
  ``fizzle_seconds`` without a code: an abort).
* :class:`BackOff` keeps, per VM type, until when no new VM of that type is
  started after an abort (Vac's ``backoff_seconds``).
* :class:`OutputLimits` bounds what a guest may ship back into ``$JOBOUTPUTS``.

Invariants: a VM never gets a ``shutdowntime`` later than the lease's end; an
outcome has a code only if the guest wrote a well-formed one or the host
destroyed the VM for a stale heartbeat; a malformed message is recorded as
such, never guessed at.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from vm.exceptions import GuestDataError

# Vac/Vcycle shutdown_message codes (the Vacuum platform's meaning of each).
SHUTDOWN_CODES: Mapping[int, str] = {
    100: "shutdown as requested by the VM's host",
    200: "intended work completed ok",
    300: "no more work available",
    400: "site, host or VM banned or disabled from receiving work",
    500: "problem with the environment or contextualization the site provided",
    600: "grid-wide problem with the job agent or application in the VM",
    700: "error not in the categories above",
}
ABORT_FROM = 300  # codes from this on back off the VM type (Vac: "no more work" too)
MAX_SHUTDOWN_MESSAGE = 1024  # bytes; a message is one short line
_MESSAGE = re.compile(rb"^([1-7]00)(?: ([\x20-\x7e]*))?\n?\Z")

MJF_KEY = re.compile(r"^[a-z0-9_]{1,64}\Z")
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
MAX_OUTPUT_BYTES = 1 << 20  # one $JOBOUTPUTS file
MAX_OUTPUT_FILES = 64
HEARTBEAT_FILE = "vm-heartbeat"
SHUTDOWN_FILE = "shutdown_message"


@dataclass(frozen=True)
class ShutdownMessage:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def parse_shutdown_message(data: bytes) -> ShutdownMessage:
    """A guest's ``shutdown_message`` file, strictly: ``NNN`` or ``NNN text``,
    printable ASCII, one line (a trailing newline allowed), NNN one of
    :data:`SHUTDOWN_CODES`.

    Raises:
        GuestDataError: anything else (the text says what was wrong).
    """
    if len(data) > MAX_SHUTDOWN_MESSAGE:
        raise GuestDataError(
            f"shutdown_message is {len(data)} bytes (at most {MAX_SHUTDOWN_MESSAGE})"
        )
    m = _MESSAGE.match(data)
    if m is None:
        shown = data[:60].decode("ascii", "backslashreplace")
        raise GuestDataError(
            f"shutdown_message {shown!r} is not 'NNN text' with NNN one of "
            f"{' '.join(str(c) for c in SHUTDOWN_CODES)}"
        )
    code = int(m.group(1))
    if code not in SHUTDOWN_CODES:
        raise GuestDataError(f"shutdown_message code {code} is not a Vacuum code")
    return ShutdownMessage(code, (m.group(2) or b"").decode("ascii"))


# -- Machine/Job Features ------------------------------------------------------------


@dataclass(frozen=True)
class VmShare:
    """What the node gives one VM: fixed when it starts."""

    vm_id: str
    cores: int
    memory: int  # bytes (max_rss_bytes)
    started: float  # epoch seconds (jobstart_secs)
    lifetime: float  # seconds from ``started``, already capped at the lease's end
    grace: float  # seconds between STOP and the end (grace_secs)


@dataclass(frozen=True)
class NodeShare:
    """What the node's lease says now (the machine side of MJF)."""

    lease_cores: int  # total_cpu, jobslots
    power_per_core: float  # HS06 per core (the runner's DB12, else config)
    lease_end: float  # epoch seconds: the node's shutdowntime
    phys_cores: int
    log_cores: int


def vm_end(vm: VmShare, node: NodeShare) -> float:
    """When the VM must be gone: its lifetime or the lease's end, the earlier."""
    return min(vm.started + vm.lifetime, node.lease_end)


def machine_job_features(vm: VmShare, node: NodeShare) -> dict[str, bytes]:
    """The MJF files of ``vm``, keyed ``machinefeatures/KEY`` and ``jobfeatures/KEY``
    (values as MJF writes them: decimal text, no newline)."""

    def whole(x: float) -> bytes:
        return str(math.floor(x)).encode()

    def number(x: float) -> bytes:
        return (str(int(x)) if float(x).is_integer() else f"{x:.2f}").encode()

    end = vm_end(vm, node)
    wall = max(0.0, vm.lifetime)
    machine = {
        "hs06": number(node.power_per_core * node.lease_cores),
        "total_cpu": whole(node.lease_cores),
        "jobslots": whole(node.lease_cores),
        "phys_cores": whole(node.phys_cores),
        "log_cores": whole(node.log_cores),
        "shutdowntime": whole(node.lease_end),
        "grace_secs": whole(vm.grace),
    }
    job = {
        "job_id": vm.vm_id.encode(),
        "allocated_cpu": whole(vm.cores),
        "hs06_job": number(node.power_per_core * vm.cores),
        "jobstart_secs": whole(vm.started),
        "wall_limit_secs": whole(wall),
        "cpu_limit_secs": whole(wall * vm.cores),
        "shutdowntime_job": whole(end),
        "max_rss_bytes": whole(vm.memory),
        "max_swap_bytes": b"0",
        "grace_secs": whole(vm.grace),
    }
    out = {f"machinefeatures/{k}": v for k, v in machine.items()}
    out.update({f"jobfeatures/{k}": v for k, v in job.items()})
    return out


def changed_features(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files of ``new`` whose content differs from ``old`` (or is new)."""
    return {k: v for k, v in new.items() if old.get(k) != v}


# -- outputs -------------------------------------------------------------------------


class OutputLimits:
    """What a guest may ship into ``$JOBOUTPUTS``: at most
    :data:`MAX_OUTPUT_FILES` names of :data:`OUTPUT_NAME`, each at most
    :data:`MAX_OUTPUT_BYTES`. Refusals are counted, the VM keeps running."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.refused: list[str] = []

    def check(self, name: str, size: int) -> str | None:
        """None: store it; else why it is refused (also kept in ``refused``)."""
        problem = None
        if not OUTPUT_NAME.match(name) or name in (".", ".."):
            problem = f"output name {name[:80]!r} is not [A-Za-z0-9._-]{{1,64}}"
        elif size > MAX_OUTPUT_BYTES:
            problem = f"output {name} is {size} bytes (at most {MAX_OUTPUT_BYTES})"
        elif name not in self.names and len(self.names) >= MAX_OUTPUT_FILES:
            problem = f"output {name}: more than {MAX_OUTPUT_FILES} files"
        if problem is None:
            self.names.add(name)
        elif len(self.refused) < 100:  # the record stays bounded too
            self.refused.append(problem)
        return problem


# -- how a VM ended ------------------------------------------------------------------


class State(enum.Enum):
    STARTING = "starting"  # overlay, qemu, QMP
    INCOMING = "incoming"  # a migration's destination: waiting for the memory
    RUNNING = "running"
    MIGRATING = "migrating"  # the source of a migration: disk mirror, then memory
    STOPPING = "stopping"  # STOP and the power button sent; waiting the grace
    STOPPED = "stopped"  # qemu is gone; the outcome is known
    MIGRATED = "migrated"  # it runs on another node now; this qemu is gone
    FAILED = "failed"  # it never ran here: qemu, the overlay or the migration failed


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.STARTING: frozenset(
        {State.RUNNING, State.INCOMING, State.STOPPING, State.FAILED, State.STOPPED}
    ),
    State.INCOMING: frozenset({State.RUNNING, State.FAILED}),
    # RUNNING -> FAILED: its restart under TCG after a failed KVM trial failed
    State.RUNNING: frozenset({State.MIGRATING, State.STOPPING, State.STOPPED, State.FAILED}),
    State.MIGRATING: frozenset({State.RUNNING, State.MIGRATED, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.MIGRATED: frozenset(),
    State.FAILED: frozenset(),
}
LIVE = frozenset({State.STARTING, State.INCOMING, State.RUNNING, State.MIGRATING, State.STOPPING})


def next_state(now: State, to: State) -> State:
    """``to`` if the table allows it from ``now``.

    Raises:
        ValueError: a transition the table does not allow (a bug of ours).
    """
    if to not in TRANSITIONS[now]:
        raise ValueError(f"a VM cannot go from {now.value} to {to.value}")
    return to


class Ending(enum.Enum):
    """Why qemu went away."""

    GUEST = "guest"  # the guest powered off (after its work, or after STOP)
    HEARTBEAT = "heartbeat"  # the host destroyed it: heartbeat stale
    HOST_STOP = "host-stop"  # the host stopped it (request, lifetime, node shutdown)
    CRASHED = "crashed"  # qemu exited on its own with an error


@dataclass(frozen=True)
class Outcome:
    """What a VM's end means (kept in its record and shown)."""

    code: int | None  # the shutdown_message code, or 700 for a stale heartbeat
    text: str
    aborted: bool  # counts as an abort: backs off the VM type
    fizzled: bool = False
    message_problem: str | None = None  # a malformed shutdown_message, as recorded


def judge(
    *,
    started: float,
    stopped: float,
    ending: Ending,
    message: bytes | None,
    fizzle_seconds: float,
) -> Outcome:
    """The outcome of a VM that ran from ``started`` to ``stopped`` (epoch
    seconds), ended as ``ending``, with the guest's ``shutdown_message`` file
    (None: it wrote none).

    Rules (Vac's): a stale heartbeat is ``700 heartbeat`` whatever the guest
    wrote; a well-formed code is the outcome, an abort from
    :data:`ABORT_FROM` on; without a (well-formed) code, a VM the host
    stopped is no abort, and one that stopped by itself (or whose qemu
    exited) within ``fizzle_seconds`` of its start fizzled (an abort), a
    later one did not.
    """
    if ending is Ending.HEARTBEAT:
        return Outcome(700, "heartbeat", aborted=True)
    problem = None
    if message is not None:
        try:
            parsed = parse_shutdown_message(message)
        except GuestDataError as exc:
            problem = str(exc)
        else:
            return Outcome(parsed.code, parsed.text, aborted=parsed.code >= ABORT_FROM)
    ran = stopped - started
    what = "a malformed shutdown_message" if problem else "no shutdown_message"
    if ending is Ending.HOST_STOP:  # the host's doing, not the guest's: never a fizzle
        return Outcome(
            None, f"the host stopped it after {ran:.0f} s with {what}", False,
            message_problem=problem,
        )  # fmt: skip
    why = {
        Ending.GUEST: "the guest stopped",
        Ending.HOST_STOP: "the host stopped it",
        Ending.CRASHED: "qemu exited",
        Ending.HEARTBEAT: "",
    }[ending]
    if ran < fizzle_seconds:
        return Outcome(
            None,
            f"fizzle: {why} after {ran:.0f} s (within fizzle_seconds {fizzle_seconds:g})"
            f" with {what}",
            aborted=True,
            fizzled=True,
            message_problem=problem,
        )
    return Outcome(None, f"{why} after {ran:.0f} s with {what}", False, message_problem=problem)


def heartbeat_stale(
    *,
    now: float,
    started: float,
    hello: float | None,
    last_heartbeat: float | None,
    heartbeat_seconds: float,
    boot_seconds: float,
) -> bool:
    """Whether a VM's heartbeat is stale: none for ``heartbeat_seconds``
    since the last one, or since the agent's first HELLO before the first
    one (a boot under software emulation may take long); a guest whose
    agent never said HELLO is stale ``boot_seconds`` after its start.
    0 turns a rule off."""
    if heartbeat_seconds > 0 and last_heartbeat is not None:
        return now - last_heartbeat > heartbeat_seconds
    if heartbeat_seconds > 0 and hello is not None:
        return now - hello > heartbeat_seconds
    if boot_seconds > 0 and hello is None:
        return now - started > boot_seconds
    return False


@dataclass
class _TypeRecord:
    aborts: int = 0
    until: float = 0.0
    last: str = ""


@dataclass
class BackOff:
    """Per VM type (the image, ``REPO/NAME/VERSION``): after an abort no VM of
    that type starts for ``seconds``; a VM that ends without aborting clears it."""

    seconds: float
    _types: dict[str, _TypeRecord] = field(default_factory=dict)

    def record(self, vm_type: str, outcome: Outcome, now: float) -> None:
        rec = self._types.setdefault(vm_type, _TypeRecord())
        if outcome.aborted:
            rec.aborts += 1
            rec.until = now + self.seconds
            rec.last = f"{outcome.code} {outcome.text}" if outcome.code else outcome.text
        else:
            rec.aborts, rec.until, rec.last = 0, 0.0, ""

    def refusal(self, vm_type: str, now: float) -> str | None:
        """None if a VM of ``vm_type`` may start now, else why not."""
        rec = self._types.get(vm_type)
        if rec is None or now >= rec.until:
            return None
        return (
            f"VM type {vm_type} is backed off for {rec.until - now:.0f} s more after"
            f" {rec.aborts} abort(s) (last: {rec.last}; backoff_seconds {self.seconds:g})"
        )

    def snapshot(self, now: float) -> dict[str, float]:
        """Backed-off types and the seconds left for each."""
        return {t: r.until - now for t, r in self._types.items() if r.until > now}
