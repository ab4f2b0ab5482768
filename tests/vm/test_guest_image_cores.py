"""The pure cores of the guest image builder: module dependencies and the initramfs
archive (checked by unpacking it with busybox's cpio, the format's other reader)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from swarm_testing.guest_image import (
    CpioEntry,
    GuestImageError,
    kernel_cmdline,
    load_order,
    modinfo_depends,
    module_name,
    modules_dep,
    newc_archive,
    pad_stream,
)


def test_modinfo_depends_reads_the_depends_string() -> None:
    ko = b"\x7fELF...\x00license=GPL\x00depends=virtio,virtio_ring\x00vermagic=6.1\x00"
    assert modinfo_depends(ko) == ["virtio", "virtio_ring"]
    assert modinfo_depends(b"\x00depends=\x00name=x\x00") == []
    assert modinfo_depends(b"no modinfo at all") == []


def test_module_name_normalises_dashes_and_suffixes() -> None:
    assert module_name("kernel/fs/9p/9p.ko") == "9p"
    assert module_name("kernel/drivers/x/virtio-pci.ko.xz") == "virtio_pci"


def test_load_order_puts_dependencies_first_once() -> None:
    depends = {"9p": ["9pnet", "netfs"], "9pnet_virtio": ["virtio", "9pnet"], "9pnet": [],
               "netfs": [], "virtio": []}  # fmt: skip
    order = load_order(["9pnet_virtio", "9p"], depends)
    assert order == ["virtio", "9pnet", "9pnet_virtio", "netfs", "9p"]


def test_load_order_names_a_missing_module_and_who_needs_it() -> None:
    with pytest.raises(GuestImageError, match=r"'virtio_ring' not found .*needed by virtio"):
        load_order(["virtio"], {"virtio": ["virtio_ring"]})


def test_load_order_refuses_a_cycle() -> None:
    with pytest.raises(GuestImageError, match="cycle: a -> b -> a"):
        load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_modules_dep_lists_each_closure() -> None:
    paths = {"a": "kernel/a.ko", "b": "kernel/b.ko", "c": "kernel/c.ko"}
    depends = {"a": ["b"], "b": ["c"], "c": []}
    assert modules_dep(["c", "b", "a"], paths, depends) == (
        "kernel/c.ko:\nkernel/b.ko: kernel/c.ko\nkernel/a.ko: kernel/b.ko kernel/c.ko\n"
    )


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed")
def test_newc_archive_unpacks_with_busybox_cpio(tmp_path: Path) -> None:
    archive = newc_archive(
        [
            CpioEntry("bin", 0o040755),
            CpioEntry("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
            CpioEntry("bin/link", 0o120777, b"tool"),
            CpioEntry("odd", 0o100644, b"x" * 5),
        ]
    )
    assert len(archive) % 512 == 0
    assert archive == newc_archive(
        [CpioEntry("bin", 0o040755), CpioEntry("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
         CpioEntry("bin/link", 0o120777, b"tool"), CpioEntry("odd", 0o100644, b"x" * 5)]
    )  # fmt: skip
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive, cwd=tmp_path, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/link").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_kernel_cmdline_has_the_console_and_panic_exit() -> None:
    assert kernel_cmdline("ttyS0") == "console=ttyS0 panic=-1"
    assert kernel_cmdline(None, "quiet") == "panic=-1 quiet"


def test_pad_is_repeatable_per_seed_and_exact_in_size() -> None:
    a = b"".join(pad_stream("k", 3 * 1024 * 1024 + 7))
    assert len(a) == 3 * 1024 * 1024 + 7
    assert a == b"".join(pad_stream("k", 3 * 1024 * 1024 + 7))
    assert a[:4096] != b"".join(pad_stream("other", 4096))
