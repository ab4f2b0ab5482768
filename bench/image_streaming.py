"""Boot streaming: reading a VM image through the mount before it has arrived.

``python -m bench.image_streaming [--size-mib 256] [--rate-mbit 50]``

Two namespaces on links shaped to R each way: a source (the origin on its
loopback and a seeding node daemon) and a client node daemon with its FUSE
mount, following the repository on demand.  Measured, each on a fresh client:

- *cold random 4 MiB reads*: ``--reads`` reads of 4 MiB at distinct random
  offsets of the image through the mount, one after the other; latency p50
  and p99, and their ratio to the wire time of 4 MiB;
- *boot profile*: a scattered 5 % of the image (64 KiB extents at random
  offsets, read in offset order as a booting kernel and init mostly do),
  time to read all of it with ``QUEUE_DEPTH`` (8) requests outstanding, as a
  guest's block queue keeps several, against the goal ``2 * profile / rate + 1 s`` and
  against the full download (``size / rate``, the time to wait for the whole
  image before booting).

Results go to ``bench/results/image_streaming.json`` and
``bench/results/IMAGE_STREAMING.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.swarm_distribution import REPO, _config, _image_done, _wait
from swarm.images import publish_image
from swarm_testing.netns import Host, Network
from trust.keys import init_keys

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PY = sys.executable
MIB = 1 << 20
EXTENT = 64 * 1024
QUEUE_DEPTH = 8  # outstanding requests, as a VM's virtio-blk queue keeps several


def _start(host: Host, cfg: Path, log: Path) -> subprocess.Popen[Any]:
    with open(log, "ab") as f:
        return host.popen([PY, "-m", "swarm", "node", "--config", cfg], stdout=f, stderr=f)


def _client(work: Path, name: str, host: Host, source: Host, root_json: Path) -> Path:
    mnt = work / name / "mnt"
    mnt.mkdir(parents=True)
    cfg = _config(
        work / name,
        host,
        root_json,
        origin=None,
        bootstrap=[f"{source.addr}:6881"],
        policy="on-demand",
        mount=mnt,
    )
    return cfg


def _wait_image(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[Any], mnt: Path) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def measure(size_mib: int, rate_mbit: float, reads: int, seed: int = 1) -> dict[str, Any]:
    size = size_mib * MIB
    rnd = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="stream-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        image = work / "disk.raw"
        with open(image, "wb") as f:
            for _ in range(size_mib):
                f.write(rnd.randbytes(MIB))
        keys = work / "keys"
        root_json = init_keys(keys, REPO)
        store = work / "store"
        target = publish_image(image, name="vm", version="1", repo=REPO, keys=keys, store=store)
        rel = Path(".images") / REPO / "vm" / "1"
        wire_4m = 4 * MIB * 8 / (rate_mbit * 1e6)
        with Network(3, rate_mbit=rate_mbit) as net:
            source, c1, c2 = net.hosts
            source.popen(
                [PY, "-m", "swarm", "serve", store, "--listen", "127.0.0.1:8000"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            src_cfg = _config(
                work / "source", source, root_json, origin="http://127.0.0.1:8000/", bootstrap=[]
            )
            src = _start(source, src_cfg, work / "source.log")
            _wait("the source holds the image", lambda: _image_done(source), 600, [src])

            # Cold random 4 MiB reads.
            cfg = _client(work, "c1", c1, source, root_json)
            proc = _start(c1, cfg, work / "c1.log")
            mnt = work / "c1" / "mnt"
            latencies: list[float] = []
            try:
                _wait_image(mnt / rel, 60)
                offsets = rnd.sample(range(0, size - 4 * MIB, 4 * MIB), reads)
                fd = os.open(mnt / rel, os.O_RDONLY)
                try:
                    for off in offsets:
                        t = time.monotonic()
                        data = os.pread(fd, 4 * MIB, off)
                        latencies.append(time.monotonic() - t)
                        with open(image, "rb") as ref:
                            ref.seek(off)
                            if data != ref.read(4 * MIB):
                                raise RuntimeError(f"wrong bytes at {off} through the mount")
                finally:
                    os.close(fd)
            finally:
                _stop(proc, mnt)

            # The boot profile, on a fresh client.
            n_extents = int(size * 0.05) // EXTENT
            extents = sorted(rnd.sample(range(0, size // EXTENT), n_extents))
            cfg = _client(work, "c2", c2, source, root_json)
            proc = _start(c2, cfg, work / "c2.log")
            mnt = work / "c2" / "mnt"
            try:
                _wait_image(mnt / rel, 60)
                fd = os.open(mnt / rel, os.O_RDONLY)

                def read_extent(e: int) -> None:
                    if len(os.pread(fd, EXTENT, e * EXTENT)) != EXTENT:
                        raise RuntimeError("short read through the mount")

                try:
                    t = time.monotonic()
                    with concurrent.futures.ThreadPoolExecutor(QUEUE_DEPTH) as pool:
                        list(pool.map(read_extent, extents))
                    profile_seconds = time.monotonic() - t
                finally:
                    os.close(fd)
            finally:
                _stop(proc, mnt)
        profile_bytes = n_extents * EXTENT
        wire = profile_bytes * 8 / (rate_mbit * 1e6)
        goal = 2 * wire + 1
        full = size * 8 / (rate_mbit * 1e6)
        lat = sorted(latencies)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return {
            "size_mib": size_mib,
            "rate_mbit": rate_mbit,
            "piece_length": target.piece_length,
            "reads": reads,
            "read_4m_p50_s": statistics.median(lat),
            "read_4m_p99_s": p99,
            "read_4m_wire_s": wire_4m,
            "profile_bytes": profile_bytes,
            "profile_extents": n_extents,
            "profile_seconds": profile_seconds,
            "profile_goal_seconds": goal,
            "profile_ok": profile_seconds <= goal,
            "full_download_wire_seconds": full,
            "profile_vs_full": profile_seconds / full,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict[str, Any], command: str) -> str:
    wire = r["read_4m_wire_s"]
    ok = "ok" if r["profile_ok"] else "MISS"
    rows = [
        (
            "cold random 4 MiB read, p50",
            f"{r['read_4m_p50_s']:.2f} s",
            f"wire time of 4 MiB {wire:.2f} s ({r['read_4m_p50_s'] / wire:.2f}x)",
        ),
        (
            f"cold random 4 MiB read, p99 ({r['reads']} reads)",
            f"{r['read_4m_p99_s']:.2f} s",
            f"{r['read_4m_p99_s'] / wire:.2f}x the wire time",
        ),
        (
            f"boot profile: 5 % scattered ({r['profile_extents']} x 64 KiB,"
            f" {r['profile_bytes'] / 1e6:.1f} MB)",
            f"{r['profile_seconds']:.2f} s",
            f"goal <= 2 x profile/rate + 1 s = {r['profile_goal_seconds']:.2f} s: {ok}",
        ),
        (
            "full download before boot (wire time)",
            f"{r['full_download_wire_seconds']:.1f} s",
            f"the profile takes {r['profile_vs_full'] * 100:.1f} % of it",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        "# Boot streaming: an image read through the mount before it has arrived\n\n"
        f"- command: `{command}`\n"
        f"- {r['size_mib']} MiB image, {r['piece_length'] // 1024} KiB pieces, every link"
        f" {r['rate_mbit']:g} Mbit/s each way; one seed, one client (on demand)\n\n"
        "| measure | value | reference |\n| --- | --- | --- |\n" + table + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.image_streaming", description=__doc__)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rate-mbit", type=float, default=50.0)
    p.add_argument("--reads", type=int, default=20)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    command = "python -m bench.image_streaming " + " ".join(sys.argv[1:] if argv is None else argv)
    r = measure(a.size_mib, a.rate_mbit, a.reads)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "image_streaming.json").write_text(json.dumps({"command": command, **r}, indent=2))
    md = markdown(r, command.strip())
    (a.results / "IMAGE_STREAMING.md").write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
