"""Our system in the distribution benchmark (``bench.distribution``'s ``swarm``).

The file is published as a signed VM image.  The source host runs the origin
on its loopback (so it costs none of its shaped uplink) and a node daemon
that pulls the image from it and seeds; once that node holds it, N client
daemons start at once, each in its own namespace, with no origin: metadata
and the ``.torrent`` come from the source node's peer exchange, data from the
swarm.  The time is from the clients' launch until every client holds the
whole image, daemon start-up included.

Polling uses ``curl`` inside each namespace (a Python client per poll would
cost the two cores more than the daemons do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.config import render_config
from swarm.images import publish_image
from swarm_testing.netns import Host, Network
from trust.keys import init_keys

REPO = "bench.example.org"
PY = sys.executable


def _config(
    d: Path,
    host: Host,
    root_json: Path,
    *,
    origin: str | None,
    bootstrap: list[str],
    policy: str = "prefetch",
    mount: Path | None = None,
) -> Path:
    settings: dict[str, object] = {
        "data_dir": d / "data",
        "listen": f"{host.addr}:6881",
        "api": "127.0.0.1:7000",
        "peer": f"{host.addr}:6880",
        "bootstrap": bootstrap,
        "refresh_interval": 3600,
    }
    if mount is not None:
        settings["mount"] = mount
    repo: dict[str, object] = {"trust": root_json, "policy": policy}
    if origin is not None:
        repo["origin"] = origin
    tuning = json.loads(os.environ.get("SWARM_BENCH_TUNING", "{}"))  # experiments
    if origin is not None:  # the source
        tuning.update(json.loads(os.environ.get("SWARM_BENCH_SOURCE_TUNING", "{}")))
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "node.toml"
    cfg.write_text(render_config(settings, {REPO: repo}, tuning=tuning))
    return cfg


def _transfers(host: Host) -> list[dict[str, Any]] | None:
    r = host.run(
        ["curl", "-sf", "-m", "5", "http://127.0.0.1:7000/v1/transfers"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    got: list[dict[str, Any]] = json.loads(r.stdout)
    return got


def _image_done(host: Host) -> bool:
    ts = _transfers(host)
    return bool(ts) and any(
        t["what"].startswith("image") and t["progress"] >= 1.0 for t in ts or []
    )


def _wait(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[Any]]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a node daemon exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.25)


def _refresh(host: Host, data_dir: Path) -> subprocess.Popen[Any]:
    """POST a refresh to a node's API from inside its namespace (curl)."""
    token = (data_dir / "api.token").read_text().strip()
    return host.popen(
        [
            "curl",
            "-sf",
            "-m",
            "120",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {token}",
            f"http://127.0.0.1:7000/v1/repositories/{REPO}/refresh",
        ],
    )


def run_swarm(net: Network, source: Host, clients: list[Host], file: Path) -> dict[str, Any]:
    """Node daemons are running (as on a site) when the image is published:
    the clock runs from the publish until every client holds the image."""
    work = Path(tempfile.mkdtemp(prefix="swarm-", dir=file.parent))
    keys = work / "keys"
    root_json = init_keys(keys, REPO)
    store = work / "store"
    tree = work / "tree"
    tree.mkdir()
    (tree / "README").write_text("the repository exists before the image\n")
    (tree / "VERSION").write_text("1\n")  # two objects: the revision has a torrent
    publish(tree, OriginStore(store, REPO), keys)
    logs = []
    procs: list[subprocess.Popen[Any]] = []

    def start(host: Host, cfg: Path, name: str) -> None:
        log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            host.popen([PY, "-m", "swarm", "node", "--config", cfg], stdout=log, stderr=log)
        )

    try:
        log = open(work / "origin.log", "ab")  # noqa: SIM115
        logs.append(log)
        source.popen(
            [PY, "-m", "swarm", "serve", store, "--listen", "127.0.0.1:8000"],
            stdout=log,
            stderr=log,
        )
        src_cfg = _config(
            work / "source", source, root_json, origin="http://127.0.0.1:8000/", bootstrap=[]
        )
        start(source, src_cfg, "source")
        for i, h in enumerate(clients):
            cfg = _config(
                work / f"client{i}", h, root_json, origin=None, bootstrap=[f"{source.addr}:6881"]
            )
            start(h, cfg, f"client{i}")
        dirs = [work / "source" / "data"] + [
            work / f"client{i}" / "data" for i in range(len(clients))
        ]
        _wait(
            "every node daemon up",
            lambda: all((d / "node.json").exists() for d in dirs),
            300,
            procs,
        )
        target = publish_image(file, name="bench", version="1", repo=REPO, keys=keys, store=store)
        t0 = time.monotonic()
        if _refresh(source, dirs[0]).wait(120) != 0:
            raise RuntimeError("the source node's refresh failed")
        learned = time.monotonic() - t0
        pokes = [_refresh(h, d) for h, d in zip(clients, dirs[1:], strict=True)]
        done: dict[int, float] = {}

        def all_done() -> bool:
            for i, h in enumerate(clients):
                if i not in done and _image_done(h):
                    done[i] = time.monotonic() - t0
            return len(done) == len(clients)

        _wait("every client holds the image", all_done, 3600, procs)
        for p in pokes:
            p.wait(10)
        seconds = max(done.values())
        files = [next((d / "repos" / REPO / "images").rglob(target.file)) for d in dirs[1:]]
        print(
            f"swarm: source learned of the image in {learned:.1f} s; clients done "
            + ", ".join(f"{v:.1f}" for v in sorted(done.values())),
            file=sys.stderr,
        )
        return {"seconds": seconds, "files": files, "client_seconds": sorted(done.values())}
    finally:
        for log in logs:
            log.close()
