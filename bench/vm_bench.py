"""VMs booted from a streamed signed image, and live migration (issue 11's benchmark).

``python -m bench.vm_bench [--pad-mib 256] [--rate-mbit 50]`` (``make bench
BENCH_ARGS="--only vm"`` runs it from :mod:`bench.run`). One image, the test
guest image (:func:`swarm_testing.guest_image.build_guest_image`) with
``--pad-mib`` of unused incompressible filler appended, published as a signed
image; three namespaces on links shaped to ``--rate-mbit`` each way:

* ``source``: the origin on its own loopback (so it costs none of the shaped
  uplink) and a node daemon that pulls the image from it and seeds it;
* ``full``: a node daemon (``policy = prefetch``) that downloads the whole
  image from the source's node; the time from its launch until the image is
  complete is the *full download* (what booting after a download costs
  before the first instruction);
* ``cold``: a node daemon (``policy = on-demand``) with no origin configured
  (the origin is on the source's loopback, unreachable: the *origin down*
  case): metadata and every block come from the seeding peer as the guest
  reads them.

Measured one after the other, in one run, each VM `-m 128M -smp 1` under TCG
with a payload that touches its heartbeat once a second:

* time to the first heartbeat (the VM's ``created`` to its first
  ``last_heartbeat``, from its ``record.json``), (a) from a local copy of the
  image (a :class:`vm.manager.VmService` in this process whose base is the
  image file on local disk), (b) from the ``full`` node's mount with the image
  complete, (c) cold on the ``cold`` node, streamed from the peer;
* bytes the ``cold`` node had fetched when the first heartbeat arrived
  (``total_done`` of its image transfer, ``/v1/transfers``) / the image size,
  and the bytes the guest itself read from its disk in (a) (QMP
  ``query-blockstats`` ``rd_bytes``);
* live migration of the cold VM from ``cold`` to ``full`` (``swarm vm
  migrate``): the command's wall time, the source's ``migration_seconds``
  (mirror + memory), qemu's ``downtime`` (the guest's pause, from
  ``query-migrate``), and the heartbeat gap the host sees across the move
  (the source's last beat to the destination's first; beats are 1 s apart).
  Under TCG the guest's own clock stops while it is paused, so a gap the guest
  measured itself would read about zero: qemu's figure is the pause.

Results: ``bench/results/vm.json`` and ``bench/results/VM.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.image_streaming import _stop, _wait_image
from bench.report import machine
from bench.swarm_distribution import REPO, _config, _image_done, _wait
from bench.util import ROOT, BenchError, say
from runner.cores import CoreLedger
from runner.lease import Lease
from swarm.config import render_config
from swarm.images import publish_image
from swarm_testing.guest_image import GuestImage, build_guest_image
from swarm_testing.netns import Host, Network
from trust.keys import init_keys
from vm.config import ImageName, VmRequest, VmSettings
from vm.manager import ImageLookup, VmService

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
MIB = 1 << 20
NAME, VERSION = "guest", "1"
IMAGE = f"{REPO}/{NAME}/{VERSION}"
POLL = 0.1  # seconds between reads of a VM's record
BOOT_DEADLINE = 300.0  # seconds for a VM's first heartbeat under TCG on a loaded machine
PAYLOAD = b"""#!/bin/sh
i=0
while true; do
  i=$((i + 1))
  echo $i > $JOBOUTPUTS/counter
  touch $JOBOUTPUTS/vm-heartbeat
  sleep 1
done
"""
VM_TABLE = {"accelerator": "tcg", "software": False, "grace": 10, "memory": "128M"}


def _node_config(d: Path, host: Host, root_json: Path, source: Host, policy: str) -> Path:
    """A client node: no origin, the source's node as its only peer, a mount,
    a lease of 2 cores, VMs under TCG; its API on its namespace address (the
    other node's ``swarm vm migrate`` reaches it)."""
    mnt = d / "mnt"
    mnt.mkdir(parents=True)
    settings: dict[str, object] = {
        "data_dir": d / "data",
        "listen": f"{host.addr}:6881",
        "api": f"{host.addr}:7000",
        "peer": f"{host.addr}:6880",
        "bootstrap": [f"{source.addr}:6881"],
        "mount": mnt,
        "refresh_interval": 3600,
        "fetch_timeout": 30,
        "runner": {"cores": 2, "power_per_core": 10.0, "time_left": 7200},
        "vm": VM_TABLE,
    }
    cfg = d / "node.toml"
    cfg.write_text(render_config(settings, {REPO: {"trust": root_json, "policy": policy}}))
    return cfg


def _swarm(host: Host, *argv: str | Path, timeout: float = 600) -> dict[str, Any]:
    """``swarm ARGV --json`` inside ``host``'s namespace; its JSON answer.

    Raises:
        BenchError: the command failed (its message).
    """
    r = host.run([PY, "-m", "swarm", *map(str, argv), "--json"], capture_output=True,
                 text=True, timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        raise BenchError(f"swarm {argv[0]} {argv[1]}: {r.stderr.strip()[-500:]}")
    got: dict[str, Any] = json.loads(r.stdout)
    return got


def _record(data: Path, vm_id: str) -> dict[str, Any]:
    try:
        got: dict[str, Any] = json.loads((data / "vms" / vm_id / "record.json").read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return {}
    return got


def _first_heartbeat(data: Path, vm_id: str, deadline: float = BOOT_DEADLINE) -> dict[str, Any]:
    """The VM's record when its first heartbeat arrived.

    Raises:
        BenchError: it ended or did not beat within ``deadline`` seconds.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        rec = _record(data, vm_id)
        if rec.get("last_heartbeat") is not None:
            return rec
        if rec.get("state") in ("stopped", "failed"):
            raise BenchError(f"VM {vm_id} ended before its first heartbeat: {rec}")
        time.sleep(POLL)
    raise BenchError(f"VM {vm_id}: no heartbeat within {deadline:g} s")


def _image_transfer(host: Host) -> dict[str, Any]:
    r = host.run(["curl", "-sf", "-m", "5", f"http://{host.addr}:7000/v1/transfers"],
                 capture_output=True, text=True)  # fmt: skip
    for t in json.loads(r.stdout) if r.returncode == 0 else []:
        if t["what"] == f"image {NAME}/{VERSION}":
            return dict(t)
    return {}


def _complete(host: Host) -> bool:
    return float(_image_transfer(host).get("progress", 0.0)) >= 1.0


def local_boot(image: GuestImage, work: Path) -> dict[str, Any]:
    """(a): a VM whose base is the image file on local disk (no mount, no network)."""
    local = work / "local.img"
    shutil.copyfile(image.path, local)

    def lease_at(_mono: float) -> Lease:
        return Lease(2, 10.0, 7200.0, 1 << 30, time.time(), {})

    async def main() -> dict[str, Any]:
        svc = VmService(
            VmSettings(accelerator="tcg", software=False, grace=10.0),
            data_dir=work / "local",
            cores=CoreLedger(),
            lease_at=lease_at,
            find_image=lambda _name: ImageLookup(local, "raw"),
        )
        await svc.start()
        try:
            name = ImageName(REPO, NAME, VERSION)
            vm = await svc.start_vm(VmRequest(name, memory=128 * MIB, user_data=PAYLOAD))
            end = time.monotonic() + BOOT_DEADLINE
            while svc.get(vm.id).last_heartbeat is None:
                if svc.get(vm.id).state not in ("running", "starting"):
                    raise BenchError(f"the local VM ended: {svc.get(vm.id)}")
                if time.monotonic() > end:
                    raise BenchError("the local VM: no heartbeat in time")
                await asyncio.sleep(POLL)
            rep = svc.get(vm.id)
            qemu = svc.vms[vm.id].qemu  # the bench reads the guest's disk counters
            read = None
            if qemu is not None:
                stats = await qemu.execute("query-blockstats")
                read = sum(int(s["stats"]["rd_bytes"]) for s in stats)
            assert rep.last_heartbeat is not None
            return {
                "first_heartbeat_s": rep.last_heartbeat - rep.created,
                "hello_s": (rep.booted or 0.0) - rep.created,
                "guest_read_bytes": read,
            }
        finally:
            await svc.stop(grace=5)

    return asyncio.run(main())


def _boot_on_node(host: Host, cfg: Path, data: Path, payload: Path) -> tuple[str, dict[str, Any]]:
    vm = _swarm(host, "vm", "start", IMAGE, "--config", cfg, "--user-data", payload)
    rec = _first_heartbeat(data, vm["id"])
    return vm["id"], rec


def measure(pad_mib: int, rate_mbit: float) -> dict[str, Any]:
    """The whole run (see the module docstring).

    Raises:
        BenchError: a node, a VM or the migration failed.
    """
    if os.geteuid() != 0:
        raise BenchError("the VM bench needs root (network namespaces, FUSE)")
    say(f"vm: building the guest image with {pad_mib} MiB unused")
    image = build_guest_image(pad_bytes=pad_mib * MIB)
    work = Path(tempfile.mkdtemp(prefix="vm-bench-", dir="/tmp"))
    os.chmod(work, 0o755)
    procs: list[tuple[subprocess.Popen[Any], Path]] = []
    try:
        say("vm: (a) a VM from a local copy of the image")
        local = local_boot(image, work)
        say(f"vm: local first heartbeat after {local['first_heartbeat_s']:.1f} s")
        keys = work / "keys"
        root_json = init_keys(keys, REPO)
        store = work / "store"
        publish_image(image.path, name=NAME, version=VERSION, repo=REPO, keys=keys, store=store)
        payload = work / "payload.sh"
        payload.write_bytes(PAYLOAD)
        with Network(3, rate_mbit=rate_mbit) as net:
            source, full, cold = net.hosts
            source.popen([PY, "-m", "swarm", "serve", store, "--listen", "127.0.0.1:8000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            src_cfg = _config(work / "source", source, root_json,
                              origin="http://127.0.0.1:8000/", bootstrap=[])  # fmt: skip
            with open(work / "source.log", "ab") as f:
                src = source.popen([PY, "-m", "swarm", "node", "--config", src_cfg],
                                   stdout=f, stderr=f)  # fmt: skip
            procs.append((src, work / "source"))  # no mount
            _wait("the source holds the image", lambda: _image_done(source), 600, [src])

            say("vm: (b) the full download, then a VM from the complete mount")
            full_cfg = _node_config(work / "full", full, root_json, source, "prefetch")
            t0 = time.monotonic()
            with open(work / "full.log", "ab") as f:
                fp = full.popen([PY, "-m", "swarm", "node", "--config", full_cfg],
                                stdout=f, stderr=f)  # fmt: skip
            procs.append((fp, work / "full" / "mnt"))
            _wait("the full node holds the image", lambda: _complete(full), 900, [fp])
            full_download = time.monotonic() - t0
            full_data = work / "full" / "data"
            b_id, b_rec = _boot_on_node(full, full_cfg, full_data, payload)
            mount_s = b_rec["last_heartbeat"] - b_rec["created"]
            say(f"vm: full download {full_download:.1f} s; mount first heartbeat {mount_s:.1f} s")
            _swarm(full, "vm", "stop", b_id, "--config", full_cfg, "--grace", "5")

            say("vm: (c) a cold VM streamed from the peer")
            cold_cfg = _node_config(work / "cold", cold, root_json, source, "on-demand")
            with open(work / "cold.log", "ab") as f:
                cp = cold.popen([PY, "-m", "swarm", "node", "--config", cold_cfg],
                                stdout=f, stderr=f)  # fmt: skip
            procs.append((cp, work / "cold" / "mnt"))
            cold_data = work / "cold" / "data"
            _wait("the cold node's API", lambda: (cold_data / "node.json").exists(), 120, [cp])
            _wait_image(work / "cold" / "mnt" / ".images" / REPO / NAME / VERSION, 120)
            c_id, c_rec = _boot_on_node(cold, cold_cfg, cold_data, payload)
            fetched = _image_transfer(cold)
            cold_s = c_rec["last_heartbeat"] - c_rec["created"]
            say(f"vm: cold first heartbeat {cold_s:.1f} s, {fetched.get('total_done')} B fetched")

            say("vm: live migration cold -> full")
            time.sleep(3)  # a few beats on the source
            t0 = time.monotonic()
            r = cold.run([PY, "-m", "swarm", "vm", "migrate", c_id, "--config", cold_cfg,
                          "--to", full_cfg, "--json"], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
            if r.returncode != 0:
                raise BenchError(f"swarm vm migrate: {r.stderr.strip()[-500:]}")
            wall = time.monotonic() - t0
            moved = _record(cold_data, c_id)
            arrived = _first_heartbeat(full_data, c_id, 120)
            gap = arrived["last_heartbeat"] - moved["last_heartbeat"]
            after = _record(full_data, c_id)
            _swarm(full, "vm", "stop", c_id, "--config", full_cfg, "--grace", "5")
        size = image.size
        wire = size * 8 / (rate_mbit * 1e6)
        done = int(fetched.get("total_done") or 0)
        return {
            "image_bytes": size,
            "boot_bytes": image.boot_bytes,
            "pad_bytes": image.pad_bytes,
            "rate_mbit": rate_mbit,
            "memory_mib": 128,
            "local": local,
            "mount_first_heartbeat_s": mount_s,
            "cold_first_heartbeat_s": cold_s,
            "cold_vs_local": cold_s / local["first_heartbeat_s"],
            "full_download_s": full_download,
            "full_download_wire_s": wire,
            "cold_fetched_bytes": done,
            "cold_fetched_fraction": done / size,
            "migration": {
                "command_s": wall,
                "migration_s": moved.get("migration_seconds"),
                "downtime_ms": moved.get("migration_downtime_ms"),
                "heartbeat_gap_s": gap,
                "state_on_source": moved.get("state"),
                "state_on_destination": after.get("state"),
                "counter_on_destination": _counter(full_data, c_id),
            },
        }
    finally:
        for proc, mnt in reversed(procs):
            _stop(proc, mnt)
        shutil.rmtree(work, ignore_errors=True)


def _counter(data: Path, vm_id: str) -> int | None:
    path = data / "vms" / vm_id / "joboutputs" / "counter"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else None


def markdown(r: dict[str, Any], command: str) -> str:
    local = r["local"]["first_heartbeat_s"]
    cold, mig = r["cold_first_heartbeat_s"], r["migration"]
    ok_cold = "PASS" if cold <= 1.5 * local and cold < r["full_download_s"] else "**MISS**"
    ok_frac = "PASS" if r["cold_fetched_fraction"] <= 0.10 else "**MISS**"
    down = mig["downtime_ms"]
    ok_pause = "PASS" if down is not None and down < 1000 else "**MISS**"
    read = r["local"].get("guest_read_bytes")
    rows = [
        ("first heartbeat, local copy of the image", f"{local:.1f} s", "reference", ""),
        ("first heartbeat, node's mount, image complete",
         f"{r['mount_first_heartbeat_s']:.1f} s",
         f"{r['mount_first_heartbeat_s'] / local:.2f}x local", ""),
        ("first heartbeat, cold, streamed from a peer (no origin)", f"{cold:.1f} s",
         f"{r['cold_vs_local']:.2f}x local; full download {r['full_download_s']:.1f} s",
         f"<= 1.5x local, far below the full download: {ok_cold}"),
        ("whole image downloaded first (node launch to complete)",
         f"{r['full_download_s']:.1f} s", f"wire time {r['full_download_wire_s']:.1f} s", ""),
        ("fetched by the cold node at its first heartbeat / image",
         f"{r['cold_fetched_bytes'] / 1e6:.1f} MB / {r['image_bytes'] / 1e6:.1f} MB"
         f" = {100 * r['cold_fetched_fraction']:.1f} %",
         "" if read is None else f"the guest read {read / 1e6:.1f} MB of its disk (local)",
         f"<= 10 %: {ok_frac}"),
        ("live migration cold -> full node: `swarm vm migrate`", f"{mig['command_s']:.1f} s",
         f"mirror + memory {mig['migration_s']:.1f} s (source)", ""),
        ("guest paused (qemu's downtime)", f"{down} ms", "", f"< 1 s: {ok_pause}"),
        ("heartbeat gap across the move (host clocks, beats 1 s apart)",
         f"{mig['heartbeat_gap_s']:.1f} s",
         f"counter on the destination {mig['counter_on_destination']}", ""),
    ]  # fmt: skip
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    m = r["meta"]
    return (
        "# VMs from a streamed signed image, and live migration (issue 11)\n\n"
        f"- date: {m['date']}; command: `{command}` ({m['runtime_seconds']:.0f} s)\n"
        f"- machine: {m['machine']['nproc']} cores, shared; load at start"
        f" {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}\n"
        f"- image: the test guest image, {r['boot_bytes'] / 1e6:.1f} MB boot part +"
        f" {r['pad_bytes'] / 1e6:.1f} MB unused = {r['image_bytes'] / 1e6:.1f} MB;"
        f" links {r['rate_mbit']:g} Mbit/s each way (network namespaces); VMs"
        f" {r['memory_mib']} MiB, 1 vCPU, TCG (software emulation)\n"
        "- the cold node has no origin configured (the origin is on the source's loopback,"
        " out of its reach: origin down); metadata and blocks come from the source's"
        " seeding node\n\n"
        "| measure | value | reference | goal |\n| --- | --- | --- | --- |\n" + table + "\n"
    )


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vm_bench", description=__doc__)
    p.add_argument("--pad-mib", type=int, default=256, help="unused MiB in the image (256)")
    p.add_argument("--rate-mbit", type=float, default=50.0)
    a = p.parse_args(argv)
    command = command or "python -m bench.vm_bench " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    t, load = time.time(), os.getloadavg()
    try:
        record = measure(a.pad_mib, a.rate_mbit)
    except (BenchError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"bench.vm_bench: {exc}", file=sys.stderr)
        return 1
    record["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "loadavg_start": load,
        "runtime_seconds": round(time.time() - t, 1),
        "command": command.strip(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vm.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(record, command.strip())
    (RESULTS / "VM.md").write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
