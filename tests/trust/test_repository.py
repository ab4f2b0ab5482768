"""Publisher side: key directories, commits, atomicity, locking, rotation."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, TargetFile

import trust.keys as keys_module
import trust.repository as repository_module
from trust.exceptions import TrustConfigError
from trust.keys import Expiry, KeyRing, init_keys
from trust.repository import RepositoryWriter, prune_metadata, rotate_key


def _target(name: str, content: bytes) -> TargetFile:
    return TargetFile.from_data(name, content, ["sha256"])


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    init_keys(path, "sft.example.org")
    return path


def test_init_keys_layout_and_modes(tmp_path: Path) -> None:
    keydir = tmp_path / "k"
    root_path = init_keys(keydir, "a.b-c.org", root_keys=2, root_threshold=2)
    assert root_path == keydir / "root.json"
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    pems = sorted(keydir.glob("*.pem"))
    assert len(pems) == 5  # two root keys and one per other role
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems)
    root = Metadata[Root].from_bytes(root_path.read_bytes()).signed
    assert root.version == 1 and root.consistent_snapshot
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 2
    ring = KeyRing.load(keydir)
    assert ring.repo == "a.b-c.org" and ring.thresholds["root"] == 2
    assert ring.expiry == Expiry()


def test_init_keys_refuses_to_overwrite(keydir: Path) -> None:
    before = {p: p.read_bytes() for p in keydir.iterdir() if p.is_file()}
    with pytest.raises(TrustConfigError, match="refusing to overwrite"):
        init_keys(keydir, "sft.example.org")
    assert {p: p.read_bytes() for p in keydir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["", "-bad.org", "has space", "a/b", "x_y", "a..b"])
def test_init_keys_rejects_bad_repo_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(TrustConfigError, match="bad repository name"):
        init_keys(tmp_path / "k", name)
    assert not (tmp_path / "k").exists()


def test_init_keys_rejects_bad_threshold(tmp_path: Path) -> None:
    with pytest.raises(TrustConfigError, match="threshold"):
        init_keys(tmp_path / "k", "r.org", root_keys=1, root_threshold=2)


def test_keyring_names_missing_key_file(keydir: Path) -> None:
    victim = next(keydir.glob("snapshot-*.pem"))
    victim.unlink()
    with pytest.raises(TrustConfigError, match=victim.name):
        KeyRing.load(keydir)


def test_commit_writes_consistent_snapshot_chain(tmp_path: Path, keydir: Path) -> None:
    meta = tmp_path / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.version == 0 and w.targets() == {}
        assert w.commit({"revisions/1": _target("revisions/1", b"one")}) == 1
        assert w.commit({"revisions/2": _target("revisions/2", b"two")}) == 2
    names = sorted(p.name for p in meta.iterdir())
    assert names == [
        ".lock",
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "2.snapshot.json",
        "2.targets.json",
        "timestamp.json",
    ]
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.version == 2
        assert sorted(w.targets()) == ["revisions/1", "revisions/2"]
        assert w.commit({}, remove=["revisions/1"]) == 3
        assert sorted(w.targets()) == ["revisions/2"]
        with pytest.raises(TrustConfigError, match="no such target"):
            w.commit({}, remove=["revisions/9"])


def test_lock_contention(tmp_path: Path, keydir: Path) -> None:
    meta = tmp_path / "metadata"
    with (
        RepositoryWriter.open(meta, keydir),
        pytest.raises(TrustConfigError, match="another publish is running"),
    ):
        RepositoryWriter.open(meta, keydir)
    # released on exit
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.version == 0


def test_commit_atomicity_crash_before_timestamp(
    tmp_path: Path, keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = tmp_path / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/1": _target("revisions/1", b"one")})
    committed = (meta / "timestamp.json").read_bytes()

    real_write = keys_module.write_file_atomic

    class Killed(BaseException):
        pass

    def write_then_die(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        if path.name == "timestamp.json":
            raise Killed  # the process dies before the commit point
        real_write(path, data, mode=mode)

    monkeypatch.setattr(repository_module, "write_file_atomic", write_then_die)
    with pytest.raises(Killed), RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/2": _target("revisions/2", b"crashed")})
    monkeypatch.setattr(repository_module, "write_file_atomic", real_write)

    assert (meta / "2.targets.json").exists()  # leftover of the killed run
    assert (meta / "timestamp.json").read_bytes() == committed
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.version == 1
        assert sorted(w.targets()) == ["revisions/1"]
        assert w.commit({"revisions/2": _target("revisions/2", b"good")}) == 2
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.targets()["revisions/2"].hashes == _target("revisions/2", b"good").hashes


def test_refresh_timestamp_and_refresh_all(tmp_path: Path, keydir: Path) -> None:
    meta = tmp_path / "metadata"
    start = datetime(2030, 1, 1, tzinfo=UTC)
    with RepositoryWriter.open(meta, keydir, clock=lambda: start) as w:
        with pytest.raises(TrustConfigError, match="nothing committed"):
            w.refresh_timestamp()
        w.commit({"revisions/1": _target("revisions/1", b"one")})
    later = start + timedelta(days=3)
    with RepositoryWriter.open(meta, keydir, clock=lambda: later) as w:
        w.refresh_timestamp()
        ts = Metadata.from_bytes((meta / "timestamp.json").read_bytes()).signed
        assert ts.version == 2 and ts.expires == later + timedelta(days=7)
        w.refresh_all()
        assert w.version == 2 and sorted(w.targets()) == ["revisions/1"]
        tg = Metadata.from_bytes((meta / "2.targets.json").read_bytes()).signed
        assert tg.expires == later + timedelta(days=90)


def test_prune_keeps_newest_and_roots(tmp_path: Path, keydir: Path) -> None:
    meta = tmp_path / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        for i in range(1, 5):
            w.commit({f"revisions/{i}": _target(f"revisions/{i}", b"%d" % i)})
        deleted = prune_metadata(meta, keep_versions=2)
    assert sorted(p.name for p in deleted) == [
        "1.snapshot.json",
        "1.targets.json",
        "2.snapshot.json",
        "2.targets.json",
    ]
    assert (meta / "1.root.json").exists() and (meta / "4.targets.json").exists()


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_rotate_key_keeps_repository_writable(tmp_path: Path, keydir: Path, role: str) -> None:
    meta = tmp_path / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/1": _target("revisions/1", b"one")})
    old_ids = KeyRing.load(keydir).keyids(role)
    rotate_key(keydir, meta, role)
    ring = KeyRing.load(keydir)
    assert ring.keyids(role) != old_ids
    assert len(list((keydir / "old").glob(f"{role}-*.pem"))) == 1
    root2 = Metadata[Root].from_bytes((meta / "2.root.json").read_bytes())
    assert (keydir / "root.json").read_bytes() == (meta / "2.root.json").read_bytes()
    assert root2.signed.roles[role].keyids == ring.keyids(role)
    with RepositoryWriter.open(meta, keydir) as w:
        assert w.root_version == 2
        assert w.commit({"revisions/2": _target("revisions/2", b"two")}) == 3


def test_open_with_foreign_keydir_is_refused(tmp_path: Path, keydir: Path) -> None:
    meta = tmp_path / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({})
    other = tmp_path / "other"
    init_keys(other, "other.org")
    with pytest.raises(TrustConfigError, match="not the newest root"):
        RepositoryWriter.open(meta, other)
