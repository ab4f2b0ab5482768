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
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.exceptions import JobSpecError

PLACEHOLDERS = ("{first}", "{count}", "{output}")
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


def _int(data: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int:
    if key not in data:
        if default is None:
            raise JobSpecError(key, "is required")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise JobSpecError(key, f"must be >= {minimum}, got {value}")
    return value


def _positive(data: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobSpecError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise JobSpecError(key, f"must be a positive number, got {value}")
    return float(value)


def parse_spec(data: Mapping[str, Any]) -> JobSpec:
    """Validate a decoded spec mapping.

    Raises:
        JobSpecError: a field is missing, of the wrong type, out of range or unknown.
    """
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise JobSpecError(unknown[0], "is not a known field")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise JobSpecError("name", "is required and must be a non-empty string")
    if "/" in name or name.startswith("."):
        raise JobSpecError("name", f"must not contain '/' or start with '.', got {name!r}")
    command = data.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise JobSpecError("command", "is required and must be a non-empty list of strings")
    joined = " ".join(command)
    for placeholder in ("{first}", "{count}", "{output}"):
        if placeholder not in joined:
            raise JobSpecError("command", f"must use the placeholder {placeholder}")
    work = _positive(data, "cpu_work_per_event", None)
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
        command=tuple(command),
        cpu_work_per_event=work,
        max_events=max_events,
        min_events=min_events,
        safety=safety,
        events_per_task=_int(data, "events_per_task", 10, 1),
        task_timeout=_positive(data, "task_timeout", None),
        first_event=_int(data, "first_event", 0, 0),
    )


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a spec file.

    Raises:
        JobSpecError: the file cannot be read, is not TOML, or fails validation
            (``field`` is ``"<file>"`` for the first two).
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise JobSpecError("<file>", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("<file>", f"{path} is not valid TOML: {exc}") from exc
    return parse_spec(data)
