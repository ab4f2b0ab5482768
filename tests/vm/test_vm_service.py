"""The node's VM service against a real qemu booting a blank disk (no guest, so
no agent ever answers): what the host alone decides, the end of a VM's time,
a guest that never boots, a qemu that cannot start, the cores, the [vm]
table, and qemu left behind by a killed node. The guest's side of the
contract is shown on a real node in test_vm_node.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.cores import CoreLedger
from runner.lease import Lease
from swarm.config import parse_config
from vm.config import ImageName, VmRequest, VmSettings, parse_request, vm_settings
from vm.exceptions import ImageRefused, QemuError, VmConfigError, VmRefused
from vm.manager import ImageLookup, VmService, physical_cores
from vm.qemu import kvm_usable

IMAGE = ImageName("r.example.org", "blank", "1")


def lease_for(seconds: float, cores: int = 2) -> Callable[[float], Lease]:
    end = time.time() + seconds

    def lease_at(_mono: float) -> Lease:
        now = time.time()
        return Lease(cores, 10.0, max(0.0, end - now), 128 << 20, now, {})

    return lease_at


def service(tmp_path: Path, lease_at: Callable[[float], Lease], **kw: object) -> VmService:
    base = tmp_path / "blank.img"
    if not base.exists():
        base.write_bytes(b"\0" * (1 << 20))
        base.chmod(0o444)

    def find(image: ImageName) -> ImageLookup:
        if image.name == "refused":
            raise ImageRefused(f"image {image} is refused by the site policy: not signed")
        return ImageLookup(base, "raw")

    settings = VmSettings(**{"accelerator": "tcg", "grace": 1.0, "memory": 32 << 20, **kw})  # type: ignore[arg-type]
    return VmService(
        settings, data_dir=tmp_path / "data", cores=CoreLedger(), lease_at=lease_at,
        find_image=find,
    )  # fmt: skip


@pytest.mark.qemu
def test_a_vm_never_outlives_the_lease_and_its_cores_are_never_overcommitted(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        svc = service(tmp_path, lease_for(4.0, cores=2), fizzle_seconds=600)
        await svc.start()
        try:
            a = await svc.start_vm(VmRequest(IMAGE, cores=1, lifetime=3600))
            assert a.ends is not None and a.ends <= time.time() + 4.0
            assert svc.cores.snapshot().vm == 1
            svc.cores.claim_site(2)  # a site range takes the other core
            with pytest.raises(VmRefused, match="1 cores asked, 0 free of the lease's 2"):
                await svc.start_vm(VmRequest(IMAGE, cores=1))
            svc.cores.release_site()
            await asyncio.wait_for(svc.vms[a.id].done.wait(), 60)
            done = svc.get(a.id)
            # the lease ended: STOP and the power button (no guest hears them), the
            # grace, quit; the host stopped it, so no abort and no back-off
            assert done.state == "stopped" and done.code is None and not done.aborted
            assert "the host stopped it" in (done.outcome or "")
            assert done.stopped is not None and done.stopped <= a.ends + 5 + 10
            assert svc.cores.snapshot().vm == 0
            assert svc.backoff.refusal(str(IMAGE), time.time()) is None
            record = json.loads((Path(done.dir) / "record.json").read_text())
            assert record["state"] == "stopped" and record["pid"] is None
        finally:
            await svc.stop()

    asyncio.run(main())


@pytest.mark.qemu
def test_a_guest_whose_agent_never_says_hello_is_destroyed_with_700_and_backed_off(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        svc = service(tmp_path, lease_for(3600), boot_seconds=2, backoff_seconds=600)
        await svc.start()
        try:
            a = await svc.start_vm(VmRequest(IMAGE))
            await asyncio.wait_for(svc.vms[a.id].done.wait(), 60)
            done = svc.get(a.id)
            assert (done.code, done.outcome, done.aborted) == (700, "heartbeat", True)
            assert done.error == "heartbeat stale"
            with pytest.raises(VmRefused, match=r"backed off .* 700 heartbeat"):
                await svc.start_vm(VmRequest(IMAGE))
            assert svc.status().backed_off.keys() == {str(IMAGE)}
        finally:
            await svc.stop()

    asyncio.run(main())


@pytest.mark.qemu
def test_a_qemu_that_cannot_start_is_recorded_as_failed_and_gives_its_cores_back(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        svc = service(tmp_path, lease_for(3600, cores=1), qemu="/nonexistent/qemu-system")
        await svc.start()
        try:
            with pytest.raises(QemuError, match="cannot run /nonexistent/qemu-system"):
                await svc.start_vm(VmRequest(IMAGE))
            (failed,) = svc.list()
            assert failed.state == "failed" and "cannot run" in (failed.error or "")
            assert svc.cores.snapshot().vm == 0
            assert json.loads((Path(failed.dir) / "record.json").read_text())["state"] == "failed"
            with pytest.raises(ImageRefused, match="refused by the site policy"):
                await svc.start_vm(VmRequest(ImageName("r.example.org", "refused", "1")))
            assert len(svc.list()) == 1  # a refused image starts nothing, records nothing
        finally:
            await svc.stop()

    asyncio.run(main())


@pytest.mark.qemu
def test_a_qemu_that_dies_under_kvm_settles_software_emulation_at_once(tmp_path: Path) -> None:
    """Seen on some boots of these machines: qemu aborts on an MSR under KVM.
    The first VM (KVM on trial) is started again under TCG at once, the
    verdict naming what qemu printed, instead of failing its start."""
    qemu = tmp_path / "qemu-dies-under-kvm"
    qemu.write_text(
        "#!/bin/sh\n"
        'case "$*" in *accel=kvm*) echo "kvm_buf_set_msrs: Assertion failed" >&2; exit 134;; esac\n'
        'exec qemu-system-x86_64 "$@"\n'
    )
    qemu.chmod(0o755)

    async def main() -> None:
        svc = service(
            tmp_path, lease_for(3600), accelerator="auto", probe_seconds=600.0, qemu=str(qemu)
        )
        await svc.start()
        try:
            vm = await asyncio.wait_for(svc.start_vm(VmRequest(IMAGE)), 60)  # not the 600 s
            verdict = svc.accelerator.chosen
            assert verdict is not None and verdict.name == vm.accelerator == "tcg"
            if kvm_usable() is None:  # /dev/kvm opens: the first VM was KVM's trial
                assert verdict.why == (
                    "software emulation: KVM unusable (qemu exited with status 134:"
                    " kvm_buf_set_msrs: Assertion failed)"
                )
            assert svc.get(vm.id).state == "running"
        finally:
            await svc.stop()

    asyncio.run(main())


@pytest.mark.qemu
def test_node_shutdown_ends_every_vm_and_a_qemu_left_by_a_killed_node_is_killed(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        svc = service(tmp_path, lease_for(3600))
        await svc.start()
        a = await svc.start_vm(VmRequest(IMAGE))
        b = await svc.start_vm(VmRequest(IMAGE))
        pids = [a.pid, b.pid]
        await svc.stop(grace=0.5)  # node shutdown: both at once, nothing left
        for pid in pids:
            assert pid is not None and not os.path.exists(f"/proc/{pid}")
        assert {v.state for v in svc.list()} == {"stopped"}

        # A node killed with SIGKILL leaves its VM's process and a live record.
        vm_dir = Path(a.dir)
        left = subprocess.Popen(["sleep", "60"], cwd=vm_dir)
        try:
            record = json.loads((vm_dir / "record.json").read_text())
            record.update(state="running", pid=left.pid, code=None, outcome=None)
            (vm_dir / "record.json").write_text(json.dumps(record))
            again = service(tmp_path, lease_for(3600))
            await again.start()
            assert left.wait(timeout=10) == -9
            report = again.get(a.id)
            assert report.state == "stopped"
            assert report.outcome == (
                f"the node daemon stopped while it ran (its qemu, pid {left.pid}, was killed)"
            )
            await again.stop()
        finally:
            if left.poll() is None:
                left.kill()
                left.wait()

    asyncio.run(main())


def test_the_vm_table_and_requests_are_checked_naming_the_key() -> None:
    s = vm_settings({"accelerator": "tcg", "memory": "256M", "heartbeat_seconds": 0})
    assert (s.accelerator, s.memory, s.heartbeat_seconds) == ("tcg", 256 << 20, 0.0)
    tables: list[tuple[dict[str, object], str]] = [
        ({"accelerater": "tcg"}, "vm.accelerater: unknown key"),
        ({"accelerator": "xen"}, "vm.accelerator: expected one of auto, kvm, tcg"),
        ({"memory": "lots"}, "vm.memory: expected a positive size"),
        ({"memory": "1M"}, "vm.memory: '1M' is less than"),
        ({"cores": 0}, "vm.cores: expected a whole number from 1"),
        ({"grace": -1}, "vm.grace: expected a number of seconds"),
        ({"enabled": "yes"}, "vm.enabled: expected true or false"),
    ]
    for table, message in tables:
        with pytest.raises(VmConfigError, match=message):
            vm_settings(table)
    assert parse_config('[vm]\naccelerator = "tcg"\n').vm == {"accelerator": "tcg"}
    for doc, message in [
        ({"image": "a/b"}, "image: expected REPO/NAME/VERSION"),
        ({"image": "r.example.org/../1"}, "image: the name"),
        ({"image": "r.example.org/n/1", "cpus": 2}, "cpus: unknown field"),
        ({"image": "r.example.org/n/1", "lifetime": 0}, "lifetime: expected"),
        ({"image": "r.example.org/n/1", "user_data": 5}, "user_data: expected the text"),
        ([], "must be a JSON object"),
    ]:
        with pytest.raises(VmConfigError, match=message):
            parse_request(doc)


def test_physical_cores_are_counted_from_cpuinfo() -> None:
    info = "".join(
        f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i // 2}\n\n" for i in range(8)
    )
    assert physical_cores(info, 8) == 4
    assert physical_cores("processor : 0\n", 3) == 3


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (root only), unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mp = tmp_path / "small"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mp)], check=True)
    try:
        yield mp
    finally:
        subprocess.run(["umount", "-l", str(mp)], check=False)


@pytest.mark.qemu
@pytest.mark.timeout(180)
def test_an_overlay_that_fills_its_file_system_is_named_and_the_vm_ended(
    tmp_path: Path, small_fs: Path
) -> None:
    from swarm_testing.guest_image import build_guest_image

    guest = build_guest_image(pad_bytes=64 << 20)  # room on /dev/vda to write into

    async def main() -> None:
        svc = VmService(
            VmSettings(accelerator="tcg", grace=1.0, software=False),
            data_dir=small_fs / "data",
            cores=CoreLedger(),
            lease_at=lease_for(3600),
            find_image=lambda image: ImageLookup(guest.path, "raw"),
        )
        await svc.start()
        try:
            fill = (
                "#!/bin/sh\ntouch $JOBOUTPUTS/vm-heartbeat\n"
                "dd if=/dev/urandom of=/dev/vda bs=1M seek=16 count=48 conv=fsync\n"
                "echo '200 wrote it all' > $JOBOUTPUTS/shutdown_message\n"
            )
            a = await svc.start_vm(VmRequest(IMAGE, user_data=fill.encode()))
            await asyncio.wait_for(svc.vms[a.id].done.wait(), 150)
            done = svc.get(a.id)
            assert done.state == "stopped" and done.code != 200, done
            assert (done.error or "").startswith("overlay disk full: no space left"), done
            assert svc.cores.snapshot().vm == 0
            assert not (Path(done.dir) / "disk.qcow2").exists()  # the space is given back
            assert json.loads((Path(done.dir) / "record.json").read_text())["error"] == done.error
        finally:
            await svc.stop()

    asyncio.run(main())


@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_auto_probes_kvm_once_with_a_linux_guest_and_falls_back_to_software_emulation(
    tmp_path: Path,
) -> None:
    # On these machines /dev/kvm opens but Linux hangs under it: the probe's
    # line never comes and every VM gets TCG. Where KVM works the probe says so.
    from swarm_testing.guest_image import PROBE_LINE, build_probe_image

    probe = build_probe_image()

    async def main() -> None:
        svc = service(
            tmp_path, lease_for(3600), accelerator="auto", probe_image=probe.path,
            probe_line=PROBE_LINE, probe_seconds=12.0,
        )  # fmt: skip
        await svc.start()
        try:
            a = await svc.start_vm(VmRequest(IMAGE))
            b = await svc.start_vm(VmRequest(IMAGE))
            chosen = svc.status()
            assert a.accelerator == b.accelerator == chosen.accelerator
            assert a.accelerator_why == chosen.accelerator_why
            why = chosen.accelerator_why or ""
            if a.accelerator == "tcg":
                assert why.startswith("software emulation: "), why
                # Linux hangs under KVM (no line), or qemu itself dies under it.
                assert f"no {PROBE_LINE!r} on its console" in why or (
                    "KVM unusable (qemu exited with status" in why
                ), why
            else:
                assert why.startswith("KVM: the probe guest booted"), why
            probes = [
                p for p in os.listdir("/proc") if p.isdigit() and _cwd(p).endswith(".kvm-probe")
            ]
            assert probes == []  # the probe was killed by its PID
        finally:
            await svc.stop()

    asyncio.run(main())


def _cwd(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


@pytest.mark.qemu
@pytest.mark.timeout(180)
def test_without_a_probe_guest_the_first_vm_tries_kvm_and_is_restarted_under_tcg(
    tmp_path: Path,
) -> None:
    from swarm_testing.guest_image import build_guest_image

    guest = build_guest_image()

    async def main() -> None:
        svc = VmService(
            VmSettings(accelerator="auto", probe_seconds=15.0, software=False),
            data_dir=tmp_path / "data",
            cores=CoreLedger(),
            lease_at=lease_for(3600),
            find_image=lambda image: ImageLookup(guest.path, "raw"),
        )
        await svc.start()
        try:
            work = b"#!/bin/sh\necho '200 ran' > $JOBOUTPUTS/shutdown_message\n"
            first = asyncio.create_task(svc.start_vm(VmRequest(IMAGE, user_data=work)))
            await asyncio.sleep(1.0)
            second = asyncio.create_task(svc.start_vm(VmRequest(IMAGE, user_data=work)))
            a, b = await asyncio.wait_for(asyncio.gather(first, second), 60)
            verdict = svc.accelerator.chosen
            assert verdict is not None and not verdict.provisional
            assert a.accelerator == b.accelerator == verdict.name
            assert b.accelerator_why == verdict.why  # the second waited for the verdict
            if verdict.name == "tcg":  # on these machines Linux hangs, or qemu dies, under KVM
                assert (
                    "no agent HELLO within 15 s under KVM" in verdict.why
                    or "KVM unusable" in verdict.why
                ), verdict.why
            for vm in (a, b):
                await asyncio.wait_for(svc.vms[vm.id].done.wait(), 90)
                done = svc.get(vm.id)
                assert (done.code, done.outcome) == (200, "ran"), done
        finally:
            await svc.stop()

    asyncio.run(main())
