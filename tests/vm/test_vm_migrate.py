"""Live migration between two VM services (two nodes' data directories) on
loopback, driven through their HTTP routes: the test guest keeps counting
across it, its disk writes come along, and only the overlay and the memory
cross (the destination has the same signed base image of its own), over TLS
with a key each side derives from the two public keys of this migration: no
request or answer of the node API carries it. The destination's relays own
its ports: an idle connection, garbage and a plain NBD client, all made to
the memory and NBD ports before the source connects, are refused and do not
stop the migration; a forged public key makes the migration fail cleanly
(one line, the VM running on at the source, the destination given up, and
taking the VM when it is tried again). The
destination's record keeps the agent's version, and the guest is sent its
user_data again there."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from runner.cores import CoreLedger
from swarm_testing.guest_image import build_guest_image
from tests.vm.test_vm_service import IMAGE, lease_for
from vm.api import add_vm_routes
from vm.config import IncomingRequest, VmRequest, VmSettings
from vm.exceptions import VmConfigError
from vm.handshake import MAGIC, KeyPair
from vm.manager import ImageLookup, VmService
from vm.qemu import EXPORT, PSK_DIR

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

TOKEN = "migration-test-token"

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


def require_token(request: web.Request) -> None:
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        raise web.HTTPUnauthorized(text='{"error": "token"}', content_type="application/json")


@asynccontextmanager
async def node_api(service: VmService) -> AsyncIterator[str]:
    """The service's VM routes on a real HTTP server on 127.0.0.1; its base URL."""
    app = web.Application()
    add_vm_routes(app, service, require_token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


class Api:
    """Requests to the nodes' APIs; every body sent and received is kept."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.exchanged: list[str] = []

    async def post(self, base: str, path: str, body: Any) -> tuple[int, Any]:
        text = json.dumps(body)
        self.exchanged.append(text)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with self.http.post(base + path, data=text, headers=headers) as r:
            answer = await r.text()
            self.exchanged.append(answer)
            return r.status, json.loads(answer)


async def hostile_connections(port: int) -> list[asyncio.StreamWriter]:
    """An idle connection (no key, nothing sent) and one sending garbage, to ``port``."""
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    _, garbage = await asyncio.open_connection("127.0.0.1", port)
    garbage.write(os.urandom(64 * 1024))
    return [idle, garbage]


def test_a_running_vm_moves_to_another_node_and_keeps_counting_though_strangers_connect_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vm.relay")
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
        for s in (src, dst):
            await s.start()
        try:
            async with node_api(src) as src_url, node_api(dst) as dst_url, \
                    aiohttp.ClientSession() as http:  # fmt: skip
                await migrate(src, dst, src_url, dst_url, Api(http))
        finally:
            for s in (src, dst):
                await s.stop(grace=1)

    async def migrate(src: VmService, dst: VmService, src_url: str, dst_url: str, api: Api) -> None:
        a = await src.start_vm(VmRequest(IMAGE, user_data=COUNTER))

        async def counting() -> bool:
            return await counter(src, a.id) >= 5

        await until("the guest counting on the source", counting, 90)
        before = src.get(a.id)
        assert before.agent == "1"
        assert not (src.root / a.id / "joboutputs" / "user_data_again").exists()
        written = (src.root / a.id / "joboutputs" / "written").read_bytes()
        assert len(written) == 36  # the md5 of 1 MiB of random data, not of nothing
        target = {"host": "127.0.0.1", "nbd_port": 1, "migrate_port": 1, "to": "dst",
                  "key": KeyPair().public_hex}  # fmt: skip
        status, doc = await api.post(src_url, f"v1/vms/{a.id}/migrate", target)
        assert status == 409 and "was prepared" in doc["error"], doc

        # A forged public key (not the destination's): the migration fails in
        # one line, the VM runs on at the source, the destination gives up (and
        # takes the VM again later).
        status, req = await api.post(src_url, f"v1/vms/{a.id}/migration", {})
        assert status == 200 and "psk" not in req, req
        assert req["user_data"] == COUNTER.decode() and req["agent"] == "1"
        status, waiting = await api.post(dst_url, "v1/vms/incoming", {**req, "source": "src"})
        assert status == 201, waiting
        forged = {**target, "nbd_port": waiting["nbd_port"],
                  "migrate_port": waiting["migrate_port"], "to": "dst"}  # fmt: skip
        status, doc = await api.post(src_url, f"v1/vms/{a.id}/migrate", forged)
        assert status == 502 and "\n" not in doc["error"], doc
        assert "refused the disk stream: its key differs" in doc["error"], doc
        assert src.get(a.id).state == "running" and src.cores.snapshot().vm == 1
        assert not (src.root / a.id / PSK_DIR).exists()
        status, gave_up = await api.post(dst_url, f"v1/vms/{a.id}/stop", {"grace": 0})
        assert status == 200 and gave_up["state"] == "failed", gave_up
        assert "abandoned" in gave_up["error"] and dst.cores.snapshot().vm == 0
        assert not (dst.root / a.id / PSK_DIR).exists() and dst.status().running == 0
        still = await counter(src, a.id)

        async def counting_here() -> bool:
            return await counter(src, a.id) > still

        await until("the guest counting on at the source", counting_here, 30)

        # The real migration, to the same destination: the failed try is set aside.
        status, req = await api.post(src_url, f"v1/vms/{a.id}/migration", {})
        assert status == 200 and len(req["source_key"]) == 64, req
        status, again = await api.post(src_url, f"v1/vms/{a.id}/migration", {})
        assert again["source_key"] != req["source_key"]  # fresh each time, the last kept
        status, waiting = await api.post(dst_url, "v1/vms/incoming", {**again, "source": "src"})
        assert status == 201, waiting
        assert waiting["vm"]["state"] == "incoming" and waiting["vm"]["agent"] == "1"
        tried = json.loads((dst.root / ".old" / a.id / "1" / "record.json").read_text())
        assert tried["state"] == "failed" and "abandoned" in tried["error"]
        nbd, port = waiting["nbd_port"], waiting["migrate_port"]
        key = dst.root / a.id / PSK_DIR / "keys.psk"
        assert key.stat().st_mode & 0o777 == 0o600
        assert (key.parent.stat().st_mode & 0o777) == 0o700  # qemu's sockets are in it
        psk = key.read_text().strip().removeprefix("swarm:")
        status, doc = await api.post(dst_url, "v1/vms/incoming", {**again, "source": "src"})
        assert status == 409 and "already on this node" in doc["error"], doc
        # Before the source connects: an idle and a garbage connection to
        # each port, and a plain NBD client; none stops the migration.
        hostile = [*await hostile_connections(port), *await hostile_connections(nbd)]
        plain = await asyncio.to_thread(plain_nbd_write, nbd)
        assert plain.returncode != 0, plain.stdout
        target = {"host": "127.0.0.1", "nbd_port": nbd, "migrate_port": port, "to": "dst",
                  "key": waiting["key"]}  # fmt: skip
        status, moved = await api.post(src_url, f"v1/vms/{a.id}/migrate", target)
        assert status == 200, moved
        for w in hostile:
            w.close()
        assert moved["state"] == "migrated" and moved["outcome"] == "migrated to dst"
        assert moved["migration_downtime_ms"] is not None
        assert src.cores.snapshot().vm == 0 and src.status().running == 0
        refused = [r.getMessage() for r in caplog.records
                   if r.name == "vm.relay" and "refused" in r.getMessage()]  # fmt: skip
        assert sum(f"vm {a.id}: memory connection" in m for m in refused) >= 1, refused
        assert sum(f"vm {a.id}: disk connection" in m for m in refused) >= 2, refused
        # no request or answer of the node API carried the migration's key
        raw = bytes.fromhex(psk)
        for text in api.exchanged:
            for form in (psk, psk.upper(), base64.b64encode(raw).decode()):
                assert form not in text, text
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
        assert not key.exists() and not key.parent.exists()
        assert not (src.root / a.id / PSK_DIR).exists()

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

    asyncio.run(main())


def test_a_waiting_destination_gives_up_when_stopped_and_node_shutdown_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """A destination whose source never comes: stopping the VM abandons it at
    once (qemu ended, relays closed, cores back, key gone), and so does the
    node's shutdown (it waited for the migration's deadline before). A
    malformed source key starts nothing. No guest boots here: qemu waits."""
    guest = build_guest_image(pad_bytes=8 << 20)
    dst = VmService(
        VmSettings(accelerator="tcg", grace=10.0, software=False),
        data_dir=tmp_path / "dst",
        cores=CoreLedger(),
        lease_at=lease_for(3600),
        find_image=lambda image: ImageLookup(guest.path, "raw"),
    )
    now = time.time()
    req = IncomingRequest(
        vm_id="20261201-110000-abcdef", image=IMAGE, cores=1, memory=128 << 20,
        accelerator="tcg", software=False, started=now, ends=now + 600, source="src",
        source_key=KeyPair().public_hex,
    )  # fmt: skip

    async def greeted(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(reader.readexactly(len(MAGIC)), 10)
        finally:
            writer.close()

    async def main() -> None:
        await dst.start()
        try:
            with pytest.raises(VmConfigError, match=r"^source_key: expected an X25519"):
                await dst.incoming(dataclasses.replace(req, source_key="00" * 31), host="127.0.0.1")
            with pytest.raises(VmConfigError, match=r"^source_key: not a usable X25519 public key"):
                await dst.incoming(dataclasses.replace(req, source_key="00" * 32), host="127.0.0.1")
            assert dst.list() == [] and dst.cores.snapshot().vm == 0

            waiting = await dst.incoming(req, host="127.0.0.1")
            assert waiting.vm.state == "incoming" and len(waiting.key) == 64
            assert await greeted(waiting.migrate_port) == MAGIC  # the relay, not qemu
            assert await greeted(waiting.nbd_port) == MAGIC
            pid = waiting.vm.pid
            assert pid is not None
            began = time.monotonic()
            gone = await asyncio.wait_for(dst.stop_vm(req.vm_id, grace=0), 30)
            assert time.monotonic() - began < 30
            assert gone.state == "failed" and "abandoned" in (gone.error or ""), gone
            assert not Path(f"/proc/{pid}").exists() and dst.cores.snapshot().vm == 0
            assert not (dst.root / req.vm_id / PSK_DIR).exists()
            with pytest.raises(OSError):
                await greeted(waiting.migrate_port)

            other = dataclasses.replace(req, vm_id="20261201-110000-fedcba")
            second = await dst.incoming(other, host="127.0.0.1")
            await asyncio.wait_for(dst.stop(grace=1), 30)  # the node shuts down
            assert dst.get(other.vm_id).state == "failed"
            assert second.vm.pid is not None and not Path(f"/proc/{second.vm.pid}").exists()
        finally:
            await dst.stop(grace=1)

    asyncio.run(main())
