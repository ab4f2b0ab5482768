"""Live migration between two VM services (two nodes' data directories) on
loopback: the test guest keeps counting across it, its disk writes come
along, and only the overlay and the memory cross (the destination has the
same signed base image of its own), over TLS with a key made for this
migration: a plain NBD client cannot reach the waiting disk export. The
destination's record keeps the agent's version, and the guest is sent its
user_data again there."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

from runner.cores import CoreLedger
from swarm_testing.guest_image import build_guest_image
from tests.vm.test_vm_service import IMAGE, lease_for
from vm.config import VmRequest, VmSettings
from vm.exceptions import VmRefused
from vm.manager import ImageLookup, VmService
from vm.qemu import EXPORT, PSK_DIR

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

COUNTER = b"""#!/bin/sh
dd if=/dev/urandom of=/dev/vda bs=64k seek=200 count=16 2>/dev/null
dd if=/dev/vda bs=64k skip=200 count=16 2>/dev/null | md5sum > $JOBOUTPUTS/written
i=0
while true; do
  i=$((i + 1))
  echo $i > $JOBOUTPUTS/counter
  # user_data arrives again only when a host greets the guest anew (the destination)
  if [ $i -eq 3 ]; then rm -f /run/vac/user_data; fi
  if [ $i -gt 3 ] && [ -e /run/vac/user_data ]; then echo again > $JOBOUTPUTS/user_data_again; fi
  dd if=/dev/vda bs=64k skip=200 count=16 2>/dev/null | md5sum > $JOBOUTPUTS/disk
  touch $JOBOUTPUTS/vm-heartbeat
  sleep 1
done
"""


def plain_nbd_write(port: int) -> subprocess.CompletedProcess[str]:
    """A write to the destination's disk export by an NBD client without the key."""
    url = f"nbd://127.0.0.1:{port}/{EXPORT}"
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x41 0 512", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_running_vm_moves_to_another_node_and_keeps_counting(tmp_path: Path) -> None:
    guest = build_guest_image(pad_bytes=8 << 20)

    def svc(name: str) -> VmService:
        base = tmp_path / f"{name}-base.img"  # each node has its own copy of the image
        base.symlink_to(guest.path)
        return VmService(
            VmSettings(accelerator="tcg", grace=10.0, software=False, heartbeat_seconds=60),
            data_dir=tmp_path / name,
            cores=CoreLedger(),
            lease_at=lease_for(3600),
            find_image=lambda image: ImageLookup(base, "raw"),
        )

    async def counter(s: VmService, vm_id: str) -> int:
        path = s.root / vm_id / "joboutputs" / "counter"
        text = path.read_text().strip() if path.exists() else ""
        return int(text) if text.isdigit() else 0  # the agent may ship it mid-write

    async def until(what: str, check: object, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if await check():  # type: ignore[operator]
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    async def main() -> None:
        src, dst = svc("src"), svc("dst")
        await src.start()
        await dst.start()
        try:
            a = await src.start_vm(VmRequest(IMAGE, user_data=COUNTER))

            async def counting() -> bool:
                return await counter(src, a.id) >= 5

            await until("the guest counting on the source", counting, 90)
            before = src.get(a.id)
            assert before.agent == "1"
            assert not (src.root / a.id / "joboutputs" / "user_data_again").exists()
            written = (src.root / a.id / "joboutputs" / "written").read_bytes()
            assert len(written) == 36  # the md5 of 1 MiB of random data, not of nothing
            with pytest.raises(VmRefused, match="was prepared"):
                await src.migrate_vm(a.id, host="127.0.0.1", nbd_port=1, migrate_port=1, to="dst")
            req = dataclasses.replace(src.prepare_migration(a.id), source="src")
            assert len(req.psk) == 64 and req.user_data == COUNTER and req.agent == "1"
            assert req.psk != src.prepare_migration(a.id).psk  # fresh each time, the last kept
            req = dataclasses.replace(src.prepare_migration(a.id), source="src")
            incoming, nbd, port = await dst.incoming(req, host="127.0.0.1")
            assert incoming.state == "incoming" and incoming.agent == "1"
            key = dst.root / a.id / PSK_DIR / "keys.psk"
            assert key.stat().st_mode & 0o777 == 0o600
            assert key.read_text() == f"swarm:{req.psk}\n"
            with pytest.raises(VmRefused, match="already on this node"):
                await dst.incoming(req, host="127.0.0.1")
            # the waiting disk export takes no client without the migration's key
            plain = await asyncio.to_thread(plain_nbd_write, nbd)
            assert plain.returncode != 0, plain.stdout
            assert "TLS" in plain.stdout + plain.stderr, plain.stdout + plain.stderr
            moved = await src.migrate_vm(a.id, host="127.0.0.1", nbd_port=nbd,
                                         migrate_port=port, to="dst")  # fmt: skip
            assert moved.state == "migrated" and moved.outcome == "migrated to dst"
            assert moved.migration_downtime_ms is not None
            assert src.cores.snapshot().vm == 0 and src.status().running == 0
            last_on_source = await counter(src, a.id)

            async def arrived() -> bool:
                return dst.get(a.id).state == "running"

            await until("the VM running on the destination", arrived, 60)

            async def counting_on() -> bool:
                return await counter(dst, a.id) > last_on_source

            await until("the counter going on on the destination", counting_on, 60)

            async def disk_read_there() -> bool:
                path = dst.root / a.id / "joboutputs" / "disk"
                return path.exists() and path.read_bytes() == written

            # what the guest wrote on the source reads back the same on the destination
            await until("the guest's writes read back on the destination", disk_read_there, 30)
            assert dst.get(a.id).migrated_from == "src"
            assert dst.get(a.id).agent == "1"
            assert not key.exists() and not (src.root / a.id / PSK_DIR).exists()

            async def user_data_again() -> bool:
                return (dst.root / a.id / "joboutputs" / "user_data_again").exists()

            await until("the destination sending the guest its user_data", user_data_again, 30)

            async def beating() -> bool:
                return dst.get(a.id).last_heartbeat is not None

            await until("a heartbeat on the destination", beating, 30)
            stopped = await dst.stop_vm(a.id, grace=15)
            assert (stopped.state, stopped.code) == ("stopped", 100), stopped
            # a reboot would have restarted the counter at 1; it went on
            assert await counter(dst, a.id) > last_on_source
        finally:
            await src.stop(grace=1)
            await dst.stop(grace=1)

    asyncio.run(main())
