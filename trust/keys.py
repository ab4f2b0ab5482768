"""Signing keys of one repository: creation, loading and rotation.

A key directory holds everything a publisher needs to sign, and nothing a node
needs (nodes get ``root.json`` out of band)::

    keydir/                      mode 0700
        keys.json                index: repo name, expiry, per role: threshold,
                                 key files and keyids; retired keys
        root.json                the newest root metadata (trust anchor for nodes)
        <role>-<keyid16>.pem     Ed25519 private keys, PKCS#8 PEM, mode 0600
        old/<role>-<keyid16>.pem retired keys, kept for audit

Invariants:

* every role has at least ``threshold`` keys, every key file named in
  ``keys.json`` exists and its public key has the keyid recorded there;
* ``root.json`` always names exactly the keys of ``keys.json`` (checked when a
  repository is opened for writing).

Only Ed25519 keys through securesystemslib's ``CryptoSigner`` are used; no
signature scheme is invented here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from trust.durable import write_file_atomic as write_file_atomic  # its users import it here
from trust.exceptions import TrustConfigError
from trust.names import repo_name_problem

ROLES = ("root", "targets", "snapshot", "timestamp")
INDEX = "keys.json"
ROOT_FILE = "root.json"
OLD_DIR = "old"
FORMAT = 1


def validate_repo_name(repo: str) -> None:
    """Check that ``repo`` is a repository name (``trust/names.py``: the
    store's rule, e.g. ``sft.cern.ch``).

    Raises:
        TrustConfigError: not a repository name; the message says what is.
    """
    problem = repo_name_problem(repo)
    if problem is not None:
        raise TrustConfigError(problem)


@dataclass(frozen=True)
class Expiry:
    """How long freshly signed metadata of each role stays valid."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=7)

    def of(self, role: str) -> timedelta:
        """Lifetime of ``role``.

        Raises:
            TrustConfigError: ``role`` is not a top-level role.
        """
        if role not in ROLES:
            raise TrustConfigError(f"unknown role {role!r}")
        value: timedelta = getattr(self, role)
        return value

    def to_dict(self) -> dict[str, int]:
        return {role: int(self.of(role).total_seconds()) for role in ROLES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Expiry:
        """Raises: TrustConfigError: a lifetime is missing or not a positive integer."""
        values: dict[str, timedelta] = {}
        for role in ROLES:
            seconds = data.get(role)
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
                raise TrustConfigError(f"{INDEX}: bad expiry for {role}: {seconds!r}")
            values[role] = timedelta(seconds=seconds)
        return cls(**values)


def expires_at(now: datetime, lifetime: timedelta) -> datetime:
    """Expiry date as TUF serialises it: UTC, whole seconds."""
    return (now + lifetime).astimezone(UTC).replace(microsecond=0)


@dataclass
class KeyRing:
    """The signers of one repository, per role, as loaded from a key directory."""

    keydir: Path
    repo: str
    expiry: Expiry
    signers: dict[str, list[Signer]]
    thresholds: dict[str, int]
    files: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, keydir: Path) -> KeyRing:
        """Load every role's signers from ``keydir``.

        Raises:
            TrustConfigError: ``keys.json`` or a key file is missing, unreadable,
                malformed, or a key does not match its recorded keyid.
        """
        index = _read_index(keydir)
        signers: dict[str, list[Signer]] = {}
        thresholds: dict[str, int] = {}
        files: dict[str, list[str]] = {}
        try:
            repo = index["repo"]
            expiry = Expiry.from_dict(index["expiry"])
            for role in ROLES:
                entry = index["roles"][role]
                thresholds[role] = int(entry["threshold"])
                files[role] = [k["file"] for k in entry["keys"]]
                signers[role] = [
                    _load_signer(keydir / k["file"], k["keyid"]) for k in entry["keys"]
                ]
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustConfigError(f"{keydir / INDEX}: malformed ({exc!r})") from exc
        for role in ROLES:
            if len(signers[role]) < thresholds[role] or thresholds[role] < 1:
                raise TrustConfigError(
                    f"{keydir / INDEX}: role {role} has {len(signers[role])} keys "
                    f"for threshold {thresholds[role]}"
                )
        return cls(keydir, repo, expiry, signers, thresholds, files)

    def keyids(self, role: str) -> list[str]:
        return [s.public_key.keyid for s in self.signers[role]]

    def sign(self, md: Metadata[Any], role: str) -> None:
        """Sign ``md`` with every key of ``role`` (replacing older signatures)."""
        md.signatures.clear()
        for signer in self.signers[role]:
            md.sign(signer, append=True)

    def root_bytes(self) -> bytes:
        """The key directory's newest root metadata.

        Raises:
            TrustConfigError: ``root.json`` is missing or unreadable.
        """
        path = self.keydir / ROOT_FILE
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TrustConfigError(f"cannot read {path}: {exc.strerror}") from exc


def init_keys(
    keydir: Path,
    repo: str,
    *,
    root_keys: int = 1,
    root_threshold: int = 1,
    expiry: Expiry | None = None,
) -> Path:
    """Create a key directory for ``repo`` and its version-1 root metadata.

    One Ed25519 key per role, ``root_keys`` for root with ``root_threshold``
    of them required.  The root is signed by all root keys and uses consistent
    snapshots.  Returns the path of ``keydir/root.json``.

    Raises:
        TrustConfigError: bad repo name or threshold, or ``keydir`` already
            holds keys (it is never overwritten), or it cannot be written.
    """
    validate_repo_name(repo)
    if root_keys < 1 or not 1 <= root_threshold <= root_keys:
        raise TrustConfigError(
            f"root threshold {root_threshold} must be between 1 and the number "
            f"of root keys ({root_keys})"
        )
    expiry = expiry or Expiry()
    if keydir.exists() and (
        (keydir / INDEX).exists() or (keydir / ROOT_FILE).exists() or any(keydir.glob("*.pem"))
    ):
        raise TrustConfigError(f"{keydir} already holds keys: refusing to overwrite them")
    try:
        keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keydir.chmod(0o700)
        roles_index: dict[str, Any] = {}
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            count = root_keys if role == "root" else 1
            signers[role] = [CryptoSigner.generate_ed25519() for _ in range(count)]
            roles_index[role] = {
                "threshold": root_threshold if role == "root" else 1,
                "keys": [
                    {"keyid": s.public_key.keyid, "file": write_private_key(keydir, role, s)}
                    for s in signers[role]
                ],
            }
        now = datetime.now(UTC)
        root = Root(version=1, expires=expires_at(now, expiry.root), consistent_snapshot=True)
        for role in ROLES:
            for signer in signers[role]:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        md = Metadata(root)
        for signer in signers["root"]:
            md.sign(signer, append=True)
        root_path = keydir / ROOT_FILE
        write_file_atomic(root_path, md.to_bytes(JSONSerializer(compact=False)))
        write_index(
            keydir,
            {
                "format": FORMAT,
                "repo": repo,
                "expiry": expiry.to_dict(),
                "roles": roles_index,
                "retired": [],
            },
        )
    except OSError as exc:
        raise TrustConfigError(f"cannot write key directory {keydir}: {exc}") from exc
    return root_path


def write_private_key(keydir: Path, role: str, signer: CryptoSigner) -> str:
    """Write ``signer``'s private key as ``<role>-<keyid16>.pem`` (mode 0600).

    Raises:
        OSError: the file exists or cannot be written.
    """
    name = f"{role}-{signer.public_key.keyid[:16]}.pem"
    fd = os.open(keydir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
        f.flush()
        os.fsync(f.fileno())
    return name


def write_index(keydir: Path, index: Mapping[str, Any]) -> None:
    """Replace ``keys.json`` atomically. Raises: OSError."""
    data = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
    write_file_atomic(keydir / INDEX, data, mode=0o600)


def read_index(keydir: Path) -> dict[str, Any]:
    """Raises: TrustConfigError: ``keys.json`` is missing or not JSON."""
    return _read_index(keydir)


def _read_index(keydir: Path) -> dict[str, Any]:
    path = keydir / INDEX
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise TrustConfigError(f"{path} is missing: not a key directory (run init)") from exc
    except OSError as exc:
        raise TrustConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise TrustConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrustConfigError(f"{path}: unsupported key index format")
    return data


def _load_signer(path: Path, keyid: str) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise TrustConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        private_key = load_pem_private_key(pem, None)
        signer = CryptoSigner(private_key)
    except (ValueError, TypeError) as exc:
        raise TrustConfigError(f"key file {path} is not an unencrypted private key") from exc
    if signer.public_key.keyid != keyid:
        raise TrustConfigError(f"key file {path} does not hold key {keyid}")
    return signer
