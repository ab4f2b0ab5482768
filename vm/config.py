"""The ``[vm]`` table of a node's configuration, and a VM request, checked strictly.

::

    [vm]
    enabled = true                 # false: the node starts no VM (no routes)
    qemu = "qemu-system-x86_64"    # the qemu and qemu-img to run
    qemu_img = "qemu-img"
    accelerator = "auto"           # auto | kvm | tcg (auto: probe KVM once, else tcg)
    probe_image = "/etc/swarm/kvm-probe.img"   # auto: a guest that prints probe_line
                                               # (none: the first VM is the probe)
    probe_line = "swarm-probe: linux ok"          # ... on its serial console
    probe_seconds = 20             # ... within this
    cores = 1                      # a VM's default cores and memory
    memory = "128M"
    lifetime = 86400               # a VM's default lifetime (capped at the lease's end)
    grace = 30                     # STOP + ACPI power button, then this, then quit, kill
    fizzle_seconds = 600           # stopped this soon without a code: an abort
    heartbeat_seconds = 600        # no vm-heartbeat this long: destroyed, 700 heartbeat
    boot_seconds = 600             # no agent HELLO this long after the start: the same
    backoff_seconds = 600          # no VM of a type that aborted, this long
    software = true                # export the node's mount read-only (9p, swarm-software)
    start_timeout = 30             # qemu-img and qemu's QMP must answer within this

Every value has one owner: sizes ``runner/sizes.py``, seconds and counts
``swarm/options.py``. A bad value raises :class:`VmConfigError` naming
``vm.KEY`` and what it accepts; a request's bad field names the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.lease import MAX_CORES
from runner.sizes import SizeError, parse_size
from swarm.options import ValueRangeError, parse_count, parse_seconds
from trust.names import repo_name_problem
from vm.channel import max_file_bytes
from vm.exceptions import VmConfigError
from vm.handshake import parse_public_key
from vm.qemu import ACCELERATORS

MAX_LIFETIME = 10 * 365 * 86400.0
MAX_GRACE = 3600.0
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MIN_MEMORY = 16 << 20


@dataclass(frozen=True)
class VmSettings:
    enabled: bool = True
    qemu: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    accelerator: str = "auto"
    probe_image: Path | None = None
    probe_line: str = "swarm-probe: linux ok"
    probe_seconds: float = 20.0
    cores: int = 1
    memory: int = 128 << 20
    lifetime: float = 86400.0
    grace: float = 30.0
    fizzle_seconds: float = 600.0
    heartbeat_seconds: float = 600.0
    boot_seconds: float = 600.0
    backoff_seconds: float = 600.0
    software: bool = True
    start_timeout: float = 30.0


KEYS = tuple(VmSettings.__dataclass_fields__)


def _seconds(key: str, value: object, *, minimum: float = 0.0, maximum: float = 7 * 86400) -> float:
    try:
        return parse_seconds(value, minimum=minimum, maximum=maximum)
    except ValueRangeError as exc:
        raise VmConfigError(f"{key}: {exc}") from None


def _cores(key: str, value: object) -> int:
    try:
        return parse_count(value, minimum=1, maximum=MAX_CORES)
    except ValueRangeError as exc:
        raise VmConfigError(f"{key}: {exc}") from None


def _memory(key: str, value: object) -> int:
    try:
        size = parse_size(value)
    except SizeError as exc:
        raise VmConfigError(f"{key}: {exc}") from None
    if size < MIN_MEMORY:
        raise VmConfigError(f"{key}: {value!r} is less than the 16M a guest needs")
    return size


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or "\n" in value:
        raise VmConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def vm_settings(table: Mapping[str, Any], *, base: Path = Path("/")) -> VmSettings:
    """The ``[vm]`` table checked (relative paths from ``base``).

    Raises:
        VmConfigError: an unknown key or a bad value, naming ``vm.KEY``.
    """
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise VmConfigError(f"vm.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    d = VmSettings()
    out: dict[str, Any] = {}
    for key in ("enabled", "software"):
        if key in table:
            if not isinstance(table[key], bool):
                raise VmConfigError(f"vm.{key}: expected true or false, got {table[key]!r}")
            out[key] = table[key]
    for key in ("qemu", "qemu_img", "probe_line"):
        if key in table:
            out[key] = _text(f"vm.{key}", table[key])
    if "accelerator" in table:
        if table["accelerator"] not in ACCELERATORS:
            raise VmConfigError(
                f"vm.accelerator: expected one of {', '.join(ACCELERATORS)},"
                f" got {table['accelerator']!r}"
            )
        out["accelerator"] = table["accelerator"]
    if "probe_image" in table:
        out["probe_image"] = base / _text("vm.probe_image", table["probe_image"])
    for key in ("probe_seconds", "start_timeout"):
        if key in table:
            out[key] = _seconds(f"vm.{key}", table[key], minimum=1.0, maximum=600.0)
    for key in ("fizzle_seconds", "heartbeat_seconds", "boot_seconds", "backoff_seconds"):
        if key in table:  # 0 turns the rule off
            out[key] = _seconds(f"vm.{key}", table[key], maximum=MAX_LIFETIME)
    if "grace" in table:
        out["grace"] = _seconds("vm.grace", table["grace"], maximum=MAX_GRACE)
    if "lifetime" in table:
        out["lifetime"] = _seconds("vm.lifetime", table["lifetime"], minimum=1.0,
                                   maximum=MAX_LIFETIME)  # fmt: skip
    if "cores" in table:
        out["cores"] = _cores("vm.cores", table["cores"])
    if "memory" in table:
        out["memory"] = _memory("vm.memory", table["memory"])
    return VmSettings(**{**d.__dict__, **out})


# -- a request to start a VM -----------------------------------------------------------


@dataclass(frozen=True)
class ImageName:
    repo: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.repo}/{self.name}/{self.version}"


def parse_image_name(text: object) -> ImageName:
    """``REPO/NAME/VERSION``.

    Raises:
        VmConfigError: not three safe components.
    """
    if not isinstance(text, str):
        raise VmConfigError(f"image: expected REPO/NAME/VERSION, got {text!r}")
    parts = text.split("/")
    if len(parts) != 3:
        raise VmConfigError(f"image: expected REPO/NAME/VERSION, got {text[:200]!r}")
    repo, name, version = parts
    problem = repo_name_problem(repo)
    if problem is not None:
        raise VmConfigError(f"image: {problem}")
    for what, part in (("name", name), ("version", version)):
        if not _COMPONENT.match(part) or ".." in part:
            raise VmConfigError(
                f"image: the {what} {part[:130]!r} is not [A-Za-z0-9._-], starting with a"
                " letter or digit, at most 128 characters"
            )
    return ImageName(repo, name, version)


@dataclass(frozen=True)
class VmRequest:
    image: ImageName
    cores: int | None = None  # None: the [vm] default
    memory: int | None = None
    lifetime: float | None = None
    user_data: bytes | None = None  # the script the guest runs
    job: str | None = None  # the queued VM job that asks for it (set by vm.job, never by a client)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"image": str(self.image)}
        for key in ("cores", "memory", "lifetime"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.user_data is not None:
            out["user_data"] = self.user_data.decode()
        return out


REQUEST_KEYS = ("image", "cores", "memory", "lifetime", "user_data")
MAX_USER_DATA = max_file_bytes("user_data")


def _user_data(text: object) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise VmConfigError("user_data: expected the text of a script")
    data = text.encode()
    if len(data) > MAX_USER_DATA:
        raise VmConfigError(f"user_data: {len(data)} bytes (at most {MAX_USER_DATA})")
    return data


def parse_request(doc: object) -> VmRequest:
    """A start request (``POST /v1/vms``'s JSON body).

    Raises:
        VmConfigError: not an object, an unknown field, a bad value (names it).
    """
    if not isinstance(doc, dict):
        raise VmConfigError("the request must be a JSON object with at least image")
    unknown = sorted(set(doc) - set(REQUEST_KEYS))
    if unknown:
        raise VmConfigError(f"{unknown[0]}: unknown field (known: {', '.join(REQUEST_KEYS)})")
    if "image" not in doc:
        raise VmConfigError("image: missing (required): REPO/NAME/VERSION")
    user_data = _user_data(doc.get("user_data"))
    return VmRequest(
        image=parse_image_name(doc["image"]),
        cores=None if doc.get("cores") is None else _cores("cores", doc["cores"]),
        memory=None if doc.get("memory") is None else _memory("memory", doc["memory"]),
        lifetime=None
        if doc.get("lifetime") is None
        else _seconds("lifetime", doc["lifetime"], minimum=1.0, maximum=MAX_LIFETIME),
        user_data=user_data,
    )


# -- a migration's destination -----------------------------------------------------------

_VM_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}\Z")


@dataclass(frozen=True)
class IncomingRequest:
    """What the destination of a migration needs: the VM as its source runs it,
    and the source's public key for this migration (the TLS key is derived on
    each side, never sent: :mod:`vm.handshake`). The source makes it
    (:meth:`vm.manager.VmService.prepare_migration`); the migrate command
    hands it to the destination (``POST /v1/vms/incoming``, token)."""

    vm_id: str
    image: ImageName
    cores: int
    memory: int
    accelerator: str  # the source's: memory moves only between the same kind
    software: bool  # the source exports the software mount (the destination must too)
    started: float  # epoch seconds
    ends: float
    source: str  # who sends it (shown in the record)
    source_key: str  # 64 hex digits: the source's ephemeral X25519 public key
    agent: str | None = None  # the guest agent's version (its HELLO on the source)
    user_data: bytes | None = None  # the VM's script (sent to the guest again on reconnects)

    def to_json(self) -> dict[str, object]:
        """The body of ``POST /v1/vms/incoming`` (:func:`parse_incoming` reads it)."""
        return {
            "id": self.vm_id,
            "image": str(self.image),
            "cores": self.cores,
            "memory": self.memory,
            "accelerator": self.accelerator,
            "software": self.software,
            "started": self.started,
            "ends": self.ends,
            "source": self.source,
            "source_key": self.source_key,
            "agent": self.agent,
            "user_data": None if self.user_data is None else self.user_data.decode(),
        }


INCOMING_KEYS = ("id", "image", "cores", "memory", "accelerator", "software", "started", "ends",
                 "source", "source_key")  # fmt: skip
INCOMING_OPTIONAL = ("agent", "user_data")


def parse_incoming(doc: object) -> IncomingRequest:
    """``POST /v1/vms/incoming``'s body.

    Raises:
        VmConfigError: a missing, unknown or bad field (named).
    """
    if not isinstance(doc, dict):
        raise VmConfigError("the request must be a JSON object")
    known = (*INCOMING_KEYS, *INCOMING_OPTIONAL)
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise VmConfigError(f"{unknown[0]}: unknown field (known: {', '.join(known)})")
    missing = [k for k in INCOMING_KEYS if k not in doc]
    if missing:
        raise VmConfigError(f"{missing[0]}: missing (required)")
    if not isinstance(doc["id"], str) or not _VM_ID.match(doc["id"]):
        raise VmConfigError(f"id: not a VM id: {str(doc['id'])[:40]!r}")
    if doc["accelerator"] not in ("kvm", "tcg"):
        raise VmConfigError(f"accelerator: expected kvm or tcg, got {doc['accelerator']!r}")
    if not isinstance(doc["software"], bool):
        raise VmConfigError("software: expected true or false")
    parse_public_key("source_key", doc["source_key"])
    agent = doc.get("agent")
    if agent is not None and (not isinstance(agent, str) or not 0 < len(agent) <= 64):
        raise VmConfigError("agent: expected the agent's version (at most 64 characters)")
    user_data = _user_data(doc.get("user_data"))
    times = []
    for key in ("started", "ends"):
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e11:
            raise VmConfigError(f"{key}: expected epoch seconds, got {v!r}")
        times.append(float(v))
    return IncomingRequest(
        vm_id=doc["id"],
        image=parse_image_name(doc["image"]),
        cores=_cores("cores", doc["cores"]),
        memory=_memory("memory", doc["memory"]),
        accelerator=doc["accelerator"],
        software=doc["software"],
        started=times[0],
        ends=times[1],
        source=_text("source", doc["source"])[:200],
        source_key=doc["source_key"],
        agent=agent,
        user_data=user_data,
    )
