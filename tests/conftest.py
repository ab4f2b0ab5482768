"""Capability markers: a test marked ``fuse``, ``netns``, ``nginx``, ``nats``,
``systemd_analyze``, ``slurm``, ``chromium`` or ``qemu``
is skipped when the machine lacks the capability, and fails instead when
``SWARM_REQUIRE_ALL=1`` (as in CI), so a missing capability can never pass
silently."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _fuse_missing() -> str | None:
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is absent"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    return None


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _nginx_missing() -> str | None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (apt-get install nginx-light)"
    return None


def _systemd_analyze_missing() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (apt-get install systemd)"
    return None


def _nats_missing() -> str | None:
    from sitejob.exceptions import BrokerError
    from sitejob.natsd import find_nats_server

    try:
        find_nats_server()
    except BrokerError as exc:
        return str(exc)
    return None


def _slurm_missing() -> str | None:
    from swarm_testing.slurm import missing

    return missing()


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _chromium_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def _qemu_missing() -> str | None:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "qemu.qmp is not installed (pip install -e '.[dev]')"
    return None


_CAPABILITIES = {
    "fuse": _fuse_missing,
    "netns": _netns_missing,
    "nginx": _nginx_missing,
    "nats": _nats_missing,
    "systemd_analyze": _systemd_analyze_missing,
    "slurm": _slurm_missing,
    "chromium": _chromium_missing,
    "qemu": _qemu_missing,
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, probe in _CAPABILITIES.items():
        if item.get_closest_marker(name) is None:
            continue
        why = probe()
        if why is None:
            continue
        if os.environ.get("SWARM_REQUIRE_ALL") == "1":
            pytest.fail(f"capability {name!r} required (SWARM_REQUIRE_ALL=1): {why}")
        pytest.skip(f"no {name}: {why}")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is mode 0700; a root
    node's job user works below it)."""
    d = Path(tempfile.mkdtemp(prefix="swarm-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
