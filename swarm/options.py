"""Values a person gives ``swarm``, in a node config or on the command line,
checked where they enter: durations, counts and the directories to write in.

The one owner of these formats in ``swarm`` (a size belongs to
``runner/sizes.py``).  A duration is a finite number of seconds from
:data:`MIN_SECONDS` to :data:`MAX_SECONDS`; a count is a whole number within
the range its use allows; ``nan``, ``inf``, zero where it makes no sense, and
negatives are refused with a message that says what is accepted.  The
argparse adapters (``*_argument``) turn a bad value into argparse's usage
error, and :class:`OneLineParser` prints that as one line.

Directories are checked without creating anything (:func:`check_directory`),
so a command refused for a bad path leaves no trace behind.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from swarm.exceptions import ConfigError

MIN_SECONDS = (
    0.1  # a shorter wait or interval would only spin (e.g. poll the origin 30 times a second)
)
MAX_SECONDS = 7 * 86400.0  # a week; far beyond any useful wait, well within what timers accept


class ValueRangeError(ValueError):
    """A value outside what its key or option accepts; the message says what is."""


def parse_seconds(
    value: object, *, minimum: float = MIN_SECONDS, maximum: float = MAX_SECONDS
) -> float:
    """Seconds from an int, a float or a numeric string.

    Raises:
        ValueRangeError: not a number, not finite, or outside [minimum, maximum].
    """
    accepted = f"a number of seconds from {minimum:g} to {maximum:g}"
    if isinstance(value, bool):
        raise ValueRangeError(f"expected {accepted}, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueRangeError(f"expected {accepted}, got {value!r}") from None
    if not isinstance(value, int | float):
        raise ValueRangeError(f"expected {accepted}, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or not minimum <= seconds <= maximum:
        raise ValueRangeError(f"expected {accepted}, got {value!r}")
    return seconds


def parse_count(value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    """A whole number from an int or a decimal string.

    Raises:
        ValueRangeError: not a whole number, or outside [minimum, maximum].
    """
    accepted = (
        f"a whole number of at least {minimum}"
        if maximum is None
        else f"a whole number from {minimum} to {maximum}"
    )
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueRangeError(f"expected {accepted}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueRangeError(f"expected {accepted}, got {value}")
    return value


def seconds_argument(
    minimum: float = MIN_SECONDS, maximum: float = MAX_SECONDS
) -> Callable[[str], float]:
    """:func:`parse_seconds` as an argparse ``type=``."""

    def parse(text: str) -> float:
        try:
            return parse_seconds(text, minimum=minimum, maximum=maximum)
        except ValueRangeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def count_argument(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """:func:`parse_count` as an argparse ``type=``."""

    def parse(text: str) -> int:
        try:
            return parse_count(text, minimum=minimum, maximum=maximum)
        except ValueRangeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def check_directory(path: Path, what: str) -> Path:
    """Check that ``path`` is, or can be created as, a directory this process
    can write in, without creating anything: the path, or its nearest
    existing ancestor, must be a directory, writable, on a file system
    mounted read-write.

    Raises:
        ConfigError: naming ``what``: a file is in the way, the file system is
            read-only, no permission, or the path cannot be examined.
    """
    existing = path
    try:
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            if existing == path:
                raise ConfigError(f"{what}: {path} is not a directory")
            raise ConfigError(f"{what}: cannot create {path}: {existing} is not a directory")
        created = "" if existing == path else f"cannot create {path}: "
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise ConfigError(f"{what}: {created}{existing} is on a read-only file system")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{what}: {created}{existing} is not writable")
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: {exc.strerror}") from None
    return path


def existing_directory(path: Path, what: str) -> Path:
    """Check that ``path`` is an existing directory (to read from).

    Raises:
        ConfigError: naming ``what``: missing, or not a directory.
    """
    try:
        if path.is_dir():
            return path
        exists = path.exists()
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: {exc.strerror}") from None
    raise ConfigError(f"{what}: {path} {'is not a directory' if exists else 'does not exist'}")
