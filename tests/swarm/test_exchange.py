"""The peer exchange's fetcher (swarm/exchange.py) on its own: which answer
it keeps, which error it raises, whom it asks first.

Sources are real HTTP servers on 127.0.0.1 (tests/hostile_http.py) serving
real TUF metadata from a published repository; the screen is the real one,
``TrustedRepository.screen``, as the node wires it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exceptions

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.exchange import ExchangeFetcher
from swarm.repository import RepositorySpec, open_trusted
from tests.hostile_http import Answer, HostileServer
from trust.client import TrustedRepository
from trust.keys import init_keys

REPO = "sw.example.org"


@dataclass
class Repository:
    """Two published revisions of one repository, and a node's trust in it."""

    metadata: Path  # the origin store's metadata directory (revision 2 now)
    timestamp_1: bytes
    timestamp_2: bytes
    trusted: TrustedRepository

    def forged_timestamp(self, version: int) -> bytes:
        """Revision 2's timestamp with a higher version and the old
        signatures, which no longer verify: all a peer without the key can do."""
        doc = json.loads(self.timestamp_2)
        doc["signed"]["version"] = version
        return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    tmp = tmp_path_factory.mktemp("exchange")
    root_json = init_keys(tmp / "keys", REPO)
    store = OriginStore(tmp / "store", REPO)
    src = tmp / "src"
    src.mkdir()
    (src / "VERSION").write_text("1\n")
    publish(src, store, tmp / "keys")
    metadata = tmp / "store" / REPO / "metadata"
    timestamp_1 = (metadata / "timestamp.json").read_bytes()
    (src / "VERSION").write_text("2\n")
    publish(src, store, tmp / "keys")
    # no origin and no peers: nothing is fetched, only screen() is used
    trusted, _ = open_trusted(
        RepositorySpec(REPO, None, root_json.read_bytes(), tmp / "node-metadata", 2)
    )
    return Repository(metadata, timestamp_1, (metadata / "timestamp.json").read_bytes(), trusted)


@pytest.fixture
def servers() -> Iterator[list[HostileServer]]:
    """Three sources, each answering 404 until a test gives it answers."""
    made = [HostileServer({}) for _ in range(3)]
    try:
        yield made
    finally:
        for s in made:
            s.close()


def _origin_path(name: str) -> str:
    return f"/{REPO}/metadata/{name}"


def _peer_path(name: str) -> str:
    return f"/v1/peer/repos/{REPO}/metadata/{name}"


def _fetch(fetcher: ExchangeFetcher, name: str) -> bytes:
    return fetcher.fetch_metadata(name)


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _version(data: bytes) -> int:
    v: int = json.loads(data)["signed"]["version"]
    return v


def test_the_newest_verified_timestamp_wins_over_a_forged_higher_one(
    repository: Repository, servers: list[HostileServer]
) -> None:
    origin, honest, forger = servers
    origin.answers[_origin_path("timestamp.json")] = Answer(repository.timestamp_1)  # stale
    honest.answers[_peer_path("timestamp.json")] = Answer(repository.timestamp_2)
    forger.answers[_peer_path("timestamp.json")] = Answer(repository.forged_timestamp(10**9))
    fetcher = ExchangeFetcher(
        REPO,
        origin.url,
        lambda: [forger.url, honest.url],
        timeout=2,
        screen=repository.trusted.screen,
    )
    assert _fetch(fetcher, "timestamp.json") == repository.timestamp_2
    assert _version(repository.timestamp_2) > _version(repository.timestamp_1)
    assert fetcher.last_source["timestamp.json"].startswith(honest.url)
    assert all(s.requests for s in servers)  # every source was asked
    report = fetcher.scores.report()
    assert list(report) == [forger.url]
    assert report[forger.url].bad_data == 1
    assert "timestamp.json" in str(report[forger.url].problem)


@pytest.mark.parametrize("name", ["timestamp.json", "3.root.json"])
def test_404_from_every_source_is_a_404_so_python_tuf_stops_looking(
    repository: Repository, servers: list[HostileServer], name: str
) -> None:
    origin, peer, _ = servers
    fetcher = ExchangeFetcher(
        REPO, origin.url, lambda: [peer.url], timeout=2, screen=repository.trusted.screen
    )
    with pytest.raises(tuf_exceptions.DownloadHTTPError) as exc:
        _fetch(fetcher, name)
    assert exc.value.status_code == 404
    assert origin.requests == [_origin_path(name)]
    assert peer.requests == [_peer_path(name)]


@pytest.mark.parametrize("name", ["timestamp.json", "1.snapshot.json"])
def test_unreachable_sources_are_a_transport_error_not_a_404(
    repository: Repository, name: str
) -> None:
    fetcher = ExchangeFetcher(
        REPO,
        _closed_port_url(),
        lambda: [_closed_port_url()],
        timeout=2,
        screen=repository.trusted.screen,
    )
    with pytest.raises(tuf_exceptions.DownloadError) as exc:
        _fetch(fetcher, name)
    assert not isinstance(exc.value, tuf_exceptions.DownloadHTTPError)
    assert len(fetcher.scores.report()) == 2  # both scored down as unreachable


def test_a_source_that_sent_bad_data_is_asked_last(
    repository: Repository, servers: list[HostileServer]
) -> None:
    liar, honest, _ = servers
    snapshot = (repository.metadata / "2.snapshot.json").read_bytes()
    garbage = b'{"signed": {"_type": "snapshot", "version": 2}, "signatures": []}'
    liar.answers[_origin_path("2.snapshot.json")] = Answer(garbage)
    honest.answers[_peer_path("2.snapshot.json")] = Answer(snapshot)
    # The liar is the origin: asked first while nothing is known against it.
    fetcher = ExchangeFetcher(
        REPO, liar.url, lambda: [honest.url], timeout=2, screen=repository.trusted.screen
    )
    assert _fetch(fetcher, "2.snapshot.json") == snapshot
    assert fetcher.last_source["2.snapshot.json"].startswith(honest.url)
    assert len(liar.requests) == 1
    assert _fetch(fetcher, "2.snapshot.json") == snapshot
    assert len(liar.requests) == 1  # the honest peer answered first this time
    assert len(honest.requests) == 2
