"""Fixtures for runner tests that confine jobs (job user, memory cgroups)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.memory_cgroup import find_memory_hierarchy, remove_cgroup, sweep_stale_cgroups


def _missing(why: str) -> None:
    """Skip, or fail when every capability is required (as in CI)."""
    if os.environ.get("SWARM_REQUIRE_ALL") == "1":
        pytest.fail(f"required (SWARM_REQUIRE_ALL=1): {why}")
    pytest.skip(why)


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root (tasks switch to the job user)")


def _hierarchy() -> tuple[int, Path] | None:
    def controllers(mp: Path) -> str:
        try:
            return (mp / "cgroup.controllers").read_text()
        except OSError:
            return ""

    with open("/proc/self/mounts") as f:
        h = find_memory_hierarchy(f.read(), controllers)
    return None if h is None else (h.version, h.mountpoint)


@pytest.fixture
def cgroup_parent(as_root: None) -> Iterator[tuple[str, Path]]:
    """A parent cgroup name private to this test; removed afterwards."""
    h = _hierarchy()
    if h is None:
        _missing("no cgroup hierarchy with the memory controller")
    assert h is not None
    version, mountpoint = h
    name = f"swarm-test-{os.getpid()}"
    base = mountpoint / name
    try:
        yield name, base
    finally:
        if base.exists():
            # Children of a live gather are not stale; by now none should exist.
            sweep_stale_cgroups(base, version)
            leftovers = [p for p in base.iterdir() if p.is_dir()]
            for p in leftovers:
                remove_cgroup(p, version)
            base.rmdir()
            assert not leftovers, f"job cgroups left behind: {leftovers}"
