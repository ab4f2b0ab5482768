"""Source trees with every case the release format must get right."""

from __future__ import annotations

import os
import random
from pathlib import Path

HELLO = '#!/bin/sh\necho "hello from revision $(cat "$(dirname "$0")/../VERSION")"\n'


def build_sample_tree(root: Path, *, version: str = "1", large_mib: int = 0) -> Path:
    """A tree with files, modes, symlinks, hard links, odd names, deep paths."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "VERSION").write_text(version + "\n")
    bin_ = root / "bin"
    bin_.mkdir(exist_ok=True)
    hello = bin_ / "hello"
    hello.write_text(HELLO)
    hello.chmod(0o755)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir(exist_ok=True)
    secret = root / "private"
    secret.write_text("mode 0600\n")
    secret.chmod(0o600)
    ro = root / "read-only"
    ro.write_text("mode 0444\n")
    ro.chmod(0o444)
    (root / "with space and ünïcödé ✓.txt").write_text("odd name\n")
    lib = root / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "data.bin").write_bytes(bytes(range(256)) * 64)
    links = {
        "rel-link": "bin/hello",
        "abs-link": "/etc/hostname",
        "dangling": "does/not/exist",
        "lib/up": "../VERSION",
    }
    for name, target in links.items():
        p = root / name
        if p.is_symlink():
            p.unlink()
        os.symlink(target, p)
    first = root / "hard-a"
    first.write_text("hard linked\n")
    second = root / "lib" / "hard-b"
    if not second.exists():
        os.link(first, second)
    deep = root
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True, exist_ok=True)
    (deep / "bottom.txt").write_text("deep\n")
    os.utime(root / "VERSION", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    if large_mib:
        rnd = random.Random(42)
        (root / "large.bin").write_bytes(rnd.randbytes(large_mib << 20))
    return root
