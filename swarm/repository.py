"""Open one repository: the one place its parts are wired together.

Like CernVM-FS's ``MountPoint``, :func:`open_repository` builds a mounted
repository from its parts, and every caller (the node daemon, ``swarm
mount``) uses it; :func:`open_trusted` builds only the trusted-metadata part
(the image commands, and :func:`open_repository` itself):

* metadata: an :class:`swarm.exchange.ExchangeFetcher` (the origin, then the
  peers ``peers()`` names, none for ``swarm mount``), whose candidates are
  screened against the trusted root before one is chosen, under a
  :class:`trust.client.TrustedRepository` in ``metadata_dir``;
* objects: the caller's object source (the node's swarm-then-origin source,
  or the origin alone);
* the verified object cache under ``cache_dir``, waiting on the caller's
  :class:`cvmfs_like.cache.FetchGate` (the node: one gate for all its
  repositories, as one mount serves them; ``swarm mount``: one per mount);
* the :class:`cvmfs_like.mounted.MountedRelease` over them, with its start
  profiles in ``cache_dir/profiles`` (:mod:`cvmfs_like.start_profile`)
  unless the caller's settings turn them off.

Who refreshes: ``refreshes=True`` lets the mounted release refresh the
metadata itself (``swarm mount``); the node refreshes it in its follower
before it follows a revision's torrent.  The policy "refresh, else keep,
else use what is cached" is :meth:`TrustedRepository.refresh_or_cached`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvmfs_like.cache import FetchGate, ObjectCache
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.objects import ObjectSource
from cvmfs_like.start_profile import ProfileSettings, ProfileStore, StartProfiles
from swarm.exchange import ExchangeFetcher
from swarm.http_get import Transport
from trust.client import TrustedRepository


@dataclass(frozen=True)
class RepositorySpec:
    """What opening a repository needs to know of it."""

    name: str
    origin: str | None  # base URL of the store, or None (peers only / offline)
    trusted_root: bytes  # the out-of-band root (trust anchor)
    metadata_dir: Path  # the local TUF metadata cache
    fetch_timeout: float  # seconds for one GET (metadata, torrents, objects)


@dataclass
class OpenRepository:
    """One repository, opened (see the module docstring)."""

    name: str
    trusted: TrustedRepository
    fetcher: ExchangeFetcher
    cache: ObjectCache
    mounted: MountedRelease


_PROFILES_ON = ProfileSettings()


def _no_peers() -> list[str]:
    return []


def open_trusted(
    spec: RepositorySpec,
    *,
    peers: Callable[[], list[str]] = _no_peers,
    transport: Transport | None = None,
) -> tuple[TrustedRepository, ExchangeFetcher]:
    """The repository's trusted metadata and the fetcher it comes through
    (also the fetcher of its ``.torrent`` files).  Nothing is fetched yet.

    Raises:
        trust.exceptions.TrustConfigError: the trusted root is unusable or
            ``metadata_dir`` cannot be written.
    """
    fetcher = ExchangeFetcher(
        spec.name, spec.origin, peers, timeout=spec.fetch_timeout, transport=transport
    )
    trusted = TrustedRepository.from_source(
        spec.metadata_dir, fetcher, label=spec.name, trusted_root=spec.trusted_root
    )
    fetcher.screen = trusted.screen  # candidates are verified before one is chosen
    return trusted, fetcher


def open_repository(
    spec: RepositorySpec,
    objects: ObjectSource,
    *,
    cache_dir: Path,
    quota: int,
    gate: FetchGate,
    tag: str | None = None,
    peers: Callable[[], list[str]] = _no_peers,
    refreshes: bool = True,
    transport: Transport | None = None,
    start_profile: ProfileSettings = _PROFILES_ON,
) -> OpenRepository:
    """Wire the repository's parts (module docstring).  Nothing is fetched
    yet: ``mounted.start()`` loads the first revision.  ``transport`` makes
    the metadata and torrent GETs (default: a keep-alive HTTPClient).

    Raises:
        trust.exceptions.TrustConfigError: the trusted root is unusable or
            ``metadata_dir`` cannot be written.
        cvmfs_like.exceptions.StoreError: the cache directory is unusable.
    """
    trusted, fetcher = open_trusted(spec, peers=peers, transport=transport)
    cache = ObjectCache(cache_dir, quota, gate=gate)
    profiles = None
    if start_profile.enabled:
        store = ProfileStore(cache_dir / "profiles", kept=start_profile.kept)
        profiles = StartProfiles(store, start_profile, quota=quota)
    mounted = MountedRelease(
        spec.name, trusted, objects, cache, tag=tag, refreshes=refreshes, profiles=profiles
    )
    return OpenRepository(spec.name, trusted, fetcher, cache, mounted)
