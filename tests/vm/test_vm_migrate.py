"""Live migration between two VM services (two nodes' data directories) on
loopback: the test guest keeps counting across it, its disk writes come
along, and only the overlay and the memory cross (the destination has the
same signed base image of its own)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from runner.cores import CoreLedger
from swarm_testing.guest_image import build_guest_image
from tests.vm.test_vm_service import IMAGE, lease_for
from vm.config import IncomingRequest, VmRequest, VmSettings
from vm.exceptions import VmRefused
from vm.manager import ImageLookup, VmService

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

COUNTER = b"""#!/bin/sh
dd if=/dev/urandom of=/dev/vda bs=64k seek=200 count=16 2>/dev/null
dd if=/dev/vda bs=64k skip=200 count=16 2>/dev/null | md5sum > $JOBOUTPUTS/written
i=0
while true; do
  i=$((i + 1))
  echo $i > $JOBOUTPUTS/counter
  dd if=/dev/vda bs=64k skip=200 count=16 2>/dev/null | md5sum > $JOBOUTPUTS/disk
  touch $JOBOUTPUTS/vm-heartbeat
  sleep 1
done
"""


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
                return await counter(src, a.id) >= 3

            await until("the guest counting on the source", counting, 90)
            before = src.get(a.id)
            written = (src.root / a.id / "joboutputs" / "written").read_bytes()
            assert len(written) == 36  # the md5 of 1 MiB of random data, not of nothing
            req = IncomingRequest(
                vm_id=a.id, image=IMAGE, cores=a.cores, memory=a.memory,
                accelerator="tcg", software=False, started=before.created,
                ends=before.ends or 0.0, source="src",
            )  # fmt: skip
            incoming, nbd, port = await dst.incoming(req, host="127.0.0.1")
            assert incoming.state == "incoming"
            with pytest.raises(VmRefused, match="already on this node"):
                await dst.incoming(req, host="127.0.0.1")
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
