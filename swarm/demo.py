"""``make demo``: the system end to end on this machine, printing each step.

A release manager publishes a signed release and a signed VM image; an origin
serves them; node A (a ``swarm node`` daemon on 127.0.0.2) fetches them
through libtorrent with the origin as web seed; the origin goes down; node B
(on 127.0.0.3) gets the metadata, the torrents and the data from A alone and
mounts them; an elastic job sized to B's lease runs its program from B's
mount; a forged image is refused; B boots a VM from the signed image, which
runs the release's program from B's mount; then a site job: a NATS JetStream broker
and three more node daemons share one job's events, one node is killed
mid-job, the gather is killed and restarted once, and the output holds every
event exactly once.

Everything runs under a temporary directory on loopback addresses (no
namespaces, no root needed beyond FUSE); every process started here is ended
by its PID, and the daemons unmount on SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from swarm.config import render_config

REPO = "sw.example.org"
SIMULATE = """#!/bin/sh
# A stand-in for experiment software: one record per event, using its data
# file from the release.  simulate --first N --count C --out FILE
while [ $# -gt 1 ]; do
    case $1 in --first) first=$2 ;; --count) count=$2 ;; --out) out=$2 ;; esac
    shift 2
done
top="$(dirname "$0")/.."
geo=$(wc -c < "$top/share/geometry.dat")
n=$first; end=$((first + count))
while [ "$n" -lt "$end" ]; do
    echo "event $n release $(cat "$top/VERSION") geometry $geo bytes"
    n=$((n + 1))
done > "$out"
"""


def _step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _run(*args: str, check: bool = True, show: int = 30) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}", flush=True)
    cmd = [sys.executable, "-m", "swarm", *args[1:]] if args[0] == "swarm" else list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = (r.stdout + r.stderr).rstrip().splitlines()
    for line in lines[:show]:
        print("  " + line, flush=True)
    if show and len(lines) > show:
        print(f"  ... ({len(lines) - show} more lines)")
    if check and r.returncode != 0:
        raise SystemExit(f"demo: command failed with exit {r.returncode}")
    return r


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _sample_tree(root: Path, version: str) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "share").mkdir(exist_ok=True)
    sim = root / "bin" / "simulate"
    sim.write_text(SIMULATE)
    sim.chmod(0o755)
    (root / "VERSION").write_text(version + "\n")
    (root / "share" / "geometry.dat").write_bytes(os.urandom(3 << 20))


def _node_config(
    work: Path,
    name: str,
    host: str,
    peer_port: int,
    *,
    origin: str,
    root_json: Path,
    bootstrap: list[str],
    extra: dict[str, object] | None = None,
) -> Path:
    d = work / name
    (d / "mnt").mkdir(parents=True)
    settings: dict[str, object] = {
        "data_dir": d / "data",
        "listen": f"{host}:6881",
        "api": f"{host}:{_free_port(host)}",
        "peer": f"{host}:{peer_port}",
        "bootstrap": bootstrap,
        "mount": d / "mnt",
        "dht": False,
        "refresh_interval": 5,
        **(extra or {}),
    }
    repo: dict[str, object] = {"origin": origin, "trust": root_json, "policy": "prefetch"}
    cfg = d / "node.toml"
    text = f"# node {name}: see docs/NODE.md for every key\n" + render_config(
        settings, {REPO: repo}
    )
    cfg.write_text(text)
    return cfg


def _api(cfg: Path, route: str) -> Any:
    state = json.loads((cfg.parent / "data" / "node.json").read_text())
    with urllib.request.urlopen(state["api"] + route.lstrip("/"), timeout=10) as r:
        return json.loads(r.read())


def _start_node(cfg: Path) -> subprocess.Popen[bytes]:
    print(f"$ swarm node --config {cfg} &", flush=True)
    log = open(cfg.parent / "node.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "node", "--config", str(cfg)], stdout=log, stderr=log
    )
    log.close()
    deadline = time.monotonic() + 60
    while not (cfg.parent / "data" / "node.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            print((cfg.parent / "node.log").read_text()[-2000:])
            raise SystemExit("demo: the node daemon did not start")
        time.sleep(0.1)
    return proc


def _wait_complete(cfg: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ts = _api(cfg, "/v1/transfers")
        if ts and all(t["progress"] >= 1.0 for t in ts):
            return
        time.sleep(0.3)
    raise SystemExit("demo: transfers did not complete")


def _site_node(work: Path, name: str, host: str, broker: str, token: Path) -> Path:
    """A node that only works for the site: no repository, no mount, one core."""
    d = work / name
    d.mkdir(parents=True)
    settings: dict[str, object] = {
        "data_dir": d / "data",
        "listen": f"{host}:6881",
        "api": f"{host}:{_free_port(host)}",
        "peer": f"{host}:{_free_port(host)}",
        "dht": False,
        "runner": {"cores": 1, "power_per_core": 10.0, "time_left": 3600},
        "site": {"nats": broker, "token_file": token, "node_name": name},
    }
    cfg = d / "node.toml"
    cfg.write_text(f"# site node {name}: see docs/NODE.md\n" + render_config(settings, {}))
    return cfg


def _until(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not happen in {timeout:g} s")


def _guest_image(work: Path) -> Path:
    """The test guest image (swarm_testing/guest_image.py: built from Debian packages
    once, then cached), copied into the demo's directory."""
    r = subprocess.run(
        [sys.executable, "-m", "swarm_testing.guest_image"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"demo: {r.stderr.strip() or 'the guest image could not be built'}")
    image = work / "worker.img"
    shutil.copyfile(r.stdout.strip(), image)
    return image


VM_USER_DATA = f"""#!/bin/sh
# The VM's job: read its Machine/Job Features, run the release's program from
# the node's verified mount (9p, read-only), heartbeat, and say how it ended.
touch "$JOBOUTPUTS/vm-heartbeat"
echo "cores $(cat "$MACHINEFEATURES/log_cores") hs06 $(cat "$MACHINEFEATURES/hs06")" \
  "wall_limit_secs $(cat "$JOBFEATURES/wall_limit_secs")" > "$JOBOUTPUTS/features"
"$SWARM_SOFTWARE/{REPO}/bin/simulate" --first 0 --count 5 --out "$JOBOUTPUTS/events"
touch "$JOBOUTPUTS/vm-heartbeat"
echo "200 Success: 5 events" > "$JOBOUTPUTS/shutdown_message"
"""


def _vm(work: Path, cfg: Path) -> None:
    _step(
        "9. B boots a VM from the signed image in its mount (qemu, software emulation); the"
        " guest gets Machine/Job Features, runs the release's program from B's mount, and"
        " ends with shutdown_message 200"
    )
    user_data = work / "vm-user-data.sh"
    user_data.write_text(VM_USER_DATA)
    r = _run(
        "swarm",
        "vm",
        "start",
        f"{REPO}/worker/1.0",
        "--config",
        str(cfg),
        "--cores",
        "1",
        "--user-data",
        str(user_data),
        "--json",
        show=0,
    )
    vm_id = json.loads(r.stdout)["id"]
    print(f"  started VM {vm_id}; the guest boots (about 10-30 s under emulation)")

    def ended() -> Any:
        v = _api(cfg, f"/v1/vms/{vm_id}")
        return v if v["state"] in ("stopped", "failed") else None

    _until(f"VM {vm_id} to end", ended, timeout=300)
    _run("swarm", "vm", "status", vm_id, "--config", str(cfg))
    outputs = cfg.parent / "data" / "vms" / vm_id / "joboutputs"
    _run("cat", str(outputs / "features"), str(outputs / "events"))


def _site_job(work: Path, simulate: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    _step("10. The site's broker: NATS JetStream (token auth, every message fsynced)")
    port = _free_port("127.0.0.1")
    broker_dir = work / "broker"
    print(f"$ swarm site-broker --dir {broker_dir} --listen 127.0.0.1:{port} &", flush=True)
    log = open(work / "broker.log", "ab")  # noqa: SIM115 - the child keeps it
    broker = subprocess.Popen(
        [sys.executable, "-m", "swarm", "site-broker", "--dir", str(broker_dir),
         "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    procs.insert(0, broker)  # ended last: the nodes and the gather talk to it
    token = broker_dir / "nats.token"

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return token.exists()

    _until("the broker's start", listening)
    url = f"nats://127.0.0.1:{port}"

    _step("11. Three nodes (127.0.0.4-6) join the site; each pulls ranges while it has time")
    nodes = {}
    for i, name in enumerate(("c", "d", "e")):
        cfg = _site_node(work, name, f"127.0.0.{4 + i}", url, token)
        nodes[name] = (cfg, _start_node(cfg))
        procs.append(nodes[name][1])
    cfg_c = nodes["c"][0]

    _step("12. The VO submits one job of 600 events in ranges of 20, its program from B's mount")
    spec = work / "site-sim.toml"
    spec.write_text(
        f"""name = "site-sim"
command = ["/bin/sh", "-c", "sleep 0.6; exec {simulate} --first $0 --count $1 --out $2",
           "{{first}}", "{{count}}", "{{output}}"]
cpu_work_per_event = 0.3   # HS06.s
max_events = 600
events_per_task = 20
"""
    )
    sub = _run("swarm", "site-job", "submit", str(spec), "--config", str(cfg_c), "--ack-wait",
               "3", "--json")  # fmt: skip
    job = json.loads(sub.stdout)["id"]
    out = work / "site-output"
    gather_argv = [sys.executable, "-m", "swarm", "site-job", "gather", job, "--output",
                   str(out), "--config", str(cfg_c), "--json"]  # fmt: skip

    def start_gather() -> subprocess.Popen[bytes]:
        print(f"$ swarm site-job gather {job} --output {out} --config {cfg_c} &", flush=True)
        g = subprocess.Popen(gather_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(g)
        return g

    gather = start_gather()

    _step("13. Node e dies (SIGKILL) while it holds a range; the gather dies too, once")

    def e_running() -> bool:  # e has reported a range and holds the next one
        site = _api(nodes["e"][0], "/v1/status").get("site") or {}
        return bool(site.get("running")) and int(site.get("ranges_reported", 0)) >= 1

    _until("a range on node e", e_running)
    nodes["e"][1].kill()
    nodes["e"][1].wait(10)
    print("(node e killed with SIGKILL mid-range: its range goes back to the others)")

    def committed() -> int:
        r = subprocess.run(
            [sys.executable, "-m", "swarm", "site-job", "status", job, "--config", str(cfg_c),
             "--json"], capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return int(json.loads(r.stdout)["events_committed"]) if r.returncode == 0 else 0

    _until("a third of the events committed", lambda: committed() >= 200)
    gather.kill()
    gather.wait(10)
    print("(the gather killed with SIGKILL; started again on the same directory)")
    gather = start_gather()
    try:
        gather.wait(180)
    except subprocess.TimeoutExpired:
        raise SystemExit("demo: the gather did not finish") from None
    _run("swarm", "site-job", "status", job, "--config", str(cfg_c))
    lines = (out / "events.out").read_text().splitlines()
    numbers = [int(line.split()[1]) for line in lines]
    exact = numbers == list(range(600))
    print(
        f"(gathered {len(lines)} events: every event 0..599 exactly once, in order: "
        f"{'yes' if exact else 'NO'})"
    )
    if not exact:
        raise SystemExit("demo: the site job's output is not exactly once")


def main() -> int:
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.W_OK):
        print("demo: needs FUSE (/dev/fuse); run as root or in the fuse group", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    os.chmod(work, 0o755)  # jobs run as an unprivileged user when we are root
    keys, store, src = work / "keys", work / "store", work / "src"
    procs: list[subprocess.Popen[bytes]] = []
    origin: subprocess.Popen[bytes] | None = None
    try:
        _step("1. A release manager creates the repository's keys (TUF, Ed25519)")
        _run("swarm", "keys", "init", str(keys), "--repo", REPO)
        root_json = keys / "root.json"

        _step(
            "2. ... publishes a software tree as signed revision 1 (with its BitTorrent v2 torrent)"
        )
        _sample_tree(src, "1.0")
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
            "--json",
        )

        _step(
            "3. ... and a VM image (a kernel, busybox and the Vacuum agent, built from Debian"
            " packages), signed with its v2 info-hash and merkle root"
        )
        image = _guest_image(work)
        _run(
            "swarm",
            "image",
            "publish",
            str(image),
            "--name",
            "worker",
            "--version",
            "1.0",
            "--repo",
            REPO,
            "--keys",
            str(keys),
            "--store",
            str(store),
        )

        _step("4. The origin serves the store over HTTP (loopback)")
        port = _free_port("127.0.0.1")
        print(f"$ swarm serve {store} --listen 127.0.0.1:{port} &")
        origin = subprocess.Popen(
            [sys.executable, "-m", "swarm", "serve", str(store), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        origin_url = f"http://127.0.0.1:{port}/"

        _step(
            "5. Node A (127.0.0.2) joins: metadata verified, data through libtorrent,"
            " the origin as web seed"
        )
        peer_port = _free_port("127.0.0.2")
        cfg_a = _node_config(
            work, "a", "127.0.0.2", peer_port, origin=origin_url, root_json=root_json, bootstrap=[]
        )
        procs.append(_start_node(cfg_a))
        _wait_complete(cfg_a)
        _run("swarm", "status", "--config", str(cfg_a))

        _step("6. The origin goes down; node B (127.0.0.3) joins with A as its only peer")
        origin.terminate()
        origin.wait(10)
        origin = None
        cfg_b = _node_config(
            work,
            "b",
            "127.0.0.3",
            peer_port,
            origin=origin_url,
            root_json=root_json,
            bootstrap=["127.0.0.2:6881"],
            # B also runs VMs (step 9): a lease of 2 cores for an hour, software emulation.
            extra={
                "runner": {"cores": 2, "power_per_core": 10.0, "time_left": 3600},
                "vm": {"accelerator": "tcg", "memory": "128M", "grace": 10},
            },
        )
        procs.append(_start_node(cfg_b))
        mnt_b = cfg_b.parent / "mnt"
        _run("ls", "-l", str(mnt_b), str(mnt_b / REPO), str(mnt_b / ".images" / REPO / "worker"))
        got = hashlib.sha256((mnt_b / ".images" / REPO / "worker" / "1.0").read_bytes())
        same = got.hexdigest() == hashlib.sha256(image.read_bytes()).hexdigest()
        print(f"(image read through B's mount: SHA-256 {'matches' if same else 'DIFFERS'})")
        _wait_complete(cfg_b)
        _run("swarm", "status", "--config", str(cfg_b))

        _step("7. An elastic job sized to B's lease runs its program from B's mount")
        spec = work / "mc-sim.toml"
        simulate = mnt_b / REPO / "bin" / "simulate"
        args = '"--first", "{first}", "--count", "{count}", "--out", "{output}"'
        spec.write_text(
            f"""name = "mc-sim"
command = ["{simulate}", {args}]
cpu_work_per_event = 0.5   # HS06.s
max_events = 5000
min_events = 10
safety = 0.8
events_per_task = 250
"""
        )
        out = work / "job-output"
        _run(
            "swarm",
            "job",
            "run",
            str(spec),
            "--cores",
            "2",
            "--time-left",
            "60",
            "--power",
            "10",
            "--output",
            str(out),
            "--json",
            show=12,
        )
        _run("head", "-n", "3", str(out / "events.out"))

        _step("8. A forged image (never signed) is refused by B's site policy check")
        forged = work / "forged.img"
        forged.write_bytes(b"evil" + image.read_bytes()[4:])
        _run(
            "swarm",
            "image",
            "verify",
            str(forged),
            "--config",
            str(cfg_b),
            "--offline",
            check=False,
        )

        _vm(work, cfg_b)
        _site_job(work, simulate, procs)

        _step("Done")
        print(
            "Published a release and an image, shared them peer-to-peer between two node"
            " daemons with the origin down, mounted them verified, ran an elastic job from"
            " the mount, refused a forged image, booted a VM from the signed image, and"
            " spread a site job over three nodes,"
            " exactly once through a node's death and a gather's restart.\n"
            "Next: `make test` runs the test suite; README.md and docs/ have every command."
        )
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if origin is not None:
            origin.terminate()
            origin.wait(10)
        for name in ("a", "b"):
            mnt = work / name / "mnt"
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
