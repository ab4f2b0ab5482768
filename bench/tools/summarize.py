"""Summarize py-spy ``--format raw`` (collapsed stacks): top inclusive and self frames.

Usage: python bench/tools/summarize.py FILE.raw [...]
"""

from __future__ import annotations

import collections
import re
import sys

_PREFIX = re.compile(r" \((?:/work/main/\.venv/lib/python3\.11/site-packages/|/work/main/)")


def summarize(path: str, top: int = 24) -> None:
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            names = [_PREFIX.sub(" (", frame) for frame in stack.split(";")]
            for name in set(names):
                incl[name] += n
            own[names[-1]] += n
    print(f"{path}: {total} samples")
    for name, n in incl.most_common(top):
        print(f"  {n:6d} {100 * n / total:5.1f}% {name[:140]}")
    print(" self:")
    for name, n in own.most_common(10):
        print(f"  {n:6d} {100 * n / total:5.1f}% {name[:140]}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarize(p)
