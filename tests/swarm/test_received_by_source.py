"""Bytes received, split by source, by real node daemons (libtorrent) in network
namespaces: all from the origin's web seed when no peer exists, all from a
peer when the origin is down, each counted once, kept after the peer is gone,
and the same in ``swarm status`` and ``GET /metrics``."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm_testing.waiting import eventually
from tests.swarm.test_node_netns import POLL, Site, running_site

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(240)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path, 3) as s:
        yield s


def _all_held(st: dict[str, Any]) -> dict[str, Any] | None:
    """The status once the release and the image are both held whole."""
    ts = st.get("transfers", [])
    kinds = {t["what"].split()[0] for t in ts}
    done = {"revision", "image"} <= kinds and all(t["progress"] >= 1.0 for t in ts)
    return st if done else None


def _received_metrics(site: Site, i: int) -> dict[str, float]:
    r = site.net.hosts[i].run(
        ["curl", "-sf", "-m", "10", "http://127.0.0.1:7000/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return {
        s.labels["source"]: s.value
        for family in text_string_to_metric_families(r.stdout)
        if family.name == "swarm_received_bytes"
        for s in family.samples
        if s.name == "swarm_received_bytes_total"
    }


def test_bytes_from_the_web_seed_and_from_a_peer_are_told_apart_and_kept(site: Site) -> None:
    # Node 1 alone: every torrent byte comes from the origin's web seed.
    site.start_node(1, mount=False, policy="prefetch")
    st1 = eventually("node 1 holds everything", lambda: _all_held(site.status(1)), 90, POLL)
    whole = sum(t["total_wanted"] for t in st1["transfers"])
    assert st1["session"]["received_from_peers"] == 0
    assert st1["session"]["received_from_web_seeds"] == whole  # each block once
    assert _received_metrics(site, 1) == {"peer": 0, "web_seed": whole, "origin": 0}

    # The origin down, node 2 fetches everything from node 1.
    site.stop_origin()
    site.start_node(2, mount=False, policy="prefetch", bootstrap=(1,))
    st2 = eventually("node 2 holds everything", lambda: _all_held(site.status(2)), 90, POLL)
    assert sum(t["total_wanted"] for t in st2["transfers"]) == whole
    assert st2["session"]["received_from_peers"] == whole
    assert st2["session"]["received_from_web_seeds"] == 0
    assert st2["repositories"]["sw.example.org"]["objects_from_origin"] == 0

    # The peer goes away: what it delivered stays counted.
    site.kill_node(1, signal.SIGTERM)
    eventually(
        "node 2 to lose its peer",
        lambda: all(t["num_peers"] == 0 for t in site.status(2)["transfers"]),
        30,
        POLL,
    )
    assert site.status(2)["session"]["received_from_peers"] == whole
    assert _received_metrics(site, 2) == {"peer": whole, "web_seed": 0, "origin": 0}
