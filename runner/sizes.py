"""Sizes in bytes, written as a person writes them: ``4096``, ``512M``, ``10G``, ``1.5GiB``.

The one owner of the size format: the node's ``cache_quota``, the runner's
``memory``, ``swarm mount --quota`` and ``swarm image`` all parse through
:func:`parse_size`, so ``"200M"`` means the same everywhere.  Units are binary
(K = 1024).  A size is a positive whole number of bytes below 2**63; anything
else (zero, negative, ``nan``, ``inf``, ``1e400G``, ``12 parsecs``) is refused
with a message that says what is accepted.
"""

from __future__ import annotations

import argparse
import math
import re

MAX_SIZE = (1 << 63) - 1
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(
    r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:E[+-]?[0-9]+)?)\s*([KMGTP]?)(?:I?B)?\s*$"
)
ACCEPTED = 'a positive size in bytes, e.g. 4096, "512M", "10G"'


class SizeError(ValueError):
    """A value that is not a size; the message says what was wrong and what is accepted."""


def parse_size(value: object) -> int:
    """Bytes from an int (``4096``) or a string (``"512M"``, ``"10GiB"``).

    Raises:
        SizeError: not a size, zero or negative, not finite, or 2**63 bytes or more.
    """
    if isinstance(value, bool):
        raise SizeError(f"expected {ACCEPTED}, got {value!r}")
    if isinstance(value, int):
        number: float = value
        unit = ""
    elif isinstance(value, str):
        m = _SIZE.match(value.upper())
        if m is None:
            raise SizeError(f"expected {ACCEPTED}, got {value!r}")
        number = float(m.group(1))
        unit = m.group(2)
    else:
        raise SizeError(f"expected {ACCEPTED}, got {value!r}")
    if not math.isfinite(number) or number * _UNITS[unit] > MAX_SIZE:
        raise SizeError(f"size {value!r} is too large (at most {MAX_SIZE} bytes)")
    size = int(number * _UNITS[unit]) if isinstance(number, float) else number * _UNITS[unit]
    if size <= 0:
        raise SizeError(f"expected {ACCEPTED}, got {value!r}: a size must be positive")
    return size


def format_size(size: int) -> str:
    """``10737418240`` -> ``"10G"`` when exact, else the plain byte count."""
    for unit in ("P", "T", "G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def size_argument(text: str) -> int:
    """``parse_size`` as an argparse ``type=``: a bad value is a one-line usage error."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
