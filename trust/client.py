"""Node side: keep one repository's trusted metadata up to date.

:class:`TrustedRepository` wraps python-tuf's ``ngclient.Updater`` (which
implements the TUF client workflow, spec section 5) over an injected
``FetcherInterface``, so metadata may come from the origin or from any
untrusted peer.  Layout of the local cache ``metadata_dir`` (python-tuf's)::

    root.json              symlink to root_history/<N>.root.json (newest trusted)
    root_history/N.root.json
    timestamp.json snapshot.json targets.json   newest metadata python-tuf accepted
    verified.state         our last *complete* verified state (see below)

``verified.state`` holds the raw timestamp, snapshot and targets of the last
successful refresh in one atomically replaced file: a refresh interrupted
half-way may leave a newer ``timestamp.json`` next to an older snapshot, and
the explicit offline mode (:meth:`TrustedRepository.load_cached`) must still
find one consistent set.  Its name does not end in ``.json`` so tools that
list trusted roles (e.g. tuf-conformance) ignore it.

Offline policy: :meth:`load_cached` re-verifies the root chain, signatures and
cross-role versions/hashes, but *accepts expired metadata* and logs a warning
naming the expired roles.  Rationale: it makes no request, so no attacker can
feed it stale data (the freeze attack needs a feed); the state was current
when it was verified; a node whose origin is down keeps serving the release it
already trusted rather than none.  :meth:`refresh` never accepts expired data.

Refresh policy: :meth:`TrustedRepository.refresh_or_cached` is the one
place that decides "refresh, else keep what is trusted, else use what is
cached", and says which happened in a :class:`RefreshOutcome`; the node, the
mount and the image commands all use it.

Sources: metadata comes through a python-tuf ``FetcherInterface`` by URL, or
(:meth:`TrustedRepository.from_source`) from a :class:`MetadataSource` that
is asked by file name and chooses its own servers (the peer exchange); the
adapter to python-tuf's URLs is private to this module.

Invariants: the trusted state only ever changes to a fully verified newer
state; a failed refresh leaves the previous state in place.  All public
methods are serialised by a lock and may be called from any thread.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib import parse

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig, Urllib3Fetcher

from trust.exceptions import (
    MetadataFormatError,
    TrustConfigError,
    TrustError,
    TrustTransportError,
    VerificationError,
)
from trust.keys import write_file_atomic
from trust.targets import (
    ImageTarget,
    ReleaseTarget,
    image_target_name,
    images_of,
    releases_of,
    tags_of,
)
from trust.verify import (
    VerifiedState,
    map_download_error,
    map_repository_error,
    screen_metadata,
    verify_root_chain,
    verify_top_level,
)

logger = logging.getLogger(__name__)

STATE_FILE = "verified.state"
_ROLES = ("timestamp", "snapshot", "targets")
_METADATA_NAME = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?(root|timestamp|snapshot|targets)\.json$")


class _NamingFetcher(FetcherInterface):
    """Remembers which metadata file python-tuf asked for last, so that an
    error about bad data names the file (python-tuf's own messages, such as
    "Failed to deserialize JSON", do not)."""

    def __init__(self, inner: FetcherInterface) -> None:
        self._inner = inner
        self.last: str | None = None

    def fetch(self, url: str) -> Iterator[bytes]:
        # The inner fetcher's own entry point: it decides which of its errors
        # are transport failures (python-tuf's default wraps all of them).
        self.last = url.rpartition("/")[2]
        return self._inner.fetch(url)

    def _fetch(self, url: str) -> Iterator[bytes]:  # abstract in FetcherInterface
        return self.fetch(url)


class MetadataSource(Protocol):
    """Top-level metadata files by name (``timestamp.json``, ``N.root.json``,
    ``N.snapshot.json``, ``N.targets.json``), from wherever the source
    chooses.  Nothing it returns is trusted: python-tuf verifies it.  Raises
    python-tuf's ``DownloadError`` (``DownloadHTTPError`` 404: nobody has the
    file) or ``RepositoryError`` (every answer was bad data)."""

    def fetch_metadata(self, name: str) -> bytes: ...


# python-tuf asks for metadata by URL; a MetadataSource is asked by name.
# This base is only ever seen by _SourceFetcher, which strips it again.
_BY_NAME = "metadata-by-name:/"


class _SourceFetcher(FetcherInterface):
    """A :class:`MetadataSource` as python-tuf's fetcher."""

    def __init__(self, source: MetadataSource) -> None:
        self._source = source

    def fetch(self, url: str) -> Iterator[bytes]:
        # python-tuf's fetch() wraps every error but a DownloadError as a
        # transport failure: a source's verdict on the data (RepositoryError,
        # every answer was bad) must reach the Updater as one.
        try:
            return self._fetch(url)
        except (tuf_exc.DownloadError, tuf_exc.RepositoryError):
            raise
        except Exception as exc:
            raise tuf_exc.DownloadError(f"Failed to download {url}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        return iter([self._source.fetch_metadata(url.removeprefix(_BY_NAME))])


class Freshness(StrEnum):
    """What :meth:`TrustedRepository.refresh_or_cached` could do."""

    REFRESHED = "refreshed"  # verified the newest metadata just now
    KEPT = "kept"  # the refresh failed; the state trusted before stays
    CACHED = "cached"  # the refresh failed; the last verified state on disk is used
    NONE = "none"  # the refresh failed and nothing verified is cached


@dataclass(frozen=True)
class RefreshOutcome:
    """The result of :meth:`TrustedRepository.refresh_or_cached`."""

    freshness: Freshness
    error: TrustError | None = None  # why the refresh failed
    cached_error: TrustError | None = None  # why no cached state was usable (NONE)

    @property
    def usable(self) -> bool:
        """Is there a trusted state to read?"""
        return self.freshness is not Freshness.NONE

    @property
    def unreachable(self) -> bool:
        """Did the refresh fail for want of a transport (not bad data)?"""
        return isinstance(self.error, TrustTransportError)


class UnknownTargetError(TrustConfigError):
    """The verified targets do not list the requested target."""


@dataclass(frozen=True)
class RoleSigners:
    """Who signed the trusted metadata of one role (for a site's key pins).

    ``signed`` holds only keys the trusted root delegates the role to and whose
    signature over the trusted metadata verifies; it has at least
    ``threshold`` members, or the metadata would not be trusted.
    """

    role: str
    version: int
    threshold: int
    authorized: frozenset[str]  # keyids the trusted root names for the role
    signed: frozenset[str]  # the authorized keyids with a valid signature


class TrustedRepository:
    """Verified view of one TUF repository, refreshed on demand.

    Args:
        metadata_dir: the node's local cache for this repository.
        metadata_url: base URL of the repository's metadata directory; files
            are fetched as ``<metadata_url><name>`` (``N.root.json``,
            ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``).
        fetcher: transport (python-tuf ``FetcherInterface``); ``None`` means
            python-tuf's urllib3 fetcher.
        trusted_root: out-of-band root bytes; used as the trust anchor when
            given (newer cached roots are re-verified from it), and installed
            into an empty cache.
        config: python-tuf ``UpdaterConfig`` (maximum lengths, root rotations).
        clock: current time for the offline expiry report (tests); python-tuf's
            own checks in :meth:`refresh` always use the system clock.
        label: names the repository in log messages (default: ``metadata_url``).

    Raises:
        TrustConfigError: no cached root and no ``trusted_root``, or the root
            cannot be parsed or is not self-signed, or the cache is unwritable.
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        *,
        fetcher: FetcherInterface | None = None,
        trusted_root: bytes | None = None,
        config: UpdaterConfig | None = None,
        clock: Callable[[], datetime] | None = None,
        label: str | None = None,
    ) -> None:
        self._dir = metadata_dir
        self._label = label or metadata_url
        self._url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        self._fetcher = fetcher or Urllib3Fetcher()
        self._config = config or UpdaterConfig()
        self._lock = threading.Lock()
        self._state: VerifiedState | None = None
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            metadata_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrustConfigError(f"cannot create {metadata_dir}: {exc}") from exc
        root_path = metadata_dir / "root.json"
        if trusted_root is None:
            try:
                trusted_root = root_path.read_bytes()
            except FileNotFoundError as exc:
                raise TrustConfigError(
                    f"{metadata_dir} holds no root.json and no trusted root was given"
                ) from exc
            except OSError as exc:
                raise TrustConfigError(f"cannot read {root_path}: {exc}") from exc
        try:
            verify_root_chain(trusted_root, ())
        except VerificationError as exc:
            raise TrustConfigError(f"the trusted root is unusable: {exc}") from exc
        self._trusted_root = trusted_root
        if not root_path.exists():
            try:
                write_file_atomic(root_path, trusted_root)
            except OSError as exc:
                raise TrustConfigError(f"cannot install root in {metadata_dir}: {exc}") from exc

    @classmethod
    def from_source(
        cls,
        metadata_dir: Path,
        source: MetadataSource,
        *,
        label: str,
        trusted_root: bytes | None = None,
        config: UpdaterConfig | None = None,
    ) -> TrustedRepository:
        """A verified view whose metadata comes from ``source`` by file name.

        Raises:
            TrustConfigError: as the constructor.
        """
        return cls(
            metadata_dir,
            _BY_NAME,
            fetcher=_SourceFetcher(source),
            trusted_root=trusted_root,
            config=config,
            label=label,
        )

    # -- updating ------------------------------------------------------------

    def refresh_or_cached(self) -> RefreshOutcome:
        """Refresh; if that fails, keep the state trusted now, or when there
        is none yet, fall back to the last verified state on disk
        (:meth:`load_cached`, the offline policy of the module docstring).

        Never raises a :class:`TrustError`: the outcome says what happened and
        why; a caller that must not go on after bad data checks
        ``outcome.error``.
        """
        try:
            self.refresh()
        except TrustError as exc:
            error = exc
        else:
            return RefreshOutcome(Freshness.REFRESHED)
        with self._lock:
            trusted_now = self._state is not None
        if trusted_now:
            return RefreshOutcome(Freshness.KEPT, error)
        try:
            self.load_cached()
        except TrustError as cached:
            return RefreshOutcome(Freshness.NONE, error, cached)
        return RefreshOutcome(Freshness.CACHED, error)

    def refresh(self) -> None:
        """Run the TUF client workflow: root chain, timestamp, snapshot, targets.

        Raises:
            VerificationError: a subclass naming the attack or defect
                (SignatureError, RollbackError, ExpiredMetadataError,
                HashMismatchError, OversizedDataError, MetadataFormatError);
                the previous trusted state is kept.
            TrustTransportError: metadata could not be fetched.
            TrustConfigError: the local cache cannot be read or written.
        """
        with self._lock:
            self._run(lambda updater: updater.refresh())
            self._state = self._adopt_cache()

    def load_cached(self) -> None:
        """Trust the last state verified by :meth:`refresh`, without network.

        Signatures, the root chain and cross-role consistency are verified
        again; expired metadata is accepted with a warning (module docstring).

        Raises:
            TrustConfigError: no complete verified state is cached.
            VerificationError: the cached state fails verification.
        """
        with self._lock:
            try:
                raw = json.loads((self._dir / STATE_FILE).read_bytes())
                docs = [raw[role].encode() for role in _ROLES]
            except FileNotFoundError as exc:
                raise TrustConfigError(
                    f"no verified metadata cached in {self._dir}: refresh once online"
                ) from exc
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TrustConfigError(f"{self._dir / STATE_FILE} is unreadable: {exc}") from exc
            state = verify_top_level(self._root(), *docs, now=self._clock())
            if state.expired:
                logger.warning(
                    "offline: using cached metadata of %s although %s expired; "
                    "it will not be refreshed until the repository is reachable",
                    self._label,
                    ", ".join(state.expired),
                )
            self._state = state

    def download_target(self, name: str, target_base_url: str, target_dir: Path) -> Path:
        """Refresh, then fetch target ``name`` into ``target_dir`` and verify it.

        The file is named by the URL-quoted target path; an existing file
        with the right length and hashes is not fetched again.  Delegated
        targets roles are followed.  With consistent snapshots the URL is
        ``<target_base_url><dir>/<sha256>.<basename>``.

        Raises:
            UnknownTargetError: no role lists ``name``.
            VerificationError: metadata or the target fail verification.
            TrustTransportError: a download failed.
            TrustConfigError: local files cannot be written.
        """
        with self._lock:
            path = target_dir / parse.quote(name, "")

            def fetch(updater: Updater) -> None:
                info = updater.get_targetinfo(name)
                if info is None:
                    raise UnknownTargetError(f"no target named {name!r}")
                if updater.find_cached_target(info, str(path)) is None:
                    updater.download_target(info, str(path), target_base_url)

            target_dir.mkdir(parents=True, exist_ok=True)
            self._run(fetch)
            self._state = self._adopt_cache()
            return path

    def screen(self, name: str, data: bytes) -> int:
        """Check a candidate metadata file from an untrusted source before it
        is chosen: ``data`` must be the role ``name`` names, signed by a
        threshold of the trusted keys for it (a ``K.root.json`` by root
        ``K-1``'s root keys), and a versioned name must match its version.
        Returns the version.

        For fetchers that ask several mirrors (the peer exchange): a forged
        candidate is dropped here and the next one tried, instead of failing
        the whole refresh.  Safe to call from the fetcher during
        :meth:`refresh` (it takes no lock; roots python-tuf has accepted so
        far are read from ``root_history``).  A ``K.root.json`` whose
        predecessor is not known yet is only parsed; python-tuf verifies it.

        Raises:
            MetadataFormatError: not metadata of that role, or the wrong version.
            SignatureError: not signed by a threshold of the trusted keys.
            TrustConfigError: ``name`` is not a top-level metadata file name.
        """
        m = _METADATA_NAME.match(name)
        if m is None:
            raise TrustConfigError(f"{name!r} is not a top-level metadata file name")
        role, number = m.group(2), m.group(1)
        try:
            delegator = self._root()
            if role == "root" and number is not None and delegator.version != int(number) - 1:
                prior = self._dir / "root_history" / f"{int(number) - 1}.root.json"
                try:
                    delegator = verify_root_chain(prior.read_bytes(), ())
                except OSError:  # python-tuf has not reached its predecessor yet
                    delegator = verify_root_chain(data, ())
            version = screen_metadata(delegator, role, data)
            if number is not None and version != int(number):
                raise MetadataFormatError(f"holds version {version}")
        except VerificationError as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        return version

    # -- reading -------------------------------------------------------------

    def targets(self) -> dict[str, TargetFile]:
        """All targets of the top-level targets role (a copy).

        Raises:
            TrustConfigError: nothing verified yet (call refresh or load_cached).
        """
        with self._lock:
            return dict(self._current().targets.targets)

    def releases(self) -> list[ReleaseTarget]:
        """Every revision, oldest first.

        Raises:
            MetadataFormatError: a revision target is malformed.
            TrustConfigError: nothing verified yet.
        """
        return releases_of(self.targets())

    def latest_release(self) -> ReleaseTarget | None:
        """The highest revision, or None if the repository has none.

        Raises:
            MetadataFormatError: a revision target is malformed.
            TrustConfigError: nothing verified yet.
        """
        releases = self.releases()
        return releases[-1] if releases else None

    def tags(self) -> dict[str, ReleaseTarget]:
        """Every tag by name.

        Raises:
            MetadataFormatError: a tag target is malformed.
            TrustConfigError: nothing verified yet.
        """
        return tags_of(self.targets())

    def images(self) -> list[ImageTarget]:
        """Every signed VM image (``images/<name>/<version>``), by name.

        Raises:
            MetadataFormatError: an image target is malformed.
            TrustConfigError: nothing verified yet.
        """
        return images_of(self.targets())

    def image(self, name: str, version: str) -> ImageTarget | None:
        """The signed image ``name`` ``version``, or None if not listed.

        Raises:
            MetadataFormatError: the image target is malformed.
            TrustConfigError: nothing verified yet.
        """
        target = self.targets().get(image_target_name(name, version))
        return None if target is None else ImageTarget.from_target_file(target)

    def signers(self, role: str = "targets") -> RoleSigners:
        """The keys whose signatures on the trusted ``role`` metadata verify.

        The signatures are not kept in memory, so they are read back from
        ``verified.state`` (written together with the trusted state) and that
        document must be the trusted one: another process refreshing the same
        cache in between makes this raise rather than answer for other data.

        Raises:
            TrustConfigError: nothing verified yet, ``role`` is not timestamp,
                snapshot or targets, or the cached state is unreadable or no
                longer the trusted one (refresh or load_cached again).
        """
        if role not in _ROLES:
            raise TrustConfigError(f"no signers for role {role!r}: one of {', '.join(_ROLES)}")
        with self._lock:
            state = self._current()
            trusted = {"timestamp": state.timestamp, "snapshot": state.snapshot}.get(
                role, state.targets
            )
            path = self._dir / STATE_FILE
            try:
                md: Metadata[Any] = Metadata.from_bytes(
                    json.loads(path.read_bytes())[role].encode()
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TrustConfigError(f"{path} is unreadable: {exc}") from exc
            except tuf_exc.RepositoryError as exc:
                raise TrustConfigError(f"{path} is malformed: {exc}") from exc
            if md.signed != trusted:
                raise TrustConfigError(
                    f"{path} changed since it was verified (another process refreshed "
                    "the cache): refresh or load_cached again"
                )
            result = state.root.get_verification_result(role, md.signed_bytes, md.signatures)
            return RoleSigners(
                role=role,
                version=trusted.version,
                threshold=result.threshold,
                authorized=frozenset(result.signed) | frozenset(result.unsigned),
                signed=frozenset(result.signed),
            )

    @property
    def targets_version(self) -> int:
        """Version of the trusted targets metadata (0 before any verification)."""
        with self._lock:
            return 0 if self._state is None else self._state.targets.version

    def expires(self) -> dict[str, float]:
        """Each trusted role's expiry, epoch seconds (empty before any verification)."""
        with self._lock:
            if self._state is None:
                return {}
            state = self._state
            signed = (state.root, state.timestamp, state.snapshot, state.targets)
            return {s.type: s.expires.timestamp() for s in signed}

    def expired_roles(self) -> tuple[str, ...]:
        """Roles of the trusted state that are expired now (offline mode only)."""
        with self._lock:
            if self._state is None:
                return ()
            now = self._clock()
            state = self._state
            signed = (state.root, state.timestamp, state.snapshot, state.targets)
            return tuple(s.type for s in signed if s.is_expired(now))

    # -- internals -----------------------------------------------------------

    def _current(self) -> VerifiedState:
        if self._state is None:
            raise TrustConfigError("no verified metadata yet: call refresh() or load_cached()")
        return self._state

    def _run(self, action: Callable[[Updater], None]) -> None:
        """Run ``action`` on a fresh Updater (python-tuf allows one refresh per
        Updater), mapping python-tuf's errors at this boundary."""
        fetcher = _NamingFetcher(self._fetcher)
        try:
            updater = Updater(
                str(self._dir),
                self._url,
                fetcher=fetcher,
                config=self._config,
                bootstrap=self._trusted_root,
            )
            action(updater)
        except tuf_exc.RepositoryError as exc:
            raise map_repository_error(exc, fetcher.last) from exc
        except tuf_exc.DownloadError as exc:
            raise map_download_error(exc) from exc
        except OSError as exc:
            raise TrustConfigError(f"local metadata cache {self._dir}: {exc}") from exc

    def _root(self) -> Root:
        """The newest root reachable from the trust anchor through the cache."""
        history = self._dir / "root_history"
        anchor = verify_root_chain(self._trusted_root, ())
        newer: list[bytes] = []
        version = anchor.version + 1
        while (path := history / f"{version}.root.json").exists():
            newer.append(path.read_bytes())
            version += 1
        return verify_root_chain(self._trusted_root, newer)

    def _adopt_cache(self) -> VerifiedState:
        """Re-verify what the Updater just accepted and record it as the last
        complete state (``verified.state``)."""
        try:
            docs = [(self._dir / f"{role}.json").read_bytes() for role in _ROLES]
        except OSError as exc:
            raise TrustConfigError(f"local metadata cache {self._dir}: {exc}") from exc
        # the system clock, as python-tuf's checks in the Updater just used
        state = verify_top_level(self._root(), *docs, now=datetime.now(UTC))
        if state.expired:  # the Updater refuses expired data; be explicit anyway
            raise VerificationError(f"expired after refresh: {', '.join(state.expired)}")
        record = {role: doc.decode() for role, doc in zip(_ROLES, docs, strict=True)}
        try:
            write_file_atomic(self._dir / STATE_FILE, json.dumps(record).encode())
        except OSError as exc:
            raise TrustConfigError(f"cannot write {self._dir / STATE_FILE}: {exc}") from exc
        return state
