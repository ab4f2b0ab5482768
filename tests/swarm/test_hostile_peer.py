"""Issue 8, defects 2 and 9: a hostile peer among the sources of a node's
metadata and torrents can withhold or delay, never freeze, forge or stall.

The hostile peer is a real HTTP server (tests/hostile_http.py) on the peer
exchange port of its own loopback address, named among the node's bootstrap
peers; the honest origin is the project's own origin server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from swarm.exceptions import FetchTimeout
from swarm.exchange import ExchangeFetcher
from swarm.repository import RepositorySpec, open_trusted
from tests.hostile_http import Answer, HostileServer
from tests.mock_transport import MockTransport
from tests.swarm.test_node import REPO, Site, running
from trust.client import Freshness, TrustedRepository
from trust.exceptions import MetadataFormatError, SignatureError, VerificationError

HOSTILE = 7  # bootstrap index: the hostile peer listens on 127.0.0.9


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def _hostile_url(site: Site) -> str:
    return f"http://127.0.0.9:{site.peer_port}/"


def _forged_timestamp(site: Site, version: int) -> bytes:
    """The origin's timestamp with a huge version and the old signatures,
    which no longer verify: what a forging peer can make without the key."""
    doc = json.loads((site.tmp / "store" / REPO / "metadata" / "timestamp.json").read_bytes())
    doc["signed"]["version"] = version
    return json.dumps(doc).encode()


def _peer_path(name: str) -> str:
    return f"/v1/peer/repos/{REPO}/metadata/{name}"


def test_a_forged_timestamp_with_a_huge_version_does_not_freeze_updates(site: Site) -> None:
    forged = Answer(_forged_timestamp(site, 999_999_999))
    with HostileServer({_peer_path("timestamp.json"): forged}, "127.0.0.9", site.peer_port) as liar:

        async def main() -> None:
            # A node that starts with the forger among its bootstrap peers
            # shows the repository (it used to never show it) ...
            async with running(site.node(0, bootstrap=(HOSTILE,))) as a:
                assert liar.requests, "the forging peer was never asked"
                st = a.repo_status(REPO)
                assert st.revision == 1, st.last_error
                # ... and still follows the origin's newer revisions.
                (site.src / "NEW").write_bytes(b"revision two\n")
                site.publish()
                st = await a.refresh(REPO)
                assert st.revision == 2, st.last_error
                assert st.last_error is None
                assert st.metadata_from["timestamp.json"].startswith(site.origin.url)
                problems = st.source_problems[_hostile_url(site)]
                assert problems.bad_data >= 2
                assert "timestamp.json" in (problems.problem or "")

        asyncio.run(main())


def test_a_forging_peer_is_asked_last_for_versioned_metadata(site: Site) -> None:
    """With the origin down, the forger is the first peer for N.snapshot.json
    (it serves the honest timestamp, so nothing scored it down yet): its
    snapshot is screened out and the honest peer's taken instead."""
    garbage = Answer(b'{"signed": {"_type": "snapshot", "version": 2}, "signatures": []}')
    answers = {_peer_path("2.snapshot.json"): garbage}
    with HostileServer(answers, "127.0.0.9", site.peer_port):

        async def main() -> None:
            async with running(site.node(0)) as honest:
                (site.src / "NEW").write_bytes(b"revision two\n")
                site.publish()
                assert (await honest.refresh(REPO)).revision == 2
                timestamp = site.tmp / "store" / REPO / "metadata" / "timestamp.json"
                answers[_peer_path("timestamp.json")] = Answer(timestamp.read_bytes())
                site.origin.stop()
                async with running(site.node(1, bootstrap=(HOSTILE, 0))) as b:
                    st = b.repo_status(REPO)
                    assert st.revision == 2, st.last_error
                    assert "127.0.0.2" in st.metadata_from["2.snapshot.json"]
                    problem = st.source_problems[_hostile_url(site)]
                    assert "2.snapshot.json" in (problem.problem or "")

        asyncio.run(main())


def test_a_trickling_peer_does_not_stall_the_refresh(site: Site) -> None:
    """A peer that sends its timestamp a byte at a time: the refresh goes on
    with the others, and POST .../refresh answers (it used to hang)."""
    slow = Answer(_forged_timestamp(site, 3), trickle_body=True, interval=0.3)
    with HostileServer({_peer_path("timestamp.json"): slow}, "127.0.0.9", site.peer_port):

        async def main() -> None:
            async with running(site.node(0, bootstrap=(HOSTILE,), fetch_timeout=1)) as a:
                assert a.repo_status(REPO).revision == 1
                (site.src / "NEW").write_bytes(b"revision two\n")
                site.publish()
                url = f"http://127.0.0.2:{a.api_port}/v1/repositories/{REPO}/refresh"
                auth = {"Authorization": f"Bearer {a._token}"}
                # the bound is the test's, far above the node's 1 s deadline
                async with (
                    aiohttp.ClientSession() as http,
                    asyncio.timeout(30),
                    http.post(url, headers=auth) as r,
                ):
                    st = await r.json()
                assert r.status == 200 and st["revision"] == 2, st["last_error"]
                problem = st["source_problems"][_hostile_url(site)]
                assert "within" in problem["problem"]  # left behind at its deadline

        asyncio.run(main())


def test_a_bad_torrent_is_checked_before_parsing_and_the_next_source_tried() -> None:
    torrent = b"d4:infod6:lengthi1eee"  # any bytes: the hash decides
    sha = hashlib.sha256(torrent).hexdigest()
    origin, peer = "http://origin.test/", "http://peer.test:6880/"
    transport = MockTransport(
        {
            f"{origin}{REPO}/data/{sha[:2]}/{sha}": b"x" * len(torrent),  # the liar
            f"{peer}v1/peer/repos/{REPO}/torrents/{sha}": torrent,
        }
    )
    fetcher = ExchangeFetcher(REPO, origin, lambda: [peer], timeout=2, transport=transport)
    data, src = fetcher.fetch_torrent(sha, len(torrent))
    assert data == torrent and src.startswith(peer)
    report = fetcher.scores.report()[origin]
    assert report.bad_data == 1 and "torrent" in str(report.problem)
    # the liar is asked last from now on
    fetcher.fetch_torrent(sha, len(torrent))
    assert sum(u.startswith(origin) for u in transport.requests) == 1


def test_the_highest_screened_timestamp_wins_and_a_forger_is_scored_down(site: Site) -> None:
    meta = site.tmp / "store" / REPO / "metadata"
    honest = (meta / "timestamp.json").read_bytes()
    origin, liar, slow = "http://origin.test/", "http://liar.test/", "http://slow.test/"
    transport = MockTransport(
        {
            **{f"{origin}{REPO}/metadata/{f.name}": f.read_bytes() for f in meta.glob("*.json")},
            f"{liar}v1/peer/repos/{REPO}/metadata/timestamp.json": _forged_timestamp(site, 99),
            f"{slow}v1/peer/repos/{REPO}/metadata/timestamp.json": FetchTimeout("silent"),
        }
    )
    trusted, fetcher = open_trusted(
        RepositorySpec(REPO, origin, site.root_json.read_bytes(), site.tmp / "meta", 2),
        peers=lambda: [liar, slow],
        transport=transport,
    )
    assert fetcher.fetch_metadata("timestamp.json") == honest
    assert fetcher.last_source["timestamp.json"].startswith(origin)
    report = fetcher.scores.report()
    assert report[liar].bad_data == 1 and report[slow].bad_data == 0
    # the whole refresh goes through the same transport
    assert trusted.refresh_or_cached().freshness is Freshness.REFRESHED
    assert trusted.targets_version >= 1


def test_metadata_errors_name_the_file_that_failed(site: Site, tmp_path: Path) -> None:
    bad = Answer(b"this is not json")
    with HostileServer({f"/{REPO}/metadata/timestamp.json": bad}) as broken:
        trusted = TrustedRepository(
            tmp_path / "meta",
            f"{broken.url}{REPO}/metadata/",
            trusted_root=site.root_json.read_bytes(),
        )
        with pytest.raises(MetadataFormatError, match=r"timestamp\.json"):
            trusted.refresh()


def test_screen_accepts_only_metadata_the_trusted_root_signed(site: Site, tmp_path: Path) -> None:
    trusted = TrustedRepository(
        tmp_path / "meta",
        f"{site.origin.url}{REPO}/metadata/",
        trusted_root=site.root_json.read_bytes(),
    )
    meta = site.tmp / "store" / REPO / "metadata"
    honest = (meta / "timestamp.json").read_bytes()
    assert trusted.screen("timestamp.json", honest) == json.loads(honest)["signed"]["version"]
    with pytest.raises(SignatureError, match=r"timestamp\.json"):
        trusted.screen("timestamp.json", _forged_timestamp(site, 999_999_999))
    with pytest.raises(MetadataFormatError):  # a snapshot offered as the timestamp
        trusted.screen("timestamp.json", next(meta.glob("*.snapshot.json")).read_bytes())
    with pytest.raises(MetadataFormatError, match="version"):
        trusted.screen("7.snapshot.json", next(meta.glob("1.snapshot.json")).read_bytes())


def test_metadata_that_every_source_forged_is_refused_not_called_unreachable(
    site: Site, tmp_path: Path
) -> None:
    forged = Answer(_forged_timestamp(site, 999_999_999))
    with HostileServer({f"/{REPO}/metadata/timestamp.json": forged}) as liar:
        trusted, _ = open_trusted(
            RepositorySpec(REPO, liar.url, site.root_json.read_bytes(), tmp_path / "meta", 2)
        )
        with pytest.raises(VerificationError, match="every source sent bad data"):
            trusted.refresh()
