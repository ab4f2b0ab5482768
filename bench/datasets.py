"""The benchmark's data: a generated tree and a real Python package tree.

Both are cached under ``bench/work/`` between runs; the generated tree is
rebuilt only when its parameters change (recorded in ``PARAMS``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.util import BenchError, rm_tree, run, say

PY_PACKAGES = ["numpy", "scipy", "rich"]
IMPORT_STMT = "import numpy, scipy, scipy.linalg, scipy.sparse, rich.console"


@dataclass(frozen=True)
class TreeParams:
    files: int
    large_files: int
    large_mib: int
    seed: int = 1
    version: int = 1  # bump when the generator changes

    @property
    def dirs(self) -> int:
        return max(10, self.files // 100)


def _small_size(rng: random.Random) -> int:
    """0..16 KiB, skewed small like a software release (many tiny files, some 0 bytes)."""
    r = rng.random()
    if r < 0.03:
        return 0
    if r < 0.55:
        return rng.randint(1, 2048)
    if r < 0.85:
        return rng.randint(2048, 8192)
    return rng.randint(8192, 16384)


def generate_tree(root: Path, p: TreeParams) -> Path:
    """Build (or reuse) the generated tree at ``root``; returns the path of one large file.

    Layout: ``p.dirs`` directories up to three levels deep, ``p.files`` small
    files spread over them, 1 % of the names symlinks to sibling files, and
    ``large/big-N.bin`` of ``p.large_mib`` MiB of random bytes each.
    """
    marker = root / ".." / (root.name + ".params.json")
    want = json.dumps(asdict(p), sort_keys=True)
    big = root / "large" / "big-0.bin"
    if root.is_dir() and marker.exists() and marker.read_text() == want:
        say(f"reusing generated tree {root}")
        return big
    rm_tree(root)
    marker.unlink(missing_ok=True)
    say(
        f"generating {root}: {p.files} small files in {p.dirs} dirs,"
        f" {p.large_files} x {p.large_mib} MiB"
    )
    rng = random.Random(p.seed)
    dirs: list[Path] = []
    for i in range(p.dirs):
        if i < 10 or not dirs:
            d = root / f"pkg{i:03d}"
        else:
            parent = dirs[rng.randrange(len(dirs))]
            if len(parent.relative_to(root).parts) >= 3:
                parent = parent.parent
            d = parent / f"sub{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    # A pool of random bytes to slice file contents from (cheap, and not compressible).
    pool = rng.randbytes(4 << 20)
    made: list[Path] = []
    for i in range(p.files):
        d = dirs[i % len(dirs)]
        if made and rng.random() < 0.01:
            target = made[-1]
            link = d / f"link{i:06d}"
            link.symlink_to(os.path.relpath(target, d))
            continue
        size = _small_size(rng)
        off = rng.randrange(0, len(pool) - size)
        f = d / f"file{i:06d}.{rng.choice(['py', 'so', 'txt', 'json', 'h', 'dat'])}"
        # A unique header so that no two files share content (dedup would flatter us).
        data = (f"{i}\n".encode() + pool[off : off + size])[:size] if size else b""
        f.write_bytes(data)
        made.append(f)
    (root / "pkg000" / "changed-by-bench.txt").write_text("original\n")
    large = root / "large"
    large.mkdir(parents=True, exist_ok=True)
    for n in range(p.large_files):
        with open(large / f"big-{n}.bin", "wb") as fh:
            for _ in range(p.large_mib):
                fh.write(os.urandom(1 << 20))
    marker.write_text(want)
    return big


def touch_one_small_file(root: Path, counter: int) -> Path:
    """Change the content of one small file (same size class), for incremental publish."""
    f = root / "pkg000" / "changed-by-bench.txt"
    f.write_text(f"incremental publish #{counter} at {time.time_ns()}\n")
    return f


def python_tree(root: Path) -> Path:
    """``pip install --target`` of numpy, scipy and rich, cached at ``root``."""
    if (root / "numpy").is_dir() and (root / "scipy").is_dir() and (root / "rich").is_dir():
        say(f"reusing Python package tree {root}")
        return root
    tmp = root.with_name(root.name + ".tmp")
    rm_tree(tmp)
    say(f"pip install --target {root} {' '.join(PY_PACKAGES)} (once; cached afterwards)")
    run([sys.executable, "-m", "pip", "install", "-q", "--target", tmp, *PY_PACKAGES])
    rm_tree(root)
    tmp.rename(root)
    check = run(
        [sys.executable, "-c", IMPORT_STMT + "; print('ok')"],
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if "ok" not in check:
        raise BenchError(f"the package tree {root} does not import: {check}")
    return root
