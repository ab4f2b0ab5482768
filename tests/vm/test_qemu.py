"""qemu's command line (pure) and the process adapter against a real qemu
with a blank disk: no guest needed to show start, QMP, quit and kill."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vm.exceptions import QemuError
from vm.qemu import (
    FROM_GUEST_SOCKET,
    QMP_SOCKET,
    TO_GUEST_SOCKET,
    Accelerator,
    AcceleratorChoice,
    QemuProcess,
    QemuSpec,
    command_line,
    create_overlay,
)


def spec(tmp: Path, **kw: object) -> QemuSpec:
    args: dict[str, object] = {
        "qemu": "qemu-system-x86_64",
        "overlay": tmp / "disk.qcow2",
        "memory": 64 << 20,
        "cores": 1,
        "accelerator": "tcg",
    }
    args.update(kw)
    return QemuSpec(**args)  # type: ignore[arg-type]


def test_the_command_line_has_the_contracts_devices_and_nothing_else(tmp_path: Path) -> None:
    argv = command_line(spec(tmp_path, software=Path("/mnt/sw,x")))
    text = " ".join(argv)
    assert "-nic none" in text and "-display none" in text and "-nodefaults" in text
    assert f"file={tmp_path}/disk.qcow2,format=qcow2,if=virtio" in text
    assert "name=org.swarm.vac.host" in text and "name=org.swarm.vac.guest" in text
    assert f"path={TO_GUEST_SOCKET},server=on,wait=off" in text
    assert f"path={FROM_GUEST_SOCKET},server=on,wait=off" in text
    assert f"-qmp unix:{QMP_SOCKET},server=on,wait=off" in text
    assert "path=/mnt/sw,,x,security_model=none,readonly=on" in text  # commas doubled
    assert "mount_tag=swarm-software" in text
    assert "accel=tcg" in text and "-m 64M" in text
    assert "virtio-9p" not in " ".join(command_line(spec(tmp_path)))
    with pytest.raises(ValueError, match="kvm or tcg"):
        command_line(spec(tmp_path, accelerator="auto"))


def test_the_accelerator_is_chosen_once_and_falls_back_to_software_emulation() -> None:
    probes: list[float] = []

    async def failing_probe(deadline: float) -> str | None:
        probes.append(deadline)
        return "no line within 5 s"

    async def main() -> None:
        auto = AcceleratorChoice("auto", failing_probe, probe_seconds=5, kvm_problem=lambda: None)
        first, second = await auto.choose(), await auto.choose()
        assert first is second and first.name == "tcg" and "probe failed" in first.why
        assert probes == [5]  # once per daemon
        gone = AcceleratorChoice(
            "auto", failing_probe, probe_seconds=5, kvm_problem=lambda: "/dev/kvm: No such file"
        )
        assert "KVM unusable" in (await gone.choose()).why and probes == [5]
        trial = AcceleratorChoice("auto", None, probe_seconds=5, kvm_problem=lambda: None)
        on_trial = await trial.choose()
        assert on_trial.name == "kvm" and on_trial.provisional and trial.chosen is None
        trial.settle(Accelerator("tcg", "no HELLO"))
        assert (await trial.choose()).name == "tcg"

        async def good(deadline: float) -> str | None:
            return None

        ok = AcceleratorChoice("auto", good, probe_seconds=5, kvm_problem=lambda: None)
        assert (await ok.choose()).name == "kvm"
        assert (await AcceleratorChoice("tcg", good, probe_seconds=5).choose()).name == "tcg"

    asyncio.run(main())


@pytest.mark.qemu
def test_qemu_starts_answers_qmp_and_is_ended_by_quit_without_a_guest(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * (1 << 20))
    base.chmod(0o444)

    async def main() -> None:
        vm_dir = tmp_path / ("a-rather-long-directory-name-for-a-unix-socket" * 2)
        vm_dir.mkdir(parents=True)
        overlay = vm_dir / "disk.qcow2"
        await create_overlay("qemu-img", base, "raw", overlay, 10)
        assert len(str(vm_dir / QMP_SOCKET)) > 108  # too long to bind: reached through the fd
        q = await QemuProcess.start(command_line(spec(tmp_path, overlay=overlay)), vm_dir,
                                    deadline=20)  # fmt: skip
        try:
            status = await q.execute("query-status")
            assert status["status"] == "running"
            await q.powerdown()  # no OS to hear the button: qemu keeps running
            assert await q.wait(0.5) is None
            assert await q.end(grace=0.1) == 0  # quit
            assert not q.running
        finally:
            await q.kill()
            q.close()
        assert base.read_bytes() == b"\0" * (1 << 20)

    asyncio.run(main())


@pytest.mark.qemu
def test_a_qemu_that_cannot_start_is_a_one_line_error_with_its_reason(tmp_path: Path) -> None:
    async def main() -> None:
        vm_dir = tmp_path / "vm"
        vm_dir.mkdir()
        argv = command_line(spec(tmp_path, overlay=tmp_path / "missing.qcow2"))
        with pytest.raises(QemuError, match=r"qemu exited with status 1: .*missing\.qcow2"):
            await QemuProcess.start(argv, vm_dir, deadline=20)
        with pytest.raises(QemuError, match="cannot run"):
            await QemuProcess.start(["/nonexistent/qemu"], vm_dir, deadline=5)
        with pytest.raises(QemuError, match=r"overlay: .*nope\.img.*No such file"):
            await create_overlay("qemu-img", tmp_path / "nope.img", "raw", vm_dir / "o", 10)

    asyncio.run(main())
