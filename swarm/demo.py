"""``make demo``: the system end to end on this machine, printing each step.

Keys, publish of a sample release, the HTTP origin, a verified FUSE mount, a
program run from the mount, a second revision picked up without remounting,
and a tampered object refused.  Everything runs under a temporary directory
on loopback; every process started here is ended by its PID and the mount is
always unmounted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = "sw.example.org"
SIMULATE = """#!/bin/sh
# A stand-in for experiment software: reads its data file from the release.
top="$(dirname "$0")/.."
echo "simulate $(cat "$top/VERSION") using $(wc -c < "$top/share/geometry.dat") bytes of geometry"
"""


def _step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}", flush=True)
    cmd = [sys.executable, "-m", "swarm.cli", *args[1:]] if args[0] == "swarm" else list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: command failed with exit {r.returncode}")
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample_tree(root: Path, version: str) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "share").mkdir(exist_ok=True)
    sim = root / "bin" / "simulate"
    sim.write_text(SIMULATE)
    sim.chmod(0o755)
    (root / "VERSION").write_text(version + "\n")
    geo = root / "share" / "geometry.dat"
    if not geo.exists():
        geo.write_bytes(os.urandom(3 << 20))


def main() -> int:
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.W_OK):
        print("demo: needs FUSE (/dev/fuse); run as root or in the fuse group", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    keys, store, src = work / "keys", work / "store", work / "src"
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir()
    origin: subprocess.Popen[bytes] | None = None
    mounted = False
    try:
        _step("1. A release manager creates the repository's keys (TUF, Ed25519)")
        _run("swarm", "keys", "init", str(keys), "--repo", REPO)

        _step("2. ... and publishes a software tree as signed revision 1")
        _sample_tree(src, "1.0")
        _run(
            "swarm", "publish", str(src), "--repo", REPO, "--keys", str(keys), "--store", str(store)
        )

        _step("3. The origin serves the store over HTTP (loopback)")
        port = _free_port()
        print(f"$ swarm serve {store} --listen 127.0.0.1:{port} &")
        origin = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarm.cli",
                "serve",
                str(store),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

        _step("4. A node mounts it read-only; it trusts only the root.json it was given")
        _run(
            "swarm",
            "mount",
            REPO,
            str(mnt),
            "--origin",
            f"http://127.0.0.1:{port}/",
            "--trust",
            str(keys / "root.json"),
            "--cache",
            str(cache),
            "--quota",
            "1G",
        )
        mounted = True
        _run("ls", "-l", str(mnt), str(mnt / "bin"))

        _step("5. A job runs its program from the mount (fetched and verified on first read)")
        _run(str(mnt / "bin" / "simulate"))

        _step("6. Revision 2 is published; the node picks it up without remounting")
        _sample_tree(src, "2.0")
        _run(
            "swarm", "publish", str(src), "--repo", REPO, "--keys", str(keys), "--store", str(store)
        )
        _run("swarm", "reload", str(mnt))
        _run(str(mnt / "bin" / "simulate"))
        rev = os.getxattr(mnt, "user.swarm.revision").decode()
        print(f"(extended attribute user.swarm.revision of {mnt} = {rev})")
        _run("swarm", "status", str(mnt))

        _step("7. A tampered object at the origin is refused: the reader gets EIO, never bad bytes")
        victim = src / "share" / "calibration.dat"
        victim.write_bytes(os.urandom(100_000))
        _run(
            "swarm",
            "publish",
            str(src),
            "--repo",
            REPO,
            "--keys",
            str(keys),
            "--store",
            str(store),
            "--quiet",
        )
        _run("swarm", "reload", str(mnt))
        data_dir = store / REPO / "data"
        digest = _digest_of(victim)
        obj = data_dir / digest[:2] / digest
        obj.write_bytes(b"evil" + obj.read_bytes()[4:])
        print(f"(an attacker rewrote object {digest[:16]}... at the origin)")
        r = _run("cat", str(mnt / "share" / "calibration.dat"), check=False)
        print(f"  -> exit status {r.returncode}; mount log says:")
        for line in (cache / "mount.log").read_text().splitlines():
            if digest in line:
                print("  " + line)

        _step("Done")
        print(f"Published 3 revisions, mounted {REPO}, ran a program from it, refused bad data.")
        print("Next: `make test` runs the test suite; README.md has every command.")
        return 0
    finally:
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        if origin is not None:
            origin.terminate()
            origin.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _digest_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
