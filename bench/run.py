"""``python -m bench.run``: the "signed software releases" benchmark.

Publishes a generated tree and a real Python package tree, serves them from a
loopback origin, mounts them, and compares, in one run, against ``sha256sum``,
the native directory and squashfuse (a C FUSE filesystem over a mksquashfs
image of the same tree).  See ``bench/README.md`` for what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import lease_trace
from bench.datasets import (
    IMPORT_STMT,
    TreeParams,
    generate_tree,
    python_tree,
    touch_one_small_file,
)
from bench.report import Row, base_meta, write_results
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
    timed_shell,
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


class Bench:
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

    # -- small helpers ----------------------------------------------------------

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

    def bench_publish(self) -> None:
        say("== 1. publish throughput vs sha256sum (warm page cache)")
        tree = str(self.tree)
        timed_shell(f"find '{tree}' -type f -print0 | xargs -0 cat > /dev/null")  # warm up
        sha = [
            timed_shell(f"find '{tree}' -type f -print0 | xargs -0 sha256sum > /dev/null")
            for _ in range(self.reps)
        ]
        sha_s = self.record("sha256sum_s", sha)
        walls: list[float] = []
        infos: list[dict[str, Any]] = []
        for i in range(self.args.publish_runs):
            store = self.run_dir / f"store-full-{i}"
            timed_shell(f"find '{tree}' -type f -print0 | xargs -0 cat > /dev/null")
            w, info = self.publish(self.tree, TREE_REPO, store)
            walls.append(w)
            infos.append(info)
            say(f"  full publish #{i}: {w:.2f} s wall, {json.dumps(info)}")
            if i < self.args.publish_runs - 1:
                rm_tree(store)
            else:
                store.rename(self.store)
        self.samples["publish_full_json"] = infos
        pub_s = self.record("publish_full_s", walls)
        nb, nf = self.tree_bytes, self.tree_files
        self.rows.append(
            Row(
                "publish throughput, bytes (whole tree, warm)",
                "MB/s",
                nb / pub_s / MB,
                "sha256sum",
                nb / sha_s / MB,
                (">=", 1.0),
                note=f"{nb / MB:.0f} MB; publish {pub_s:.2f} s, sha256sum {sha_s:.2f} s",
            )
        )
        self.rows.append(
            Row(
                "publish throughput, files (whole tree, warm)",
                "files/s",
                nf / pub_s,
                "sha256sum",
                nf / sha_s,
                (">=", 1.0),
                note=f"{nf} files",
            )
        )
        inc: list[float] = []
        for i in range(self.reps):
            touch_one_small_file(self.tree, i)
            w, info = self.publish(self.tree, TREE_REPO, self.store)
            inc.append(w)
            self.samples.setdefault("publish_one_changed_json", []).append(info)
        inc_s = self.record("publish_one_changed_s", inc)
        same = [self.publish(self.tree, TREE_REPO, self.store)[0] for _ in range(self.reps)]
        same_s = self.record("publish_unchanged_s", same)
        self.rows.append(
            Row(
                "incremental publish, one small file changed",
                "s",
                inc_s,
                "full publish",
                pub_s,
                ("<=", 2.0),
                absolute=True,
            )
        )
        self.rows.append(
            Row("incremental publish, nothing changed", "s", same_s, "full publish", pub_s)
        )
        if not self.args.skip_python:
            w, info = self.publish(self.pytree, PY_REPO, self.store)
            self.samples["publish_pytree_json"] = info
            say(f"  published the Python tree in {w:.2f} s: {json.dumps(info)}")

    def _find(self, d: Path) -> float:
        return timed_shell(f"find '{d}' -printf '%s %m %T@\\n' > /dev/null")

    def bench_find(self) -> None:
        say("== 2. find + lstat of every entry: ours vs native vs squashfuse")
        img = self.squash_image(self.tree, self.tree.name)
        mnt = self.run_dir / "mnt"
        sq = self.run_dir / "sq"
        cold_n: list[float] = []
        if self.drop:
            for _ in range(self.reps):
                drop_caches()
                cold_n.append(self._find(self.tree))
        hot_n = [self._find(self.tree) for _ in range(self.reps)]
        # squashfuse: fresh mount each cold sample.
        cold_q: list[float] = []
        hot_q: list[float] = []
        for i in range(self.reps):
            self.res.squashfuse_mount(img, sq)
            self.maybe_drop()
            cold_q.append(self._find(sq))
            if i == self.reps - 1:
                hot_q = [self._find(sq) for _ in range(self.reps)]
            self.res.unmount(sq)
        # ours, objects and catalogs in the local cache.
        cache = self.run_dir / "cache-find"
        self.mount(TREE_REPO, mnt, cache)
        self._find(mnt)  # fill the local cache with every catalog
        self.res.unmount(mnt, cache)
        cold_o: list[float] = []
        hot_o: list[float] = []
        for i in range(self.reps):
            self.mount(TREE_REPO, mnt, cache)
            self.maybe_drop()
            cold_o.append(self._find(mnt))
            if i == self.reps - 1:
                hot_o = [self._find(mnt) for _ in range(self.reps)]
            self.res.unmount(mnt, cache)
        # ours, fresh cache: catalogs below the root come from the origin.
        cold_f: list[float] = []
        for i in range(self.reps):
            c = self.run_dir / f"cache-find-fresh-{i}"
            self.mount(TREE_REPO, mnt, c)
            self.maybe_drop()
            cold_f.append(self._find(mnt))
            self.res.unmount(mnt, c)
        hn, hq, ho = (self.record(k, v) for k, v in [("find_native_hot_s", hot_n),
                                                      ("find_squashfuse_hot_s", hot_q),
                                                      ("find_ours_hot_s", hot_o)])  # fmt: skip
        cq = self.record("find_squashfuse_cold_s", cold_q)
        co = self.record("find_ours_cold_local_cache_s", cold_o)
        cf = self.record("find_ours_cold_fresh_cache_s", cold_f)
        cn = self.record("find_native_cold_s", cold_n) if cold_n else None
        note = "" if self.drop else "not root: page cache NOT dropped"
        self.rows.append(
            Row(
                "find -printf (lstat all), cold: fresh mount, caches dropped, local cache",
                "s",
                co,
                "squashfuse cold",
                cq,
                ("<=", 0.5),
                others={"native cold": cn} if cn is not None else {},
                note=note,
            )
        )
        self.rows.append(
            Row(
                "find -printf, cold, fresh cache dir (catalogs from loopback origin)",
                "s",
                cf,
                "squashfuse cold",
                cq,
                note=note,
            )
        )
        self.rows.append(
            Row(
                "find -printf (lstat all), hot",
                "s",
                ho,
                "native hot",
                hn,
                ("<=", 1.5),
                others={"squashfuse hot": hq},
            )
        )

    def _dd(self, f: Path) -> float:
        return timed(["dd", f"if={f}", "of=/dev/null", "bs=1M"])

    def bench_read(self) -> None:
        say("== 3. sequential read of a large file (dd bs=1M)")
        rel = self.big_rel
        size = (self.tree / rel).stat().st_size
        img = self.squash_image(self.tree, self.tree.name)
        mnt = self.run_dir / "mnt"
        sq = self.run_dir / "sq"
        self._dd(self.tree / rel)
        hot_n = [self._dd(self.tree / rel) for _ in range(self.reps)]
        first_q: list[float] = []
        hot_q: list[float] = []
        if self.drop:
            for i in range(self.reps):
                self.res.squashfuse_mount(img, sq)
                drop_caches()
                first_q.append(self._dd(sq / rel))
                if i == self.reps - 1:
                    hot_q = [self._dd(sq / rel) for _ in range(self.reps)]
                self.res.unmount(sq)
        origin_o: list[float] = []
        hot_o: list[float] = []
        cache = self.run_dir / "cache-read-0"
        for i in range(self.args.origin_reps):
            c = self.run_dir / f"cache-read-{i}"
            self.mount(TREE_REPO, mnt, c)
            self.maybe_drop()
            origin_o.append(self._dd(mnt / rel))
            if i == 0:
                hot_o = [self._dd(mnt / rel) for _ in range(self.reps)]
            self.res.unmount(mnt, c)
        local_o: list[float] = []
        if self.drop:
            for _ in range(self.reps):
                self.mount(TREE_REPO, mnt, cache)
                drop_caches()
                local_o.append(self._dd(mnt / rel))
                self.res.unmount(mnt, cache)

        def rate(key: str, xs: list[float]) -> float | None:
            return size / self.record(key, xs) / MB if xs else None

        hn = rate("dd_native_hot_s", hot_n)
        ho = rate("dd_ours_hot_s", hot_o)
        hq = rate("dd_squashfuse_hot_s", hot_q)
        fq = rate("dd_squashfuse_first_s", first_q)
        lo = rate("dd_ours_first_local_cache_s", local_o)
        oo = rate("dd_ours_cold_origin_s", origin_o)
        self.rows.append(
            Row(
                f"read {size >> 20} MiB file, hot (page cache)",
                "MB/s",
                ho,
                "native hot",
                hn,
                (">=", 0.5),
                others={"squashfuse hot": hq} if hq else {},
            )
        )
        if self.drop:
            self.rows.append(
                Row(
                    "read large file, first read after remount + drop caches, local cache",
                    "MB/s",
                    lo,
                    "squashfuse first read",
                    fq,
                    (">=", 1.0),
                )
            )
        self.rows.append(
            Row(
                "read large file, cold from loopback origin (fresh cache dir)",
                "MB/s",
                oo,
                "squashfuse first read" if fq else "",
                fq,
                note="" if self.drop else "not root: page cache NOT dropped",
            )
        )

    def _import(self, d: Path) -> float:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(d),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        return timed([sys.executable, "-c", IMPORT_STMT], env=env)

    def bench_import(self) -> None:
        say(f"== 4. python -c '{IMPORT_STMT}'")
        img = self.squash_image(self.pytree, "pytree")
        mnt = self.run_dir / "mnt-py"
        sq = self.run_dir / "sq-py"
        n_hot = max(5, self.reps)
        self._import(self.pytree)
        hot_n = [self._import(self.pytree) for _ in range(n_hot)]
        drop_n: list[float] = []
        if self.drop:
            for _ in range(self.reps):
                drop_caches()
                drop_n.append(self._import(self.pytree))
        hot_q: list[float] = []
        drop_q: list[float] = []
        for i in range(self.reps if self.drop else 1):
            self.res.squashfuse_mount(img, sq)
            if self.drop:
                drop_caches()
                drop_q.append(self._import(sq))
            if i == 0:
                self._import(sq)
                hot_q = [self._import(sq) for _ in range(n_hot)]
            self.res.unmount(sq)
        cold_o: list[float] = []
        hot_o: list[float] = []
        cache = self.run_dir / "cache-py-0"
        for i in range(self.args.origin_reps):
            c = self.run_dir / f"cache-py-{i}"
            self.mount(PY_REPO, mnt, c)
            self.maybe_drop()
            cold_o.append(self._import(mnt))
            if i == 0:
                self._import(mnt)
                hot_o = [self._import(mnt) for _ in range(n_hot)]
            self.res.unmount(mnt, c)
        drop_o: list[float] = []
        if self.drop:
            for _ in range(self.reps):
                self.mount(PY_REPO, mnt, cache)
                drop_caches()
                drop_o.append(self._import(mnt))
                self.res.unmount(mnt, cache)
        hn = self.record("import_native_hot_s", hot_n)
        hq = self.record("import_squashfuse_hot_s", hot_q)
        ho = self.record("import_ours_hot_s", hot_o)
        co = self.record("import_ours_cold_origin_s", cold_o)
        self.rows.append(
            Row(
                "import numpy+scipy+rich, hot",
                "s",
                ho,
                "native hot",
                hn,
                ("<=", 1.1),
                others={"squashfuse hot": hq},
            )
        )
        if self.drop:
            dn = self.record("import_native_dropped_s", drop_n)
            dq = self.record("import_squashfuse_dropped_s", drop_q)
            do = self.record("import_ours_dropped_local_cache_s", drop_o)
            self.rows.append(
                Row(
                    "import, remount + caches dropped, objects in local cache",
                    "s",
                    do,
                    "native dropped",
                    dn,
                    ("<=", 1.5),
                    others={"squashfuse dropped": dq},
                )
            )
            self.rows.append(
                Row(
                    "import, cold from loopback origin (fresh cache dir)",
                    "s",
                    co,
                    "native dropped",
                    dn,
                    others={"squashfuse dropped": dq},
                )
            )
        else:
            self.rows.append(Row("import, cold from loopback origin (fresh cache dir)", "s", co))

    # -- driver -----------------------------------------------------------------

    def main(self) -> int:
        self.meta = base_meta("")
        self.meta["notes"] += check_prerequisites()
        sections: list[tuple[str, Callable[[], None]]] = [
            ("find", self.bench_find),
            ("read", self.bench_read),
        ]
        if not self.args.skip_python:
            sections.append(("import", self.bench_import))
        try:
            self.prepare()
            self.bench_publish()
            self.origin = self.res.start_origin(self.store, self.run_dir / "origin.log")
            say(f"origin at {self.origin}")
            why = mount_possible()
            if why:
                self.meta["errors"].append(f"mount sections skipped: {why}")
                say(f"skipping the mount sections: {why}")
                sections = []
            for name, fn in sections:
                if self.args.only and name not in self.args.only:
                    continue
                try:
                    fn()
                except BenchError as exc:
                    say(f"section {name} failed: {exc}")
                    self.meta["errors"].append(f"{name}: {str(exc).splitlines()[0]}")
                    self.res.close()
                    self.origin = self.res.start_origin(self.store, self.run_dir / "origin.log")
                except Exception:
                    say(f"section {name} crashed:\n{traceback.format_exc()}")
                    self.meta["errors"].append(f"{name}: crashed (see stderr)")
                    raise
        finally:
            self.res.close()
            if self.rows:
                tag = self.args.tag or ("quick" if self.args.quick else "full")
                j, md = write_results(RESULTS, tag, self.rows, self.samples, self.meta)
                say(f"wrote {j} and {md}")
                sys.stdout.write(md.read_text())
        failed = [r.name for r in self.rows if r.passed is False]
        if failed:
            say(f"{len(failed)} goal(s) missed: {'; '.join(failed)}")
        return 1 if self.meta["errors"] else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="5k files, 1 x 64 MiB, 3 samples")
    p.add_argument("--files", type=int, help="small files in the generated tree (100000)")
    p.add_argument("--large-mib", type=int, help="size of each large file in MiB (256)")
    p.add_argument("--large-count", type=int, help="number of large files (3)")
    p.add_argument("--reps", type=int, help="samples per timed measure (3)")
    p.add_argument("--publish-runs", type=int, help="full publishes timed (3; 2 if --quick)")
    p.add_argument("--origin-reps", type=int, help="cold-from-origin samples (2; 1 if --quick)")
    p.add_argument("--skip-python", action="store_true", help="no Python package tree")
    p.add_argument(
        "--only",
        nargs="*",
        choices=["find", "read", "import", "lease", "distribution", "streaming"],
        help="sections",
    )
    p.add_argument("--tag", help="results file name (default: quick or full)")
    a = p.parse_args(argv)
    quick = a.quick
    a.files = a.files if a.files is not None else (5000 if quick else 100_000)
    a.large_mib = a.large_mib if a.large_mib is not None else (64 if quick else 256)
    a.large_count = a.large_count if a.large_count is not None else (1 if quick else 3)
    a.reps = a.reps if a.reps is not None else 3
    a.publish_runs = a.publish_runs if a.publish_runs is not None else (2 if quick else 3)
    a.origin_reps = a.origin_reps if a.origin_reps is not None else (1 if quick else 2)
    return a


def _swarm_sections(args: argparse.Namespace) -> int:
    """Distribution of one image to N namespaced nodes against http, squid and
    aria2, then boot streaming through the mount (full: N=16, 256 MiB)."""
    import signal

    from bench import distribution, image_streaming

    signal.signal(signal.SIGTERM, distribution._sigterm)  # tear the namespaces down on SIGTERM
    rc = 0
    if not args.only or "distribution" in args.only:
        nodes, size = (4, 32) if args.quick else (16, 256)
        say(f"distribution: {nodes} nodes, {size} MiB, 50 Mbit/s links")
        record = distribution.run_distribution(
            nodes,
            size,
            50.0,
            command=f"python -m bench.distribution --nodes {nodes} --size-mib {size}",
        )
        sys.stdout.write(distribution.markdown(record))
        rc |= 1 if any(r["error"] for r in record["systems"]) else 0
    if not args.only or "streaming" in args.only:
        size = 64 if args.quick else 256
        rc |= image_streaming.main(["--size-mib", str(size)])
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lease = lease_trace.from_bench_run(args.quick, args.only)  # runner: bench/lease_trace.py
        swarm = _swarm_sections(args)  # the swarm: bench/distribution.py, bench/image_streaming.py
        if args.only and not {"find", "read", "import"} & set(args.only):
            return lease or swarm
        return Bench(args).main() or lease or swarm
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
