"""Publisher side: write the signed metadata of one TUF repository to disk.

Layout of ``metadata_dir`` (consistent snapshots, TUF spec 6.2)::

    1.root.json 2.root.json ...    every root version, never deleted
    N.targets.json                 top-level targets, one file per version
    N.snapshot.json                snapshot, one file per version
    timestamp.json                 the only mutable file: names the snapshot
    .lock                          flock(2) held while a writer is open

A client fetching ``<metadata_url>timestamp.json``, then
``<metadata_url><v>.snapshot.json`` and ``<metadata_url><v>.targets.json`` sees
one consistent state whatever a concurrent publish does.

Invariants:

* the committed state is the chain ``timestamp.json`` -> snapshot version ->
  targets version; versions are derived from that chain, never from a
  directory listing, so files left by a killed publish are simply overwritten;
* every file is written to a temporary name, fsynced and renamed, then the
  directory is fsynced; ``timestamp.json`` is renamed last and is the commit
  point: before it the previous state is served unchanged;
* one writer at a time (non-blocking ``flock`` on ``.lock``).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from trust.exceptions import TrustConfigError
from trust.keys import (
    OLD_DIR,
    ROLES,
    ROOT_FILE,
    KeyRing,
    expires_at,
    read_index,
    write_file_atomic,
    write_index,
    write_private_key,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
TIMESTAMP_FILE = "timestamp.json"
_VERSIONED = re.compile(r"(\d+)\.(targets|snapshot)\.json")

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _serialize(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


def _meta_file(version: int, data: bytes) -> MetaFile:
    # Length and hash let clients bound the download (endless data) and detect
    # substitution before parsing (TUF spec 5.5.2, 5.6.2).
    return MetaFile.from_data(version, data, ["sha256"])


class RepositoryWriter:
    """The only writer of one repository's metadata directory.

    Use as ``with RepositoryWriter.open(metadata_dir, keydir) as w: w.commit(...)``.
    """

    def __init__(
        self,
        metadata_dir: Path,
        keyring: KeyRing,
        lock_fd: int,
        root: Metadata[Root],
        timestamp: Metadata[Timestamp] | None,
        snapshot: Metadata[Snapshot] | None,
        targets: Metadata[Targets] | None,
        clock: Clock,
    ) -> None:
        self._dir = metadata_dir
        self._keys = keyring
        self._lock_fd: int | None = lock_fd
        self._root = root
        self._timestamp = timestamp
        self._snapshot = snapshot
        self._targets = targets
        self._clock = clock

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls, metadata_dir: Path, keydir: Path, *, clock: Clock | None = None
    ) -> RepositoryWriter:
        """Lock ``metadata_dir`` and load its committed state.

        An empty ``metadata_dir`` is bootstrapped from ``keydir/root.json``.

        Raises:
            TrustConfigError: another publish holds the lock; the keys, the
                key directory's root or the committed metadata are missing,
                unreadable or inconsistent with each other.
        """
        keyring = KeyRing.load(keydir)
        try:
            metadata_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(metadata_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrustConfigError(f"cannot open {metadata_dir}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            raise TrustConfigError(
                f"another publish is running on {metadata_dir} (lock {LOCK_FILE} held)"
            ) from exc
        try:
            root, timestamp, snapshot, targets = _load_committed(metadata_dir, keyring)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(
            metadata_dir,
            keyring,
            lock_fd,
            root,
            timestamp,
            snapshot,
            targets,
            clock or _utcnow,
        )

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self) -> RepositoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading -------------------------------------------------------------

    @property
    def version(self) -> int:
        """Committed targets version, 0 if nothing was committed yet."""
        return 0 if self._targets is None else self._targets.signed.version

    @property
    def root_version(self) -> int:
        return self._root.signed.version

    def targets(self) -> dict[str, TargetFile]:
        """The committed targets, by name (a copy)."""
        if self._targets is None:
            return {}
        return copy.deepcopy(self._targets.signed.targets)

    # -- writing -------------------------------------------------------------

    def commit(self, add: Mapping[str, TargetFile], remove: Iterable[str] = ()) -> int:
        """Publish targets version N+1 = committed targets - ``remove`` + ``add``.

        Writes ``N+1.targets.json``, a new snapshot, then ``timestamp.json``
        last (the commit point).  Returns the new targets version.

        Raises:
            TrustConfigError: a name in ``remove`` is not a committed target,
                a ``TargetFile.path`` differs from its key, the writer is
                closed, or the files cannot be written.
        """
        self._check_open()
        targets = self.targets()
        for name in remove:
            if name not in targets:
                raise TrustConfigError(f"cannot remove {name!r}: no such target")
            del targets[name]
        for name, target in add.items():
            if target.path != name:
                raise TrustConfigError(f"target {name!r} has path {target.path!r}")
            targets[name] = target
        return self._publish(targets)

    def refresh_timestamp(self) -> None:
        """Re-sign the timestamp with version+1 and a new expiry (for cron).

        Raises:
            TrustConfigError: nothing was committed yet, or writing failed.
        """
        self._check_open()
        if self._snapshot is None or self._timestamp is None:
            raise TrustConfigError("nothing committed yet: commit before refreshing")
        snapshot_bytes = _serialize(self._snapshot)
        self._write_timestamp(self._snapshot.signed.version, snapshot_bytes)

    def refresh_all(self) -> None:
        """Re-sign targets, snapshot and timestamp with new versions and
        expiries; the targets themselves do not change.

        Raises:
            TrustConfigError: the files cannot be written.
        """
        self._check_open()
        self._publish(self.targets())

    def rotate(self, role: str) -> None:
        """Replace the keys of ``role``; see :func:`rotate_key`.

        Raises:
            TrustConfigError: unknown role, or keys/metadata cannot be written.
        """
        self._check_open()
        if role not in ROLES:
            raise TrustConfigError(f"unknown role {role!r}")
        keydir = self._keys.keydir
        old_signers = list(self._keys.signers["root"])
        index = read_index(keydir)
        try:
            new_signers: list[CryptoSigner] = [
                CryptoSigner.generate_ed25519() for _ in self._keys.signers[role]
            ]
            new_entries = [
                {"keyid": s.public_key.keyid, "file": write_private_key(keydir, role, s)}
                for s in new_signers
            ]
            root = copy.deepcopy(self._root.signed)
            root.version += 1
            root.expires = expires_at(self._clock(), self._keys.expiry.root)
            for keyid in self._keys.keyids(role):
                root.revoke_key(keyid, role)
            for signer in new_signers:
                root.add_key(signer.public_key, role)
            new_root = Metadata(root)
            signing: list[Signer] = list(old_signers)
            if role == "root":
                signing += new_signers
            for root_signer in signing:
                new_root.sign(root_signer, append=True)
            data = _serialize(new_root)
            # TUF spec 5.3: clients walk N.root.json; write it before anything
            # signed by the new keys appears.
            write_file_atomic(self._dir / f"{root.version}.root.json", data)
            write_file_atomic(keydir / ROOT_FILE, data)
            (keydir / OLD_DIR).mkdir(mode=0o700, exist_ok=True)
            retired = index.setdefault("retired", [])
            for name in self._keys.files[role]:
                os.replace(keydir / name, keydir / OLD_DIR / name)
                retired.append({"role": role, "file": f"{OLD_DIR}/{name}"})
            index["roles"][role]["keys"] = new_entries
            write_index(keydir, index)
        except OSError as exc:
            raise TrustConfigError(f"key rotation of {role} failed: {exc}") from exc
        self._root = new_root
        self._keys = KeyRing.load(keydir)
        logger.info("rotated %s keys; root is now version %d", role, root.version)
        if self._targets is not None:
            self.refresh_all()

    # -- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise TrustConfigError("repository writer is closed")

    def _publish(self, targets_by_name: dict[str, TargetFile]) -> int:
        now = self._clock()
        expiry = self._keys.expiry
        version = self.version + 1
        targets = Targets(
            version=version,
            expires=expires_at(now, expiry.targets),
            targets=targets_by_name,
        )
        targets_md = Metadata(targets)
        self._keys.sign(targets_md, "targets")
        targets_bytes = _serialize(targets_md)

        snapshot_version = 1 if self._snapshot is None else self._snapshot.signed.version + 1
        snapshot = Snapshot(
            version=snapshot_version,
            expires=expires_at(now, expiry.snapshot),
            meta={"targets.json": _meta_file(version, targets_bytes)},
        )
        snapshot_md = Metadata(snapshot)
        self._keys.sign(snapshot_md, "snapshot")
        snapshot_bytes = _serialize(snapshot_md)
        try:
            write_file_atomic(self._dir / f"{version}.targets.json", targets_bytes)
            write_file_atomic(self._dir / f"{snapshot_version}.snapshot.json", snapshot_bytes)
        except OSError as exc:
            raise TrustConfigError(f"cannot write metadata to {self._dir}: {exc}") from exc
        self._write_timestamp(snapshot_version, snapshot_bytes)
        self._targets = targets_md
        self._snapshot = snapshot_md
        logger.info("committed targets v%d (snapshot v%d)", version, snapshot_version)
        return version

    def _write_timestamp(self, snapshot_version: int, snapshot_bytes: bytes) -> None:
        timestamp = Timestamp(
            version=1 if self._timestamp is None else self._timestamp.signed.version + 1,
            expires=expires_at(self._clock(), self._keys.expiry.timestamp),
            snapshot_meta=_meta_file(snapshot_version, snapshot_bytes),
        )
        md = Metadata(timestamp)
        self._keys.sign(md, "timestamp")
        try:
            write_file_atomic(self._dir / TIMESTAMP_FILE, _serialize(md))  # commit point
        except OSError as exc:
            raise TrustConfigError(f"cannot write {self._dir / TIMESTAMP_FILE}: {exc}") from exc
        self._timestamp = md


def _read_metadata(path: Path) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(path.read_bytes())
    except OSError as exc:
        raise TrustConfigError(f"committed metadata {path} is unreadable: {exc}") from exc
    except RepositoryError as exc:
        raise TrustConfigError(f"committed metadata {path} is malformed: {exc}") from exc


def _load_committed(
    metadata_dir: Path, keyring: KeyRing
) -> tuple[
    Metadata[Root],
    Metadata[Timestamp] | None,
    Metadata[Snapshot] | None,
    Metadata[Targets] | None,
]:
    key_root_bytes = keyring.root_bytes()
    if not (metadata_dir / "1.root.json").exists():
        key_root: Metadata[Root] = _read_metadata(keyring.keydir / ROOT_FILE)
        if key_root.signed.version != 1 or (metadata_dir / TIMESTAMP_FILE).exists():
            raise TrustConfigError(
                f"{metadata_dir} has no 1.root.json but {keyring.keydir / ROOT_FILE} "
                f"is version {key_root.signed.version}: cannot bootstrap"
            )
        try:
            write_file_atomic(metadata_dir / "1.root.json", key_root_bytes)
        except OSError as exc:
            raise TrustConfigError(f"cannot write {metadata_dir}: {exc}") from exc
    # Root files are published as soon as written (clients probe N+1.root.json),
    # so walking the chain is walking the committed roots.
    version = 1
    while (metadata_dir / f"{version + 1}.root.json").exists():
        version += 1
    root_path = metadata_dir / f"{version}.root.json"
    root: Metadata[Root] = _read_metadata(root_path)
    if root_path.read_bytes() != key_root_bytes:
        raise TrustConfigError(
            f"{keyring.keydir / ROOT_FILE} is not the newest root of {metadata_dir} "
            f"({root_path.name}): wrong key directory or an interrupted rotation"
        )
    for role in ROLES:
        if sorted(root.signed.roles[role].keyids) != sorted(keyring.keyids(role)):
            raise TrustConfigError(
                f"keys of role {role} in {keyring.keydir} differ from {root_path.name}"
            )
    if not (metadata_dir / TIMESTAMP_FILE).exists():
        return root, None, None, None
    timestamp: Metadata[Timestamp] = _read_metadata(metadata_dir / TIMESTAMP_FILE)
    snapshot_version = timestamp.signed.snapshot_meta.version
    snapshot: Metadata[Snapshot] = _read_metadata(
        metadata_dir / f"{snapshot_version}.snapshot.json"
    )
    targets_meta = snapshot.signed.meta.get("targets.json")
    if snapshot.signed.version != snapshot_version or targets_meta is None:
        raise TrustConfigError(f"{snapshot_version}.snapshot.json is inconsistent")
    targets: Metadata[Targets] = _read_metadata(
        metadata_dir / f"{targets_meta.version}.targets.json"
    )
    if targets.signed.version != targets_meta.version:
        raise TrustConfigError(f"{targets_meta.version}.targets.json is inconsistent")
    return root, timestamp, snapshot, targets


def prune_metadata(metadata_dir: Path, keep_versions: int) -> list[Path]:
    """Delete ``N.targets.json``/``N.snapshot.json`` older than the newest
    ``keep_versions`` committed ones.  Root files are never deleted, nor files
    newer than the committed state.  Takes no lock: call it while holding a
    :class:`RepositoryWriter` or when no publish runs.  Returns deleted paths.

    Raises:
        TrustConfigError: ``keep_versions`` < 1, or the committed state cannot be read.
    """
    if keep_versions < 1:
        raise TrustConfigError("keep_versions must be at least 1")
    timestamp: Metadata[Timestamp] = _read_metadata(metadata_dir / TIMESTAMP_FILE)
    snapshot_version = timestamp.signed.snapshot_meta.version
    snapshot: Metadata[Snapshot] = _read_metadata(
        metadata_dir / f"{snapshot_version}.snapshot.json"
    )
    floors = {
        "snapshot": snapshot_version - keep_versions + 1,
        "targets": snapshot.signed.meta["targets.json"].version - keep_versions + 1,
    }
    deleted: list[Path] = []
    for path in metadata_dir.iterdir():
        match = _VERSIONED.fullmatch(path.name)
        if match and int(match.group(1)) < floors[match.group(2)]:
            path.unlink()
            deleted.append(path)
    return deleted


def rotate_key(keydir: Path, metadata_dir: Path, role: str) -> None:
    """Replace every key of ``role`` and publish root N+1 naming the new keys.

    The new root is signed by the previous root keys and by the new ones (TUF
    spec 5.3.4/5.3.5: a client accepts root N+1 only if signed by a threshold
    of root N *and* of root N+1).  Old key files move to ``keydir/old/``.  The
    targets, snapshot and timestamp metadata are then re-signed with fresh
    versions so the repository stays valid.  Takes the publish lock.

    Raises:
        TrustConfigError: unknown role, unusable keys, or the publish lock is held.
    """
    if role not in ROLES:
        raise TrustConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    with RepositoryWriter.open(metadata_dir, keydir) as writer:
        writer.rotate(role)
