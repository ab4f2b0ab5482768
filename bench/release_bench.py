"""The state of the "signed software releases" benchmark (``python -m bench.run``).

:class:`ReleaseBench` holds what every section shares: the arguments, the generated
and the Python trees, one signing key set per repository, the store, the loopback
origin, the mounts (through :class:`bench.util.Resources`, which unmounts and ends
only what it started) and the rows and raw samples collected so far.  It also
builds the data (:meth:`ReleaseBench.prepare`) and the squashfs images of the
baseline.  The timed sections are in :mod:`bench.release_sections`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.datasets import TreeParams, generate_tree, python_tree
from bench.report import Row
from bench.util import (
    ROOT,
    VENV_BIN,
    BenchError,
    Resources,
    can_drop_caches,
    drop_caches,
    median,
    rm_tree,
    run,
    say,
    timed,
    tree_bytes_files,
)

WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
TREE_REPO = "tree.bench.local"
PY_REPO = "py.bench.local"
MB = 1e6


def check_prerequisites() -> list[str]:
    """Raise BenchError naming what is missing; return notes about degraded rows."""
    missing = [t for t in ("fusermount3", "squashfuse", "mksquashfs") if not shutil.which(t)]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: run `make bench` (it installs fuse3, squashfuse,"
            " squashfs-tools and nginx)"
        )
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing: FUSE mounts are impossible on this machine")
    if not (VENV_BIN / "swarm").exists():
        raise BenchError(f"{VENV_BIN / 'swarm'} missing: run `make install`")
    try:
        run([VENV_BIN / "python", "-c", "import trust.keys, trust.repository"])
    except BenchError as exc:
        raise BenchError(
            "the trust package is incomplete (trust.keys / trust.repository do not import),"
            " so publish cannot work yet:\n" + str(exc)
        ) from None
    notes = []
    if not can_drop_caches():
        notes.append("not root: cannot drop caches; 'cold' and 'dropped' rows are skipped")
    return notes


def mount_possible() -> str | None:
    """None when ``swarm mount`` can work, else why not."""
    try:
        run([VENV_BIN / "python", "-c", "import swarm.mount_service"])
    except BenchError as exc:
        return "swarm.mount_service does not import: " + str(exc).strip().splitlines()[-1]
    return None


class ReleaseBench:
    """What the sections share; one per run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reps: int = args.reps
        self.res = Resources()
        self.rows: list[Row] = []
        self.samples: dict[str, Any] = {}
        self.run_dir = WORK / "run"
        self.drop = can_drop_caches()
        self.tree = WORK / ("tree-quick" if args.quick else "tree")
        self.pytree = WORK / "pytree"
        self.store = self.run_dir / "store"
        self.origin = ""
        self.meta: dict[str, Any] = {}
        self.big_rel = ""

    def record(self, key: str, values: list[float]) -> float:
        self.samples[key] = [round(v, 6) for v in values]
        m = median(values)
        say(f"  {key}: median {m:.4f} s of {len(values)} ({', '.join(f'{v:.3f}' for v in values)})")
        return m

    def keys(self, repo: str) -> Path:
        return self.run_dir / f"keys-{repo}"

    def trust(self, repo: str) -> Path:
        return self.keys(repo) / "root.json"

    def publish(self, src: Path, repo: str, store: Path) -> tuple[float, dict[str, Any]]:
        os.sync()  # earlier runs' dirty pages must not be written back on our clock
        t0 = time.perf_counter()
        out = run(
            [
                VENV_BIN / "swarm",
                "publish",
                src,
                "--repo",
                repo,
                "--keys",
                self.keys(repo),
                "--store",
                store,
                "--quiet",
                "--json",
            ]
        )
        wall = time.perf_counter() - t0
        info: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return wall, info

    def maybe_drop(self) -> None:
        if self.drop:
            drop_caches()

    def mount(self, repo: str, mp: Path, cache: Path) -> None:
        self.res.swarm_mount(repo, mp, self.origin, self.trust(repo), cache)

    # -- sections ---------------------------------------------------------------
    def prepare(self) -> None:
        a = self.args
        p = TreeParams(files=a.files, large_files=a.large_count, large_mib=a.large_mib)
        WORK.mkdir(parents=True, exist_ok=True)
        big = generate_tree(self.tree, p)
        self.big_rel = str(big.relative_to(self.tree))
        if not a.skip_python:
            python_tree(self.pytree)
        rm_tree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        for repo in (TREE_REPO, PY_REPO):
            run([VENV_BIN / "swarm", "keys", "init", self.keys(repo), "--repo", repo])
        nbytes, nfiles = tree_bytes_files(self.tree)
        self.tree_bytes, self.tree_files = nbytes, nfiles
        self.meta["dataset"] = (
            f"generated tree: {nfiles} regular files, {nbytes / MB:.1f} MB"
            f" ({a.files} small files in {p.dirs} dirs, 1 % symlinks,"
            f" {a.large_count} x {a.large_mib} MiB random); Python tree: pip install --target"
            f" numpy scipy rich" + (" (skipped)" if a.skip_python else "")
        )

    def squash_image(self, src: Path, name: str) -> Path:
        """mksquashfs of ``src`` (cached: rebuilt when the tree is newer than the image)."""
        img = WORK / f"{name}.sqfs"
        stamp = WORK / f"{name}.sqfs.src"
        params = src.parent / (src.name + ".params.json")
        key = params.read_text() if params.exists() else str(src.stat().st_mtime_ns)
        if img.exists() and stamp.exists() and stamp.read_text() == key:
            say(f"reusing squashfs image {img}")
            return img
        say(f"mksquashfs {src} -> {img}")
        img.unlink(missing_ok=True)
        t = timed(["mksquashfs", src, img, "-noappend", "-quiet", "-no-progress"])
        say(f"  mksquashfs took {t:.1f} s")
        stamp.write_text(key)
        return img
