"""The test VM image: one raw, BIOS-bootable file built from Debian packages only.

What the image is: a FAT file system written straight at sector 0 (a "superfloppy":
no partition table) holding syslinux, a Debian kernel (``vmlinuz``) and a gzip'd
newc initramfs (``initrd.gz``). The initramfs is the guest's root: busybox-static,
the few kernel modules the guest needs (with their dependencies, from the modules'
own ``depends=``), the Vacuum-contract agent (``vm/guest/agent.sh``) and an ``/init``
that loads the modules and runs the agent. An optional *pad* of incompressible
bytes is appended after the file system: the "large unused part" the guest never
reads (the benchmark's bytes-fetched-before-first-heartbeat / image-size figure).

Where the parts come from: the kernel is the ``linux-image-<abi>-amd64`` package
the ``linux-image-amd64`` metapackage points at, fetched with ``apt-get download``
into the cache (a Debian package, never a prebuilt VM image) and unpacked with
``dpkg-deb -x``; busybox, syslinux and mtools are the host's installed Debian
packages (``make test`` installs them, see the Makefile's VM_PACKAGES).

Invariants:
- A build is keyed by its inputs (kernel package, busybox/syslinux versions, the
  agent, this module's source, the options); a finished build lives in
  ``<cache>/<key>/`` and is never rebuilt nor modified. It is made in a temporary
  directory beside it and renamed into place, so a reader never sees half a build
  and two concurrent builders both end with one complete directory.
- No loop mounts, no root needed: mtools writes the FAT image, syslinux installs
  its boot sector through mtools, the cpio archive is written here.
- Every command run has a deadline; a failure raises :class:`GuestImageError`
  naming the step and the command's last words.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

# The guest modules (names as in modules.dep, without .ko): virtio transport and the
# two virtio-serial ports, the disk (for a payload that writes to its overlay), 9p for
# the node's software mount, and the ACPI power button with evdev so busybox acpid
# sees it. Dependencies are added from each module's ``depends=``.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "button",
    "evdev",
)

KERNEL_METAPACKAGE = "linux-image-amd64"
DEFAULT_CACHE = Path(os.environ.get("SWARM_GUEST_CACHE", "/var/tmp/swarm-guest-cache"))
SECTOR = 512
FAT_SLACK = 2 * 1024 * 1024  # free room in the FAT image beyond its files (syslinux, dirs)
AGENT_PATH = Path(__file__).resolve().parent.parent / "vm" / "guest" / "agent.sh"
GUEST_AGENT = "/usr/lib/swarm/vac-agent"  # where the initramfs holds the agent

INIT = """\
#!/bin/busybox sh
# swarm-grid test guest: PID 1 of the initramfs. Installs busybox's applets, mounts
# the kernel's file systems, loads the modules (listed in dependency order by the
# image builder), runs the Vacuum agent, and powers off when the agent returns
# (PID 1 must never exit: the kernel would panic).
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r module; do
    insmod "/lib/modules/$(uname -r)/$module" || echo "init: insmod $module failed"
done < /etc/swarm-modules
echo "init: swarm test guest up after $(cut -d' ' -f1 /proc/uptime) s"
VAC_POWEROFF=force {GUEST_AGENT}
echo "init: agent returned $?, powering off"
sync
poweroff -f
""".replace("{GUEST_AGENT}", GUEST_AGENT)

PROBE_LINE = "swarm-probe: linux ok"
PROBE_INIT = f"""\
#!/bin/busybox sh
# swarm-grid accelerator probe: PID 1 of a Linux guest. Reaching this line at all is
# the answer; then power off so qemu exits by itself.
echo "{PROBE_LINE}"
/bin/busybox poweroff -f
"""

SYSLINUX_CFG = """\
DEFAULT swarm
PROMPT 0
TIMEOUT 0
LABEL swarm
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND {cmdline}
"""


class GuestImageError(Exception):
    """The guest image (or the probe image) could not be built; the text names the step."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A finished build: ``path`` is the raw bootable image (``size`` bytes), of which
    the first ``boot_bytes`` are the FAT file system and the rest ``pad_bytes`` of
    incompressible filler the guest never reads."""

    path: Path
    key: str
    kernel_version: str
    kernel_package: str
    size: int
    boot_bytes: int
    pad_bytes: int
    cmdline: str


# --- pure cores -------------------------------------------------------------------


def modinfo_depends(ko: bytes) -> list[str]:
    """The module names a kernel module's ``.modinfo`` says it depends on (its
    ``depends=`` string, comma-separated; empty for none)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if m is None or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def module_name(path: str | Path) -> str:
    """A module's name from its file name: ``kernel/fs/9p/9p.ko`` -> ``9p``
    (``-`` and ``_`` are the same to the kernel; names here use ``_``)."""
    name = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def load_order(wanted: Iterable[str], depends: dict[str, list[str]]) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies.

    Raises:
        GuestImageError: a module (wanted or depended on) is not in ``depends``,
            or the dependencies form a cycle.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise GuestImageError(f"kernel module {name!r} not found in the kernel package{via}")
        state[name] = "visiting"
        for dep in depends[name]:
            visit(dep.replace("-", "_"), (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def modules_dep(order: Sequence[str], paths: dict[str, str], depends: dict[str, list[str]]) -> str:
    """A ``modules.dep`` for the modules of ``order`` (paths relative to
    ``/lib/modules/<version>``), so ``modprobe`` works in the guest too."""
    lines = []
    for name in order:
        deps = load_order([name], depends)[:-1]  # its closure, dependencies first
        lines.append(f"{paths[name]}: " + " ".join(paths[d] for d in reversed(deps)))
    return "\n".join(line.rstrip() for line in lines) + "\n"


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a directory, regular file, symlink or char device."""

    path: str  # without a leading "/"
    mode: int  # st_mode, file type bits included
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """The entries as an uncompressed ``newc`` cpio archive (what the kernel unpacks
    as an initramfs), owned by root, mtime 0, so equal entries give equal bytes."""
    out = io.BytesIO()

    def member(ino: int, path: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        name = path.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.write(b"\x00" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\x00" * (-out.tell() % 4))

    for ino, e in enumerate(entries, start=1):
        member(ino, e.path.lstrip("/"), e.mode, e.data, e.rdev)
    member(0, "TRAILER!!!", 0, b"", (0, 0))
    out.write(b"\x00" * (-out.tell() % SECTOR))
    return out.getvalue()


def kernel_cmdline(console: str | None, extra: str = "") -> str:
    """The kernel command line: the console (``ttyS0``: the serial log, for humans and
    the probe), ``panic=-1`` (a panicking guest reboots at once; the host's
    ``-no-reboot`` turns that into an exit instead of a hang)."""
    parts = [f"console={console}"] if console else []
    parts.append("panic=-1")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def pad_stream(seed: str, size: int, chunk: int = 1 << 20) -> Iterable[bytes]:
    """``size`` incompressible bytes, the same for the same seed."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


# --- the build --------------------------------------------------------------------


def _run(
    what: str, argv: Sequence[str | os.PathLike[str]], timeout: float, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    """Run one build command with a deadline; any failure is a GuestImageError naming
    ``what`` and the command."""
    cmd = " ".join(str(a) for a in argv)
    try:
        r = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[call-overload]
        )
    except FileNotFoundError as exc:
        raise GuestImageError(
            f"{what}: {argv[0]} is not installed (make test installs it)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestImageError(f"{what}: `{cmd}` did not finish within {timeout:g} s") from exc
    if r.returncode != 0:
        tail = (r.stderr or r.stdout or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise GuestImageError(f"{what}: `{cmd}` exited {r.returncode}: {' / '.join(tail)}")
    return r  # type: ignore[no-any-return]


def _package_version(package: str, timeout: float) -> str:
    r = _run(f"version of {package}", ["dpkg-query", "-W", "-f=${Version}", package], timeout)
    return r.stdout.decode().strip()


def _kernel_package(timeout: float) -> str:
    """The kernel package the metapackage points at now (``linux-image-6.1.0-N-amd64``)."""
    r = _run("resolve the kernel package", ["apt-cache", "depends", KERNEL_METAPACKAGE], timeout)
    for line in r.stdout.decode().splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestImageError(f"resolve the kernel package: {KERNEL_METAPACKAGE} names no linux-image")


def _kernel_deb(cache: Path, timeout: float) -> Path:
    """The kernel package file in ``cache/debs``, downloaded once with ``apt-get
    download`` (into a private directory, then renamed: concurrent builders are safe).
    Offline, the newest cached kernel package is used."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        package = _kernel_package(timeout)
    except GuestImageError:
        cached = sorted(debs.glob("linux-image-*-amd64_*.deb"))
        if cached:
            return cached[-1]
        raise
    have = sorted(debs.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user writes here when it can
        _run(f"download {package}", ["apt-get", "download", package], timeout, cwd=tmp)
        got = list(Path(tmp).glob(f"{package}_*.deb"))
        if len(got) != 1:
            raise GuestImageError(f"download {package}: apt-get download left {got}")
        final = debs / got[0].name
        os.replace(got[0], final)
    return final


def _inputs(cache: Path, kind: str, pad_bytes: int, cmdline: str, timeout: float) -> dict[str, str]:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise GuestImageError("busybox-static is not installed (/bin/busybox missing)")
    return {
        "kind": kind,
        "kernel_deb": _kernel_deb(cache, timeout).name,
        "busybox": hashlib.sha256(busybox.read_bytes()).hexdigest(),
        "syslinux": _package_version("syslinux", timeout)
        + "/"
        + _package_version("syslinux-common", timeout),
        "agent": hashlib.sha256(AGENT_PATH.read_bytes()).hexdigest(),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "pad_bytes": str(pad_bytes),
        "cmdline": cmdline,
    }


def build_guest_image(
    *,
    pad_bytes: int = 0,
    console: str | None = "ttyS0",
    extra_cmdline: str = "",
    cache: Path | None = None,
    timeout: float = 300.0,
) -> GuestImage:
    """The test guest image (the agent in an initramfs), built once per set of inputs
    and cached.

    ``pad_bytes`` of incompressible filler are appended after the boot file system
    (rounded up to whole 512-byte sectors). ``console`` is the kernel console
    (``ttyS0``, or None for none). ``timeout`` bounds each command the build runs.

    Raises:
        GuestImageError: a tool is missing, the kernel package cannot be resolved or
            downloaded, or a build step failed (the text names it).
    """
    if pad_bytes < 0:
        raise GuestImageError(f"pad_bytes must be >= 0, not {pad_bytes}")
    pad_bytes = -(-pad_bytes // SECTOR) * SECTOR
    return _cached_build("guest", pad_bytes, kernel_cmdline(console, extra_cmdline), cache, timeout)


def build_probe_image(*, cache: Path | None = None, timeout: float = 300.0) -> GuestImage:
    """The accelerator probe guest: the same kernel and boot loader as the test image,
    and an init that only writes :data:`PROBE_LINE` on ttyS0 and powers off. A Linux
    boot, because on these machines KVM runs a tiny non-Linux guest (real, protected
    and long mode, port I/O) while a Linux boot fails under it: only a Linux guest
    tells whether Linux guests work (docs/VMS.md, "The accelerator probe").

    Raises:
        GuestImageError: as :func:`build_guest_image`.
    """
    return _cached_build("probe", 0, kernel_cmdline("ttyS0"), cache, timeout)


def _cached_build(
    kind: str, pad_bytes: int, cmdline: str, cache: Path | None, timeout: float
) -> GuestImage:
    cache = cache if cache is not None else DEFAULT_CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
        inputs = _inputs(cache, kind, pad_bytes, cmdline, timeout)
    except OSError as exc:
        raise GuestImageError(f"cache {cache}: {exc}") from exc
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    final = cache / key
    if not (final / "manifest.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{key}-"))
        try:
            deb = cache / "debs" / inputs["kernel_deb"]
            _build(tmp, deb, kind, pad_bytes, cmdline, key, timeout)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.json").exists():
                    raise  # not a concurrent builder's finished copy: a real failure
        except OSError as exc:
            raise GuestImageError(f"build in {tmp}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((final / "manifest.json").read_text())
    return GuestImage(
        path=final / "guest.img",
        key=key,
        kernel_version=manifest["kernel_version"],
        kernel_package=manifest["kernel_package"],
        size=manifest["size"],
        boot_bytes=manifest["boot_bytes"],
        pad_bytes=manifest["pad_bytes"],
        cmdline=manifest["cmdline"],
    )


def _build(
    out: Path, deb: Path, kind: str, pad_bytes: int, cmdline: str, key: str, timeout: float
) -> None:
    work = out / "work"
    root = work / "kernel"
    root.mkdir(parents=True)
    _run("unpack the kernel package", ["dpkg-deb", "-x", deb, root], timeout)
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestImageError(f"unpack the kernel package: {deb.name} has {vmlinuz} as vmlinuz")
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    initrd = gzip.compress(newc_archive(_initramfs(root / "lib/modules" / version, kind)), mtime=0)

    files = {
        "vmlinuz": vmlinuz[0].read_bytes(),
        "initrd.gz": initrd,
        "syslinux.cfg": SYSLINUX_CFG.format(cmdline=cmdline).encode(),
    }
    for name, data in files.items():
        (work / name).write_bytes(data)
    fat = work / "boot.fat"
    kib = (sum(len(d) for d in files.values()) + FAT_SLACK) // 1024
    _run(
        "make the FAT file system",
        ["mkfs.fat", "-C", "-n", "SWARMVAC", "-i", key[:8], fat, str(kib)],
        timeout,
    )
    _run("copy the boot files", ["mcopy", "-i", fat, *(work / n for n in files), "::/"], timeout)
    _run("install syslinux", ["syslinux", "--install", fat], timeout)

    image = out / "guest.img"
    with fat.open("rb") as src, image.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        boot_bytes = dst.tell()
        for chunk in pad_stream(key, pad_bytes):
            dst.write(chunk)
        size = dst.tell()
    image.chmod(0o444)
    shutil.rmtree(work)
    manifest = {
        "kernel_version": version,
        "kernel_package": deb.name,
        "size": size,
        "boot_bytes": boot_bytes,
        "pad_bytes": pad_bytes,
        "cmdline": cmdline,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _initramfs(moddir: Path, kind: str) -> list[CpioEntry]:
    """The initramfs members: directories, /dev/console, busybox, the modules and their
    modules.dep, the load order, /init and the agent (for the probe: only /init,
    /dev/console and busybox)."""
    d, f, x = 0o040755, 0o100644, 0o100755
    base = [
        CpioEntry("dev", d),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("bin", d),
        CpioEntry("bin/busybox", x, Path("/bin/busybox").read_bytes()),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry("proc", d),
    ]
    if kind == "probe":
        return [*base, CpioEntry("init", x, PROBE_INIT.encode())]
    paths: dict[str, str] = {}
    for ko in (moddir / "kernel").rglob("*.ko*"):
        paths.setdefault(module_name(ko), str(ko.relative_to(moddir)))
    # Read only the modules reached from GUEST_MODULES (reading all ~4000 is slow).
    depends: dict[str, list[str]] = {}
    todo = list(GUEST_MODULES)
    while todo:
        name = todo.pop()
        if name in depends or name not in paths:
            continue
        depends[name] = [
            d.replace("-", "_") for d in modinfo_depends((moddir / paths[name]).read_bytes())
        ]
        todo.extend(depends[name])
    order = load_order(GUEST_MODULES, depends)

    version = moddir.name
    dirs = "sbin usr usr/bin usr/sbin usr/lib usr/lib/swarm sys run tmp etc lib lib/modules swarm"
    entries = base + [CpioEntry(p, d) for p in dirs.split()]
    made = {"lib/modules"}
    for name in order:
        rel = Path(f"lib/modules/{version}") / paths[name]
        for parent in reversed(rel.parents):
            if str(parent) not in made and str(parent) != ".":
                made.add(str(parent))
                entries.append(CpioEntry(str(parent), d))
        entries.append(CpioEntry(str(rel), f, (moddir / paths[name]).read_bytes()))
    dep = modules_dep(order, paths, depends).encode()
    entries.append(CpioEntry(f"lib/modules/{version}/modules.dep", f, dep))
    entries.append(
        CpioEntry("etc/swarm-modules", f, "".join(f"{paths[n]}\n" for n in order).encode())
    )
    entries.append(CpioEntry("init", x, INIT.encode()))
    entries.append(CpioEntry(GUEST_AGENT.lstrip("/"), x, AGENT_PATH.read_bytes()))
    return entries


def main(argv: list[str] | None = None) -> int:
    """``python -m swarm_testing.guest_image``: build (or find cached) the test guest
    image and print its path (``make demo`` boots it)."""

    ap = argparse.ArgumentParser(prog="python -m swarm_testing.guest_image")
    ap.add_argument("--pad-bytes", type=int, default=0, help="incompressible bytes appended")
    args = ap.parse_args(argv)
    try:
        image = build_guest_image(pad_bytes=args.pad_bytes)
    except GuestImageError as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 1
    print(image.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
