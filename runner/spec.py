"""Job specs: what an elastic job runs and how much work one event is.

A spec is a TOML document::

    name = "mc-sim"
    command = ["/swarm/sw.example.org/bin/simulate",
               "--first", "{first}", "--count", "{count}", "--out", "{output}"]
    cpu_work_per_event = 50.0   # HS06.s
    max_events = 100000
    min_events = 10
    safety = 0.8
    events_per_task = 10
    task_timeout = 600          # optional, seconds

``{first}`` and ``{count}`` are the task's event range, ``{output}`` the file the
task writes (one record per event). Validation errors name the field.

Every field is bounded, because a spec comes from whoever may submit jobs
and a node must survive any spec it accepts (bounds and their reasons:
``docs/RUNNER.md``):

* ``name``: 1 to 64 characters of ``A-Z a-z 0-9 . _ + -``, not starting with
  ``.``, ``_``, ``+`` or ``-``: it names the job in the work history, the
  journal, the job's cgroup, logs and API answers, so no blank, control
  character or path separator;
* ``command``: at most 256 arguments of at most 4096 characters, no NUL;
* events (``max_events``, ``min_events``, ``first_event``,
  ``events_per_task``): at most ``MAX_EVENTS`` (10**12), so event numbers
  stay exact in the float arithmetic of sizing (below 2**53);
* ``cpu_work_per_event``: ``MIN_WORK``..``MAX_WORK`` HS06.s (1e-6..1e9);
* ``task_timeout``: at most ``MAX_TASK_TIMEOUT`` (7 days);
* the spec text itself: at most ``MAX_SPEC_BYTES`` (64 KiB).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.exceptions import JobSpecError

PLACEHOLDERS = ("{first}", "{count}", "{output}")
MAX_SPEC_BYTES = 64 * 1024
MAX_EVENTS = 10**12
MIN_WORK = 1e-6  # HS06.s per event
MAX_WORK = 1e9
MAX_TASK_TIMEOUT = 7 * 86400.0
MAX_ARGS = 256
MAX_ARG_CHARS = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_KNOWN = {
    "name",
    "command",
    "cpu_work_per_event",
    "max_events",
    "min_events",
    "safety",
    "events_per_task",
    "task_timeout",
    "first_event",
}


@dataclass(frozen=True)
class JobSpec:
    name: str
    command: tuple[str, ...]
    cpu_work_per_event: float  # HS06.s
    max_events: int
    min_events: int = 1
    safety: float = 0.8
    events_per_task: int = 10
    task_timeout: float | None = None
    first_event: int = 0

    def argv(self, first: int, count: int, output: str) -> list[str]:
        """The command of one task with its placeholders filled in."""
        return [
            arg.replace("{first}", str(first))
            .replace("{count}", str(count))
            .replace("{output}", output)
            for arg in self.command
        ]


def _int(
    data: Mapping[str, Any], key: str, default: int | None, minimum: int, maximum: int = MAX_EVENTS
) -> int:
    if key not in data:
        if default is None:
            raise JobSpecError(key, "is required")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(key, f"must be an integer, got {_short(value)}")
    if value < minimum:
        raise JobSpecError(key, f"must be >= {minimum}, got {value}")
    if value > maximum:
        raise JobSpecError(key, f"must be <= {maximum}, got {value}")
    return value


def _positive(
    data: Mapping[str, Any],
    key: str,
    default: float | None,
    minimum: float = 0.0,
    maximum: float = math.inf,
) -> float | None:
    """A finite number > 0 (and >= ``minimum``, <= ``maximum``), or ``default`` if absent."""
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobSpecError(key, f"must be a number, got {_short(value)}")
    if not math.isfinite(value) or value <= 0:
        raise JobSpecError(key, f"must be a positive number, got {value}")
    if value < minimum or value > maximum:
        raise JobSpecError(key, f"must be between {minimum:g} and {maximum:g}, got {value:g}")
    return float(value)


def _short(value: object) -> str:
    """``repr`` cut to one short line: error messages echo what they refuse."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _name(data: Mapping[str, Any]) -> str:
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise JobSpecError("name", "is required and must be a non-empty string")
    if not _NAME.fullmatch(name):
        raise JobSpecError(
            "name",
            "must be 1-64 characters of A-Z a-z 0-9 . _ + - starting with a letter or "
            f"digit, got {_short(name)}",
        )
    return name


def job_name(data: Mapping[str, Any]) -> str:
    """The ``name`` of a decoded spec, elastic or VM (:mod:`vm.job`), checked.

    Raises:
        JobSpecError: missing or not 1-64 characters of the allowed set.
    """
    return _name(data)


def _command(data: Mapping[str, Any]) -> tuple[str, ...]:
    command = data.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise JobSpecError("command", "is required and must be a non-empty list of strings")
    if len(command) > MAX_ARGS:
        raise JobSpecError("command", f"has {len(command)} arguments; at most {MAX_ARGS}")
    for arg in command:
        if len(arg) > MAX_ARG_CHARS:
            raise JobSpecError(
                "command", f"has an argument of {len(arg)} characters; at most {MAX_ARG_CHARS}"
            )
        if "\0" in arg:
            raise JobSpecError("command", f"argument {_short(arg)} contains a NUL character")
    joined = " ".join(command)
    for placeholder in PLACEHOLDERS:
        if placeholder not in joined:
            raise JobSpecError("command", f"must use the placeholder {placeholder}")
    return tuple(command)


def parse_spec(data: Mapping[str, Any]) -> JobSpec:
    """Validate a decoded spec mapping.

    Raises:
        JobSpecError: a field is missing, of the wrong type, out of range or unknown.
    """
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise JobSpecError(unknown[0][:64], "is not a known field")
    name = _name(data)
    command = _command(data)
    work = _positive(data, "cpu_work_per_event", None, MIN_WORK, MAX_WORK)
    if work is None:
        raise JobSpecError("cpu_work_per_event", "is required (HS06.s per event)")
    max_events = _int(data, "max_events", None, 1)
    min_events = _int(data, "min_events", 1, 1)
    if min_events > max_events:
        raise JobSpecError("min_events", f"({min_events}) exceeds max_events ({max_events})")
    safety = _positive(data, "safety", 0.8)
    assert safety is not None
    if safety > 1:
        raise JobSpecError("safety", f"must be in (0, 1], got {safety}")
    return JobSpec(
        name=name,
        command=command,
        cpu_work_per_event=work,
        max_events=max_events,
        min_events=min_events,
        safety=safety,
        events_per_task=_int(data, "events_per_task", 10, 1),
        task_timeout=_positive(data, "task_timeout", None, maximum=MAX_TASK_TIMEOUT),
        first_event=_int(data, "first_event", 0, 0),
    )


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a spec file.

    Raises:
        JobSpecError: the file cannot be read, is larger than ``MAX_SPEC_BYTES``,
            is not TOML, or fails validation (``field`` is ``"<file>"`` for the
            first three).
    """
    return parse_spec(decode_spec(read_spec_file(path), "<file>", f"{path} "))


def read_spec_file(path: str | Path) -> bytes:
    """The bytes of a spec file, at most ``MAX_SPEC_BYTES`` (not yet decoded).

    Raises:
        JobSpecError: the file cannot be read or is larger than
            ``MAX_SPEC_BYTES`` (field ``"<file>"``).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise JobSpecError("<file>", f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_SPEC_BYTES:
        raise JobSpecError("<file>", f"{path} is larger than {MAX_SPEC_BYTES} bytes")
    return raw


def decode_spec(raw: bytes, field: str = "<spec>", what: str = "") -> dict[str, Any]:
    """The TOML table of a spec's bytes (at most ``MAX_SPEC_BYTES``; not yet validated).

    Raises:
        JobSpecError: too large, not UTF-8, or not TOML (``field`` names it).
    """
    if len(raw) > MAX_SPEC_BYTES:
        raise JobSpecError(field, f"{what}is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JobSpecError(field, f"{what}is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(field, f"{what}is not valid TOML: {exc}") from exc
