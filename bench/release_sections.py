"""The timed sections of ``python -m bench.run``: publish, find, read, import, readers.

Each section takes the run's :class:`~bench.release_bench.ReleaseBench`, times ours
against its baselines (``sha256sum``, the native directory, squashfuse over a
mksquashfs image of the same tree), records every raw sample and appends its
:class:`~bench.report.Row` s.  ``publish_section`` builds the store the others
mount and must run first.  What each row means: ``bench/README.md``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.datasets import IMPORT_STMT, touch_one_small_file
from bench.release_bench import MB, PY_REPO, TREE_REPO, ReleaseBench
from bench.report import Row
from bench.util import (
    VENV_BIN,
    BenchError,
    drop_caches,
    is_mounted,
    rm_tree,
    say,
    timed,
    timed_shell,
    wait_until,
)
from cvmfs_like.fs import ADAPTER_ENV
from swarm.config import render_config


def publish_section(b: ReleaseBench) -> None:
    say("== 1. publish throughput vs sha256sum (warm page cache)")
    tree = str(b.tree)
    timed_shell(f"find '{tree}' -type f -print0 | xargs -0 cat > /dev/null")  # warm up
    sha = [
        timed_shell(f"find '{tree}' -type f -print0 | xargs -0 sha256sum > /dev/null")
        for _ in range(b.reps)
    ]
    sha_s = b.record("sha256sum_s", sha)
    walls: list[float] = []
    infos: list[dict[str, Any]] = []
    for i in range(b.args.publish_runs):
        store = b.run_dir / f"store-full-{i}"
        timed_shell(f"find '{tree}' -type f -print0 | xargs -0 cat > /dev/null")
        w, info = b.publish(b.tree, TREE_REPO, store)
        walls.append(w)
        infos.append(info)
        say(f"  full publish #{i}: {w:.2f} s wall, {json.dumps(info)}")
        if i < b.args.publish_runs - 1:
            rm_tree(store)
        else:
            store.rename(b.store)
    b.samples["publish_full_json"] = infos
    pub_s = b.record("publish_full_s", walls)
    nb, nf = b.tree_bytes, b.tree_files
    b.rows.append(
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
    b.rows.append(
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
    for i in range(b.reps):
        touch_one_small_file(b.tree, i)
        w, info = b.publish(b.tree, TREE_REPO, b.store)
        inc.append(w)
        b.samples.setdefault("publish_one_changed_json", []).append(info)
    inc_s = b.record("publish_one_changed_s", inc)
    same = [b.publish(b.tree, TREE_REPO, b.store)[0] for _ in range(b.reps)]
    same_s = b.record("publish_unchanged_s", same)
    b.rows.append(
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
    b.rows.append(Row("incremental publish, nothing changed", "s", same_s, "full publish", pub_s))
    if not b.args.skip_python:
        w, info = b.publish(b.pytree, PY_REPO, b.store)
        b.samples["publish_pytree_json"] = info
        say(f"  published the Python tree in {w:.2f} s: {json.dumps(info)}")


def timed_find(d: Path) -> float:
    return timed_shell(f"find '{d}' -printf '%s %m %T@\\n' > /dev/null")


def find_section(b: ReleaseBench) -> None:
    say("== 2. find + lstat of every entry: ours vs native vs squashfuse")
    img = b.squash_image(b.tree, b.tree.name)
    mnt = b.run_dir / "mnt"
    sq = b.run_dir / "sq"
    cold_n: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            drop_caches()
            cold_n.append(timed_find(b.tree))
    timed_find(b.tree)  # native hot: sampled beside ours, below
    hot_n: list[float] = []
    # squashfuse: fresh mount each cold sample.
    cold_q: list[float] = []
    hot_q: list[float] = []
    for i in range(b.reps):
        b.res.squashfuse_mount(img, sq)
        b.maybe_drop()
        cold_q.append(timed_find(sq))
        if i == b.reps - 1:
            hot_q = [timed_find(sq) for _ in range(b.reps)]
        b.res.unmount(sq)
    # ours, objects and catalogs in the local cache.
    cache = b.run_dir / "cache-find"
    b.mount(TREE_REPO, mnt, cache)
    timed_find(mnt)  # fill the local cache with every catalog
    b.res.unmount(mnt, cache)
    cold_o: list[float] = []
    hot_o: list[float] = []
    for i in range(b.reps):
        b.mount(TREE_REPO, mnt, cache)
        b.maybe_drop()
        cold_o.append(requests_during(b, "find_ours_cold_requests", cache, lambda: timed_find(mnt)))
        if i == b.reps - 1:
            for _ in range(b.reps):  # paired: the machine's drift hits both alike
                hot_o.append(timed_find(mnt))
                hot_n.append(timed_find(b.tree))
            requests_during(b, "find_ours_hot_requests", cache, lambda: timed_find(mnt))
        b.res.unmount(mnt, cache)
    # ours, fresh cache: catalogs below the root come from the origin.
    cold_f: list[float] = []
    for i in range(b.reps):
        c = b.run_dir / f"cache-find-fresh-{i}"
        b.mount(TREE_REPO, mnt, c)
        b.maybe_drop()
        cold_f.append(timed_find(mnt))
        b.res.unmount(mnt, c)
    hn, hq, ho = (b.record(k, v) for k, v in [("find_native_hot_s", hot_n),
                                               ("find_squashfuse_hot_s", hot_q),
                                               ("find_ours_hot_s", hot_o)])  # fmt: skip
    cq = b.record("find_squashfuse_cold_s", cold_q)
    co = b.record("find_ours_cold_local_cache_s", cold_o)
    cf = b.record("find_ours_cold_fresh_cache_s", cold_f)
    cn = b.record("find_native_cold_s", cold_n) if cold_n else None
    note = "" if b.drop else "not root: page cache NOT dropped"
    b.rows.append(
        Row(
            "find -printf (lstat all), cold: fresh mount, caches dropped, local cache",
            "s",
            co,
            "squashfuse cold",
            cq,
            ("<=", 0.2),
            others={"native cold": cn} if cn is not None else {},
            note=note,
        )
    )
    b.rows.append(
        Row(
            "find -printf, cold, fresh cache dir (catalogs from loopback origin)",
            "s",
            cf,
            "squashfuse cold",
            cq,
            note=note,
        )
    )
    b.rows.append(
        Row(
            "find -printf (lstat all), hot",
            "s",
            ho,
            "native hot",
            hn,
            ("<=", 1.2),
            others={"squashfuse hot": hq},
        )
    )


def mount_counters(cache: Path) -> dict[str, int]:
    """Requests that reached a ``swarm mount`` with cache dir ``cache`` so far
    (its ``counters`` control command); {} for an adapter without them."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(cache / "control.sock"))
            sock.sendall(b"counters\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        got = json.loads(data)
    except (OSError, ValueError):
        return {}
    if not isinstance(got, dict):  # the mfusepy adapter answers {"error": ...}
        return {}
    return {k: int(v) for k, v in got.items() if isinstance(v, int)}


def requests_during(b: ReleaseBench, key: str, cache: Path, fn: Any) -> Any:
    """Run ``fn()`` and record (as sample ``key``) the requests that reached
    the mount of ``cache`` meanwhile: what the kernel did not answer alone."""
    before = mount_counters(cache)
    out = fn()
    after = mount_counters(cache)
    b.samples[key] = {k: after[k] - before.get(k, 0) for k in after}
    say(f"  {key}: {b.samples[key]}")
    return out


def timed_dd(f: Path) -> float:
    return timed(["dd", f"if={f}", "of=/dev/null", "bs=1M"])


def read_section(b: ReleaseBench) -> None:
    say("== 3. sequential read of a large file (dd bs=1M)")
    rel = b.big_rel
    size = (b.tree / rel).stat().st_size
    img = b.squash_image(b.tree, b.tree.name)
    mnt = b.run_dir / "mnt"
    sq = b.run_dir / "sq"
    timed_dd(b.tree / rel)
    hot_n = [timed_dd(b.tree / rel) for _ in range(b.reps)]
    first_q: list[float] = []
    hot_q: list[float] = []
    first_n: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            drop_caches()
            first_n.append(timed_dd(b.tree / rel))
        for i in range(b.reps):
            b.res.squashfuse_mount(img, sq)
            drop_caches()
            first_q.append(timed_dd(sq / rel))
            if i == b.reps - 1:
                hot_q = [timed_dd(sq / rel) for _ in range(b.reps)]
            b.res.unmount(sq)
    origin_o: list[float] = []
    hot_o: list[float] = []
    cache = b.run_dir / "cache-read-0"
    for i in range(b.args.origin_reps):
        c = b.run_dir / f"cache-read-{i}"
        b.mount(TREE_REPO, mnt, c)
        b.maybe_drop()
        origin_o.append(timed_dd(mnt / rel))
        if i == 0:
            os.sync()  # the fetch's writes would be flushed during the hot samples
            hot_o = [timed_dd(mnt / rel) for _ in range(b.reps - 1)]
            hot_o.append(requests_during(b, "dd_ours_hot_requests", c, lambda: timed_dd(mnt / rel)))
        b.res.unmount(mnt, c)
    local_o: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            b.mount(TREE_REPO, mnt, cache)
            drop_caches()
            local_o.append(
                requests_during(b, "dd_ours_first_requests", cache, lambda: timed_dd(mnt / rel))
            )
            b.res.unmount(mnt, cache)
    # The same first read with the objects' pages still in the page cache: the
    # FUSE request path alone, the ceiling of the row above when the disk is free.
    path_o: list[float] = []
    for i in range(b.reps + 1):
        b.mount(TREE_REPO, mnt, cache)
        took = timed_dd(mnt / rel)
        if i:  # the first read brought the objects' pages in
            path_o.append(took)
        b.res.unmount(mnt, cache)

    def rate(key: str, xs: list[float]) -> float | None:
        return size / b.record(key, xs) / MB if xs else None

    hn = rate("dd_native_hot_s", hot_n)
    ho = rate("dd_ours_hot_s", hot_o)
    hq = rate("dd_squashfuse_hot_s", hot_q)
    fq = rate("dd_squashfuse_first_s", first_q)
    lo = rate("dd_ours_first_local_cache_s", local_o)
    fn = rate("dd_native_first_s", first_n)
    oo = rate("dd_ours_cold_origin_s", origin_o)
    po = rate("dd_ours_first_objects_hot_s", path_o)
    b.rows.append(
        Row(
            f"read {size >> 20} MiB file, hot (page cache)",
            "MB/s",
            ho,
            "native hot",
            hn,
            (">=", 0.8),
            others={"squashfuse hot": hq} if hq else {},
        )
    )
    if b.drop:
        b.rows.append(
            Row(
                "read large file, first read after remount + drop caches, local cache",
                "MB/s",
                lo,
                "squashfuse first read",
                fq,
                (">=", 1.0),
            )
        )
        b.rows.append(
            Row(
                "read large file, first read after remount + drop caches, local cache",
                "MB/s",
                lo,
                "native first read",
                fn,
                (">=", 0.8),
            )
        )
    b.rows.append(
        Row(
            "read large file, first read after remount, objects' pages hot (the FUSE path alone)",
            "MB/s",
            po,
            "native first read" if fn else "native hot",
            fn or hn,
            note="the ceiling of the first-read rows: no disk wait, every byte through a READ",
        )
    )
    b.rows.append(
        Row(
            "read large file, cold from loopback origin (fresh cache dir)",
            "MB/s",
            oo,
            "squashfuse first read" if fq else "",
            fq,
            note="" if b.drop else "not root: page cache NOT dropped",
        )
    )


def timed_import(d: Path) -> float:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(d),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return timed([sys.executable, "-c", IMPORT_STMT], env=env)


def import_section(b: ReleaseBench) -> None:
    say(f"== 4. python -c '{IMPORT_STMT}'")
    img = b.squash_image(b.pytree, "pytree")
    mnt = b.run_dir / "mnt-py"
    sq = b.run_dir / "sq-py"
    n_hot = max(5, b.reps)
    timed_import(b.pytree)
    hot_n: list[float] = []  # sampled beside ours, below
    drop_n: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            drop_caches()
            drop_n.append(timed_import(b.pytree))
    hot_q: list[float] = []
    drop_q: list[float] = []
    for i in range(b.reps if b.drop else 1):
        b.res.squashfuse_mount(img, sq)
        if b.drop:
            drop_caches()
            drop_q.append(timed_import(sq))
        if i == 0:
            timed_import(sq)
            hot_q = [timed_import(sq) for _ in range(n_hot)]
        b.res.unmount(sq)
    cold_o: list[float] = []
    hot_o: list[float] = []
    cache = b.run_dir / "cache-py-0"
    for i in range(b.args.origin_reps):
        c = b.run_dir / f"cache-py-{i}"
        b.mount(PY_REPO, mnt, c)
        b.maybe_drop()
        cold_o.append(timed_import(mnt))
        if i == 0:
            timed_import(mnt)
            os.sync()  # the fetch's writes would be flushed during the hot samples
            # Interleaved with native samples: other work on the machine
            # weighs on both alike.
            for _ in range(n_hot):
                hot_o.append(timed_import(mnt))
                hot_n.append(timed_import(b.pytree))
            requests_during(b, "import_ours_hot_requests", c, lambda: timed_import(mnt))
        b.res.unmount(mnt, c)
    drop_o: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            b.mount(PY_REPO, mnt, cache)
            drop_caches()
            drop_o.append(
                requests_during(b, "import_ours_dropped_requests", cache, lambda: timed_import(mnt))
            )
            b.res.unmount(mnt, cache)
    hot_node, hot_single = node_import(b, n_hot, mnt, cache)
    hn = b.record("import_native_hot_s", hot_n)
    hq = b.record("import_squashfuse_hot_s", hot_q)
    ho = b.record("import_ours_hot_s", hot_o)
    b.rows.append(
        Row(
            "import, hot, through the node daemon's mount",
            "s",
            b.record("import_node_hot_s", hot_node),
            "single-repository mount hot",
            b.record("import_single_beside_node_hot_s", hot_single),
            ("<=", 1.05),
            others={"native hot": hn},
        )
    )
    co = b.record("import_ours_cold_origin_s", cold_o)
    b.rows.append(
        Row(
            "import numpy+scipy+rich, hot",
            "s",
            ho,
            "native hot",
            hn,
            ("<=", 1.05),
            others={"squashfuse hot": hq},
        )
    )
    if b.drop:
        dn = b.record("import_native_dropped_s", drop_n)
        dq = b.record("import_squashfuse_dropped_s", drop_q)
        do = b.record("import_ours_dropped_local_cache_s", drop_o)
        b.rows.append(
            Row(
                "import, remount + caches dropped, objects in local cache",
                "s",
                do,
                "native dropped",
                dn,
                ("<=", 1.3),
                others={"squashfuse dropped": dq},
            )
        )
        b.rows.append(
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
        b.rows.append(Row("import, cold from loopback origin (fresh cache dir)", "s", co))


READERS = 64


def read_all(files: list[Path], threads: int = READERS) -> float:
    """Seconds for ``threads`` readers to read every file of ``files`` once."""

    def one(p: Path) -> int:
        fd = os.open(p, os.O_RDONLY)
        try:
            n = 0
            while chunk := os.read(fd, 1 << 20):
                n += len(chunk)
            return n
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, files, chunksize=16):
            pass
    return time.perf_counter() - t0


def readers_section(b: ReleaseBench) -> None:
    say(f"== 5. {READERS} concurrent readers of small files (objects in the local cache)")
    rels = sorted(
        p.relative_to(b.tree)
        for p in b.tree.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size <= 64 * 1024
    )
    mnt = b.run_dir / "mnt-readers"
    cache = b.run_dir / "cache-readers"
    n = len(rels)
    native = [b.tree / r for r in rels]
    read_all(native)
    hot_n = [read_all(native) for _ in range(b.reps)]
    drop_n: list[float] = []
    if b.drop:
        for _ in range(b.reps):
            drop_caches()
            drop_n.append(read_all(native))
    results: dict[str, tuple[list[float], list[float]]] = {}
    for adapter in ("ours", "mfusepy"):
        if adapter == "mfusepy":
            os.environ[ADAPTER_ENV] = "mfusepy"  # inherited by the detached mount
        try:
            files = [mnt / r for r in rels]
            b.mount(TREE_REPO, mnt, cache)
            read_all(files)  # every object into the local cache
            os.sync()  # the fetch's writes would be flushed during the hot samples
            hot = [read_all(files) for _ in range(b.reps)]
            b.res.unmount(mnt, cache)
            dropped: list[float] = []
            for _ in range(b.reps if b.drop else 0):
                b.mount(TREE_REPO, mnt, cache)
                drop_caches()
                key = f"readers_{adapter}_dropped_requests"
                dropped.append(requests_during(b, key, cache, lambda fs=files: read_all(fs)))
                b.res.unmount(mnt, cache)
        finally:
            os.environ.pop(ADAPTER_ENV, None)
        results[adapter] = (hot, dropped)

    def rate(key: str, xs: list[float]) -> float | None:
        return n / b.record(key, xs) if xs else None

    hn = rate("readers_native_hot_s", hot_n)
    ho = rate("readers_ours_hot_s", results["ours"][0])
    hm = rate("readers_mfusepy_hot_s", results["mfusepy"][0])
    b.rows.append(
        Row(
            f"{READERS} readers of {n} small files, hot (page cache)",
            "files/s",
            ho,
            "native hot",
            hn,
            (">=", 0.5),
            others={"previous adapter (mfusepy) hot": hm},
        )
    )
    if b.drop:
        dn = rate("readers_native_dropped_s", drop_n)
        do = rate("readers_ours_dropped_local_cache_s", results["ours"][1])
        dm = rate("readers_mfusepy_dropped_local_cache_s", results["mfusepy"][1])
        b.rows.append(
            Row(
                f"{READERS} readers, remount + caches dropped, objects in local cache",
                "files/s",
                do,
                "native dropped",
                dn,
                (">=", 0.5),
                others={"previous adapter (mfusepy) dropped": dm},
            )
        )


def node_import(
    b: ReleaseBench, n_hot: int, mnt: Path, cache: Path
) -> tuple[list[float], list[float]]:
    """Hot imports through a ``swarm node``'s mount following the Python tree,
    interleaved with hot imports through a ``swarm mount`` of it (at ``mnt``,
    with the warm ``cache``); returns (node samples, single-mount samples)."""
    data, mp = b.run_dir / "node-data", b.run_dir / "node-mnt"
    cfg = b.run_dir / "node.toml"
    settings: dict[str, object] = {
        "data_dir": data,
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
        "mount": mp,
    }
    repos = {PY_REPO: {"origin": b.origin, "trust": b.trust(PY_REPO), "images": False}}
    cfg.write_text(render_config(settings, repos))
    with open(b.run_dir / "node.log", "ab") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "swarm"), "node", "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    b.res.procs.append(proc)
    b.res.mounts.append(mp)
    tree = mp / PY_REPO
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"swarm node exited with {proc.returncode}; see node.log")
            return (tree / "rich").is_dir()

        wait_until(up, 120, f"{tree} in the node's mount")
        timed_import(tree)  # fetches every object once
        timed_import(tree)
        os.sync()
        b.mount(PY_REPO, mnt, cache)
        timed_import(mnt)
        node: list[float] = []
        single: list[float] = []
        for _ in range(n_hot):
            node.append(timed_import(tree))
            single.append(timed_import(mnt))
        b.res.unmount(mnt, cache)
        return node, single
    finally:
        if is_mounted(mnt):
            b.res.unmount(mnt, cache)
        b.res.stop_proc(proc)
        if is_mounted(mp):
            b.res.unmount(mp)
        elif mp in b.res.mounts:
            b.res.mounts.remove(mp)
