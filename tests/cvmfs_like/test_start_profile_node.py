"""Start profiles in the node daemon (on the simulated swarm of
tests/fake_swarm.py, reads through the node's namespace as its mount serves
them): recorded by one node, and prefetched through the swarm by another
node given the profile file, before any read."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_like.start_profile import ProfileStatus
from swarm.status import NodeStatus, render, to_json
from swarm_testing.waiting import eventually_async
from tests.swarm.test_node import REPO, Site, read_file, running

FILES = [
    "bin/hello",
    "lib/data.bin",
    "VERSION",
    "/".join(f"d{i}" for i in range(40)) + "/bottom.txt",
]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def _profiles(site: Site, node: int) -> Path:
    return site.tmp / f"node{node}" / "repos" / REPO / "cache" / "profiles"


def test_a_node_records_a_start_profile_another_node_given_it_prefetches_before_any_read(
    site: Site,
) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            for rel in FILES:
                await asyncio.to_thread(read_file, a.namespace, f"{REPO}/{rel}")
            st = a.repo_status(REPO)
            assert st.start_profile == ProfileStatus("recording", recorded=len(FILES))
            catalog = st.catalog
        written = _profiles(site, 0) / f"{catalog}.json"
        assert written.exists()  # at the node's stop
        _profiles(site, 1).mkdir(parents=True)
        shutil.copy(written, _profiles(site, 1))  # profiles mean the same on any node

        async with running(site.node(1)) as b:
            cache = b.repos[REPO].cache

            async def prefetched() -> bool:
                p = b.repo_status(REPO).start_profile
                return p is not None and p.state == "done"

            await eventually_async("the prefetch", prefetched, 60)
            st = b.repo_status(REPO)
            assert st.start_profile == ProfileStatus("done", listed=4, fetched=4)
            assert st.objects_from_swarm >= 4  # through the node's source: swarm first
            misses = cache.stats()["misses"]
            for rel in FILES:
                got = await asyncio.to_thread(read_file, b.namespace, f"{REPO}/{rel}")
                assert got == (site.src / rel).read_bytes()
            assert cache.stats()["misses"] == misses  # every read was a hit
            shown = NodeStatus.from_json(to_json(b.status()))
            assert shown.repositories[REPO].start_profile == st.start_profile
            assert any("start profile: done, 4 fetched" in line for line in render(shown))

    asyncio.run(main())
