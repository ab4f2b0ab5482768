"""An in-memory TUF repository that is also a python-tuf fetcher.

Modelled on python-tuf's ``tests/repository_simulator.py``: tests edit the
metadata objects (``root``, ``timestamp``, ``snapshot``, ``targets``), call
:meth:`publish` / :meth:`publish_root`, and may replace what is served for any
file name through ``overrides`` to play an attacker or a broken mirror.  No
network: ``_fetch`` serves bytes from dictionaries and raises 404 for the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import DownloadError, DownloadHTTPError
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
from tuf.ngclient import FetcherInterface

METADATA_URL = "https://origin.test/repo/metadata/"
TARGETS_URL = "https://origin.test/repo/targets/"
ROLES = ("root", "timestamp", "snapshot", "targets")


def _count(role: str, root_keys: int) -> int:
    return root_keys if role == "root" else 1


class RepositorySimulator(FetcherInterface):
    def __init__(self, *, root_keys: int = 1, root_threshold: int = 1) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        self.expiry = now + timedelta(days=1)
        self.signers: dict[str, list[Signer]] = {
            role: [
                CryptoSigner.generate_ed25519() for _ in range(root_keys if role == "root" else 1)
            ]
            for role in ROLES
        }
        self.root = Root(expires=self.expiry, consistent_snapshot=True)
        for role in ROLES:
            for signer in self.signers[role]:
                self.root.add_key(signer.public_key, role)
        self.root.roles["root"].threshold = root_threshold
        self.timestamp = Timestamp(expires=self.expiry)
        self.snapshot = Snapshot(expires=self.expiry)
        self.targets = Targets(expires=self.expiry)
        self.meta_hashes = True  # put length+hashes in snapshot/timestamp meta
        self.signed_roots: list[bytes] = []
        self.snapshots: dict[int, bytes] = {}
        self.targets_versions: dict[int, bytes] = {}
        self.timestamp_bytes = b""
        self.target_files: dict[str, bytes] = {}  # "<sha256>.<name>" -> content
        self.overrides: dict[str, bytes] = {}  # metadata file name -> bytes served
        self.offline = False
        self.fetched: list[str] = []
        self._previous_root_signers: list[Signer] = []
        self.publish_root()
        self.publish()

    # -- publishing ----------------------------------------------------------

    def sign(
        self,
        md: Metadata[Root] | Metadata[Timestamp] | Metadata[Snapshot] | Metadata[Targets],
        signers: list[Signer],
    ) -> bytes:
        for signer in signers:
            md.sign(signer, append=True)
        return md.to_bytes(JSONSerializer())

    def publish_root(self, signers: list[Signer] | None = None) -> bytes:
        """Sign root with the previous and current root keys (or ``signers``)."""
        if signers is None:
            signers = [*self._previous_root_signers, *self.signers["root"]]
        data = self.sign(Metadata(self.root), signers)
        self.signed_roots.append(data)
        self._previous_root_signers = list(self.signers["root"])
        return data

    def targets_bytes(self, signers: list[Signer] | None = None) -> bytes:
        return self.sign(Metadata(self.targets), signers or self.signers["targets"])

    def publish(self, *, targets_signers: list[Signer] | None = None) -> None:
        """Bump and publish targets, snapshot and timestamp."""
        self.targets.version = max(self.targets_versions, default=0) + 1
        data = self.targets_bytes(targets_signers)
        self.targets_versions[self.targets.version] = data
        self.snapshot.meta["targets.json"] = self._meta(self.targets.version, data)
        self.publish_snapshot()

    def publish_snapshot(self) -> None:
        self.snapshot.version = max(self.snapshots, default=0) + 1
        data = self.sign(Metadata(self.snapshot), self.signers["snapshot"])
        self.snapshots[self.snapshot.version] = data
        self.publish_timestamp(self.snapshot.version)

    def publish_timestamp(self, snapshot_version: int) -> None:
        self.timestamp.version += 1
        data = self.snapshots[snapshot_version]
        self.timestamp.snapshot_meta = self._meta(snapshot_version, data)
        self.timestamp_bytes = self.sign(Metadata(self.timestamp), self.signers["timestamp"])

    def add_target(self, name: str, content: bytes) -> TargetFile:
        target = TargetFile.from_data(name, content, ["sha256"])
        self.targets.targets[name] = target
        self.target_files[f"{target.hashes['sha256']}.{name}"] = content
        return target

    def rotate(self, role: str) -> list[Signer]:
        """New keys for ``role`` in root version+1; returns the retired signers."""
        old = self.signers[role]
        for signer in old:
            self.root.revoke_key(signer.public_key.keyid, role)
        self.signers[role] = [CryptoSigner.generate_ed25519() for _ in old]
        for signer in self.signers[role]:
            self.root.add_key(signer.public_key, role)
        self.root.version += 1
        self.publish_root()
        return old

    def _meta(self, version: int, data: bytes) -> MetaFile:
        if self.meta_hashes:
            return MetaFile.from_data(version, data, ["sha256"])
        return MetaFile(version)

    # -- serving -------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.fetched.append(url)
        if self.offline:
            raise DownloadError(f"connection refused: {url}")
        if url.startswith(TARGETS_URL):
            content = self.target_files.get(url.removeprefix(TARGETS_URL))
            if content is None:
                raise DownloadHTTPError(f"not found: {url}", 404)
            return iter([content])
        name = url.removeprefix(METADATA_URL)
        if name in self.overrides:
            return iter([self.overrides[name]])
        data = self._metadata(name)
        if data is None:
            raise DownloadHTTPError(f"not found: {url}", 404)
        return iter([data])

    def _metadata(self, name: str) -> bytes | None:
        if name == "timestamp.json":
            return self.timestamp_bytes
        version, _, rest = name.partition(".")
        if not version.isdigit():
            return None
        n = int(version)
        if rest == "root.json":
            return self.signed_roots[n - 1] if 0 < n <= len(self.signed_roots) else None
        if rest == "snapshot.json":
            return self.snapshots.get(n)
        if rest == "targets.json":
            return self.targets_versions.get(n)
        return None
