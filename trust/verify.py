"""Verification core: bytes in, verified TUF objects out.  No network, no disk.

Used by :class:`trust.client.TrustedRepository` to (re)check the metadata it
keeps, in particular for the explicit offline mode where python-tuf's
``Updater`` (which always contacts the repository) cannot be used.

Invariants: a :class:`VerifiedState` is only ever built from a root reached
through a chain of roots each signed by a threshold of its predecessor and of
itself, and from timestamp, snapshot and targets that are signed by a threshold
of that root's keys and agree with each other on versions, lengths and hashes.
Expiry is reported, not enforced: the caller decides (see ``client``).

python-tuf exceptions are mapped with :func:`map_repository_error`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot, T, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from trust.exceptions import (
    ExpiredMetadataError,
    HashMismatchError,
    MetadataFormatError,
    OversizedDataError,
    RollbackError,
    SignatureError,
    TrustTransportError,
    VerificationError,
)


@dataclass(frozen=True)
class VerifiedState:
    """One consistent, signature-checked set of top-level metadata."""

    root: Root
    timestamp: Timestamp
    snapshot: Snapshot
    targets: Targets
    expired: tuple[str, ...]  # roles expired at the reference time, root first


def map_repository_error(
    exc: tuf_exc.RepositoryError, file: str | None = None
) -> VerificationError:
    """Translate a python-tuf verification error into ours (caller chains it).

    ``file``, the metadata file being checked, prefixes the message when
    python-tuf's does not name it ("Failed to deserialize JSON").
    """
    text = str(exc) or type(exc).__name__
    if file is not None and file not in text:
        text = f"{file}: {text}"
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return SignatureError(text)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return RollbackError(text)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return ExpiredMetadataError(text)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return HashMismatchError(text)
    if isinstance(exc, DeserializationError):
        return MetadataFormatError(text)
    return VerificationError(text)


def map_download_error(exc: tuf_exc.DownloadError) -> OversizedDataError | TrustTransportError:
    """Translate a python-tuf download error: too many bytes is an attack
    (endless data, TUF spec 5.2.1 upper bounds), anything else is transport."""
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return OversizedDataError(str(exc))
    return TrustTransportError(str(exc) or type(exc).__name__)


def _load(role: type[T], data: bytes, delegator: Root | None) -> tuple[T, Metadata[T]]:
    try:
        md = Metadata[T].from_bytes(data)
    except tuf_exc.RepositoryError as exc:
        raise MetadataFormatError(f"{role.type}: cannot parse metadata: {exc}") from exc
    if md.signed.type != role.type:
        raise MetadataFormatError(f"expected {role.type} metadata, got {md.signed.type}")
    if delegator is not None:
        try:
            delegator.verify_delegate(role.type, md.signed_bytes, md.signatures)
        except tuf_exc.UnsignedMetadataError as exc:
            raise SignatureError(f"{role.type}: {exc}") from exc
    return md.signed, md


def verify_root_chain(trusted_root: bytes, newer_roots: Iterable[bytes]) -> Root:
    """Verify the trusted root by itself, then each newer root in order.

    TUF spec 5.3.4-5.3.5: root N+1 must be signed by a threshold of root N's
    root keys and of its own, and have version N+1.  Expiry of intermediate
    roots is not checked (5.3.10 checks only the final root).

    Raises:
        SignatureError: a root lacks a threshold of signatures.
        RollbackError: a root does not have the next version number.
        MetadataFormatError: a root cannot be parsed.
    """
    root, md = _load(Root, trusted_root, None)
    try:
        root.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except tuf_exc.UnsignedMetadataError as exc:
        raise SignatureError(f"trusted root is not self-signed: {exc}") from exc
    for data in newer_roots:
        new_root, new_md = _load(Root, data, root)
        if new_root.version != root.version + 1:
            raise RollbackError(f"expected root version {root.version + 1}, got {new_root.version}")
        try:
            new_root.verify_delegate(Root.type, new_md.signed_bytes, new_md.signatures)
        except tuf_exc.UnsignedMetadataError as exc:
            raise SignatureError(f"root v{new_root.version}: {exc}") from exc
        root = new_root
    return root


def verify_top_level(
    root: Root, timestamp: bytes, snapshot: bytes, targets: bytes, *, now: datetime
) -> VerifiedState:
    """Verify timestamp, snapshot and targets as one consistent state of ``root``.

    Raises:
        SignatureError: a role lacks a threshold of signatures from ``root``'s keys.
        HashMismatchError: snapshot or targets differ from the length/hashes
            announced by their parent (TUF spec 5.5.2, 5.6.2).
        RollbackError: a version differs from the one its parent names
            (mix-and-match, TUF spec 5.5.3, 5.6.3).
        MetadataFormatError: a file cannot be parsed or is of the wrong role.
    """
    ts, _ = _load(Timestamp, timestamp, root)  # 5.4.2
    try:
        ts.snapshot_meta.verify_length_and_hashes(snapshot)  # 5.5.2
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise HashMismatchError(f"snapshot: {exc}") from exc
    snap, _ = _load(Snapshot, snapshot, root)  # 5.5.3
    if snap.version != ts.snapshot_meta.version:  # 5.5.4
        raise RollbackError(
            f"timestamp names snapshot v{ts.snapshot_meta.version}, got v{snap.version}"
        )
    meta = snap.meta.get("targets.json")
    if meta is None:
        raise MetadataFormatError("snapshot does not list targets.json")
    try:
        meta.verify_length_and_hashes(targets)  # 5.6.2
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise HashMismatchError(f"targets: {exc}") from exc
    tgt, _ = _load(Targets, targets, root)  # 5.6.3
    if tgt.version != meta.version:  # 5.6.4
        raise RollbackError(f"snapshot names targets v{meta.version}, got v{tgt.version}")
    expired = tuple(
        signed.type for signed in (root, ts, snap, tgt) if signed.is_expired(now)
    )  # 5.3.10, 5.4.4, 5.5.6, 5.6.5: reported, the caller decides
    return VerifiedState(root, ts, snap, tgt, expired)


def screen_metadata(delegator: Root, role: str, data: bytes) -> int:
    """Check that ``data`` is ``role`` metadata signed by a threshold of the
    keys ``delegator`` names for that role, and return its version.

    The first step of TUF spec 5.3.4 (a new root, with the previous root as
    ``delegator``), 5.4.2, 5.5.3 and 5.6.3, done *before* a candidate from an
    untrusted mirror is chosen: a forged file with a huge version must lose to
    the honest one instead of winning the comparison and then failing the
    refresh (the freeze attack through the mirror choice).  Versions,
    hashes, expiry and the rest of the workflow stay python-tuf's.

    Raises:
        MetadataFormatError: ``data`` cannot be parsed or is not ``role``.
        SignatureError: not signed by a threshold of ``delegator``'s keys for ``role``.
    """
    if role == Root.type:
        return _load(Root, data, delegator)[0].version
    if role == Timestamp.type:
        return _load(Timestamp, data, delegator)[0].version
    if role == Snapshot.type:
        return _load(Snapshot, data, delegator)[0].version
    if role == Targets.type:
        return _load(Targets, data, delegator)[0].version
    raise MetadataFormatError(f"no top-level role {role!r}")
