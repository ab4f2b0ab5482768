"""Node side: one test per TUF attack, each asserting the refusal and that the
previously trusted state is kept; plus offline mode and thread use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile, Root

from tests.trust.simulator import METADATA_URL, TARGETS_URL, RepositorySimulator
from trust.client import (
    STATE_FILE,
    Freshness,
    RefreshOutcome,
    TrustedRepository,
    UnknownTargetError,
)
from trust.exceptions import (
    ExpiredMetadataError,
    HashMismatchError,
    OversizedDataError,
    RollbackError,
    SignatureError,
    TrustConfigError,
    TrustTransportError,
    VerificationError,
)
from trust.targets import ReleaseTarget

CATALOG = "ab" * 32


def _release(revision: int) -> ReleaseTarget:
    return ReleaseTarget(revision=revision, catalog=CATALOG, catalog_size=10, published=1)


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target("a.txt", b"good content")
    sim.publish()
    return sim


def _client(
    sim: RepositorySimulator, cache: Path, clock: Callable[[], datetime] | None = None
) -> TrustedRepository:
    return TrustedRepository(
        cache, METADATA_URL, fetcher=sim, trusted_root=sim.signed_roots[0], clock=clock
    )


@pytest.fixture
def client(sim: RepositorySimulator, tmp_path: Path) -> TrustedRepository:
    client = _client(sim, tmp_path / "cache")
    client.refresh()
    return client


def _assert_kept(client: TrustedRepository, version: int) -> None:
    assert client.targets_version == version
    assert sorted(client.targets()) == ["a.txt"]


def test_refresh_lists_releases_and_tags(sim: RepositorySimulator, tmp_path: Path) -> None:
    for rev in (1, 2):
        t = _release(rev).to_target_file()
        sim.targets.targets[t.path] = t
    tag = ReleaseTarget(1, CATALOG, 10, 1, tag="stable").to_target_file()
    sim.targets.targets[tag.path] = tag
    sim.publish()
    client = _client(sim, tmp_path / "cache")
    with pytest.raises(TrustConfigError, match="no verified metadata"):
        client.targets()
    client.refresh()
    assert [r.revision for r in client.releases()] == [1, 2]
    latest = client.latest_release()
    assert latest is not None and latest.revision == 2
    assert client.tags()["stable"].revision == 1
    assert (tmp_path / "cache" / STATE_FILE).exists()


def test_needs_a_root(tmp_path: Path, sim: RepositorySimulator) -> None:
    with pytest.raises(TrustConfigError, match=r"no root\.json"):
        TrustedRepository(tmp_path / "empty", METADATA_URL, fetcher=sim)
    with pytest.raises(TrustConfigError, match="unusable"):
        TrustedRepository(tmp_path / "bad", METADATA_URL, fetcher=sim, trusted_root=b"{}")


def test_cached_root_is_used_without_trusted_root(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    again = TrustedRepository(tmp_path / "cache", METADATA_URL, fetcher=sim)
    again.refresh()
    assert again.targets_version == client.targets_version


def test_arbitrary_software_target_hash_mismatch(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    sha = sim.targets.targets["a.txt"].hashes["sha256"]
    sim.target_files[f"{sha}.a.txt"] = b"evil content"  # same length, other bytes
    with pytest.raises(HashMismatchError):
        client.download_target("a.txt", TARGETS_URL, tmp_path / "out")
    assert not (tmp_path / "out" / "a.txt").exists()
    _assert_kept(client, 2)


def test_arbitrary_software_unsigned_targets(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

    sim.add_target("evil.txt", b"evil")
    sim.publish(targets_signers=[CryptoSigner.generate_ed25519()])
    with pytest.raises(SignatureError):
        client.refresh()
    _assert_kept(client, 2)


def test_download_target_and_cache(client: TrustedRepository, tmp_path: Path) -> None:
    path = client.download_target("a.txt", TARGETS_URL, tmp_path / "out")
    assert path.read_bytes() == b"good content"
    with pytest.raises(UnknownTargetError):
        client.download_target("nope.txt", TARGETS_URL, tmp_path / "out")


def test_rollback_of_timestamp(client: TrustedRepository, sim: RepositorySimulator) -> None:
    old = sim.timestamp_bytes
    sim.publish()
    client.refresh()
    sim.overrides["timestamp.json"] = old
    with pytest.raises(RollbackError):
        client.refresh()
    assert client.targets_version == 3


def test_rollback_of_snapshot(client: TrustedRepository, sim: RepositorySimulator) -> None:
    sim.publish()
    client.refresh()
    sim.publish_timestamp(snapshot_version=1)  # fresh timestamp naming an old snapshot
    with pytest.raises(RollbackError):
        client.refresh()
    assert client.targets_version == 3


def test_rollback_of_targets(client: TrustedRepository, sim: RepositorySimulator) -> None:
    # a correctly signed new snapshot that names an older targets version
    sim.snapshot.meta["targets.json"] = MetaFile.from_data(1, sim.targets_versions[1], ["sha256"])
    sim.publish_snapshot()
    with pytest.raises(RollbackError):
        client.refresh()
    _assert_kept(client, 2)


def test_fast_forward_recovery_after_timestamp_key_rotation(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    sim.timestamp.version = 1000  # an attacker with the timestamp key fast-forwarded
    sim.publish_timestamp(sim.snapshot.version)
    client.refresh()
    sim.rotate("timestamp")
    sim.timestamp.version = 0  # publish_timestamp makes it version 1
    sim.publish_timestamp(sim.snapshot.version)
    client.refresh()  # TUF 5.3.11: the old timestamp is no longer trusted
    _assert_kept(client, 2)


def test_fast_forward_recovery_after_snapshot_key_rotation(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    sim.snapshots[500] = b""  # next snapshot is 501: fast-forwarded
    sim.publish_snapshot()
    client.refresh()
    sim.rotate("snapshot")
    sim.rotate("timestamp")
    sim.snapshots = {}
    sim.publish_snapshot()  # back to version 1
    client.refresh()
    assert client.targets_version == 2


def test_indefinite_freeze_expired_timestamp(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    sim.timestamp.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    sim.publish()
    with pytest.raises(ExpiredMetadataError):
        client.refresh()
    _assert_kept(client, 2)


def test_endless_data_timestamp(client: TrustedRepository, sim: RepositorySimulator) -> None:
    sim.overrides["timestamp.json"] = sim.timestamp_bytes + b" " * 20_000  # > 16 KiB max
    with pytest.raises(OversizedDataError):
        client.refresh()
    _assert_kept(client, 2)


def test_endless_data_snapshot_longer_than_announced(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    sim.publish()
    name = f"{sim.snapshot.version}.snapshot.json"
    sim.overrides[name] = sim.snapshots[sim.snapshot.version] + b" " * 100
    with pytest.raises(OversizedDataError):
        client.refresh()
    _assert_kept(client, 2)


def test_mix_and_match_targets_version(client: TrustedRepository, sim: RepositorySimulator) -> None:
    sim.meta_hashes = False  # only versions tie the roles together
    sim.publish()
    # serve targets v2 under the name of targets v3 named by the new snapshot
    sim.overrides["3.targets.json"] = sim.targets_versions[2]
    with pytest.raises(RollbackError):
        client.refresh()
    _assert_kept(client, 2)


def test_mix_and_match_with_hashes(client: TrustedRepository, sim: RepositorySimulator) -> None:
    sim.publish()
    sim.overrides["3.targets.json"] = sim.targets_versions[2]
    with pytest.raises(HashMismatchError):
        client.refresh()
    _assert_kept(client, 2)


def test_wrong_software_other_repository(client: TrustedRepository) -> None:
    other = RepositorySimulator()  # another repository: same names, its own keys
    other.add_target("a.txt", b"other repository's software")
    other.publish()
    other.publish()
    client._fetcher = other  # a peer serves the other repository's metadata
    with pytest.raises(SignatureError):
        client.refresh()
    _assert_kept(client, 2)


def test_key_compromise_rotated_targets_key(
    client: TrustedRepository, sim: RepositorySimulator
) -> None:
    compromised = sim.rotate("targets")
    sim.publish()
    client.refresh()  # client now trusts root v2
    assert client.targets_version == 3
    sim.add_target("evil.txt", b"evil")
    sim.publish(targets_signers=compromised)
    with pytest.raises(SignatureError):
        client.refresh()
    assert client.targets_version == 3
    assert "evil.txt" not in client.targets()


def test_key_compromise_root_threshold(tmp_path: Path) -> None:
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

    sim = RepositorySimulator(root_keys=2, root_threshold=2)
    sim.publish()
    client = _client(sim, tmp_path / "cache")
    client.refresh()
    # an attacker holding one of the two root keys adds their own targets key
    attacker = CryptoSigner.generate_ed25519()
    sim.root.add_key(attacker.public_key, "targets")
    sim.root.version += 1
    sim.publish_root(signers=[sim.signers["root"][0]])
    with pytest.raises(SignatureError):
        client.refresh()
    root_link = tmp_path / "cache" / "root.json"
    assert Metadata[Root].from_bytes(root_link.read_bytes()).signed.version == 1


def test_transport_failure_then_offline(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    sim.offline = True
    with pytest.raises(TrustTransportError):
        client.refresh()
    node = _client(sim, tmp_path / "cache")  # a restarted node, origin down
    with pytest.raises(TrustTransportError):
        node.refresh()
    node.load_cached()
    assert sorted(node.targets()) == ["a.txt"]


def test_refresh_or_cached_says_which_state_it_left_in_place(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    assert client.refresh_or_cached() == RefreshOutcome(Freshness.REFRESHED)
    sim.offline = True
    kept = client.refresh_or_cached()  # trusted already: that state stays
    assert kept.freshness is Freshness.KEPT and kept.unreachable and kept.usable
    restarted = _client(sim, tmp_path / "cache")
    cached = restarted.refresh_or_cached()  # nothing in memory: the cache on disk
    assert cached.freshness is Freshness.CACHED and cached.unreachable
    assert sorted(restarted.targets()) == ["a.txt"]
    empty = _client(sim, tmp_path / "empty").refresh_or_cached()
    assert empty.freshness is Freshness.NONE and not empty.usable
    assert isinstance(empty.cached_error, TrustConfigError)
    sim.offline = False
    sim.timestamp.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    sim.publish()  # an expired timestamp: bad data, not a transport failure
    refused = _client(sim, tmp_path / "cache").refresh_or_cached()
    assert isinstance(refused.error, VerificationError) and not refused.unreachable
    assert refused.freshness is Freshness.CACHED


def test_offline_accepts_expired_with_warning(
    client: TrustedRepository,
    sim: RepositorySimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    later = datetime.now(UTC) + timedelta(days=3)
    node = _client(sim, tmp_path / "cache", clock=lambda: later)
    with caplog.at_level(logging.WARNING, logger="trust.client"):
        node.load_cached()
    assert "expired" in caplog.text
    assert set(node.expired_roles()) == {"root", "timestamp", "snapshot", "targets"}
    assert sorted(node.targets()) == ["a.txt"]


def test_offline_refuses_tampered_or_missing_state(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    fresh = _client(sim, tmp_path / "fresh")
    with pytest.raises(TrustConfigError, match="no verified metadata cached"):
        fresh.load_cached()
    state = tmp_path / "cache" / STATE_FILE
    state.write_bytes(state.read_bytes().replace(b"a.txt", b"b.txt"))
    node = _client(sim, tmp_path / "cache")
    with pytest.raises(VerificationError):
        node.load_cached()


def test_interrupted_refresh_keeps_last_complete_state_for_offline(
    client: TrustedRepository, sim: RepositorySimulator, tmp_path: Path
) -> None:
    sim.publish()
    del sim.snapshots[sim.snapshot.version]  # timestamp fetched, snapshot missing
    with pytest.raises(TrustTransportError):
        client.refresh()
    node = _client(sim, tmp_path / "cache")
    node.load_cached()
    assert node.targets_version == 2


def test_usable_from_another_thread(client: TrustedRepository, sim: RepositorySimulator) -> None:
    sim.publish()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            client.refresh()
            assert client.targets_version == 3
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert not errors
    assert client.targets_version == 3
