"""Following one repository: refresh its metadata, follow the revision it
names, follow its images.  One :class:`Follower` per followed repository.

A refresh runs three phases in order (:data:`PHASES`): ``metadata``
(:meth:`trust.client.TrustedRepository.refresh_or_cached`), ``revision``
(the wanted revision's verified torrent, then its catalog in the mount) and
``images`` (the signed VM images the site policy accepts).  Each phase keeps
its own error (:attr:`Follower.errors`), so a later phase's failure never
hides an earlier one's; what a failure means is data in :data:`RULES`: which
errors the phase reports instead of raising, whether the next phases still
run, and whether the node retries soon (back-off from 2 s) rather than after
``refresh_interval``.  A failed phase leaves what was served before in place.

Trust: a revision is used only through a verified TUF target; its torrent is
fetched by the SHA-256 the target names and must have the signed info-hash;
an image's torrent must carry the signed merkle root, and an image is shown
only if the site policy accepts its publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions

from cvmfs_like.cache import ObjectCache
from cvmfs_like.exceptions import ReleaseError
from cvmfs_like.mounted import MountedRelease
from swarm.config import RepositoryConfig
from swarm.exceptions import SwarmError, TransferError
from swarm.exchange import ExchangeFetcher
from swarm.layout import RepositoryURLs
from swarm.metrics import FetchMeters
from swarm.reads import Holding, LoopBridge, NodeImage, SwarmObjectSource
from swarm.release_torrent import TorrentRef
from swarm.status import CacheStats, RepositoryStatus, RevisionReport
from swarm.transfer import TorrentMeta, TransferSession
from trust.client import TrustedRepository
from trust.exceptions import TrustError
from trust.policy import ImagePolicy
from trust.targets import ImageTarget, ReleaseTarget

log = logging.getLogger(__name__)

TorrentParser = Callable[[bytes], TorrentMeta]


class Phase(StrEnum):
    METADATA = "metadata"
    REVISION = "revision"
    IMAGES = "images"


@dataclass(frozen=True)
class PhaseRule:
    """What a failure of one phase means."""

    catches: tuple[type[Exception], ...]  # reported as the phase's error, not raised
    retry_soon: bool  # the node retries on its back-off, not after refresh_interval
    stops: bool  # a caught error stops the phases after it
    log_level: int = logging.ERROR


PHASES = (Phase.METADATA, Phase.REVISION, Phase.IMAGES)
RULES: dict[Phase, PhaseRule] = {
    # Metadata errors are returned, never raised (refresh_or_cached); the
    # next phases run on the state kept or cached, if there is one.
    # A warning: the node keeps serving what it trusts, and retries soon.
    Phase.METADATA: PhaseRule((), retry_soon=True, stops=True, log_level=logging.WARNING),
    Phase.REVISION: PhaseRule((SwarmError, ReleaseError, TrustError), False, False),
    Phase.IMAGES: PhaseRule((SwarmError, TrustError), False, False),
}


@dataclass
class FollowContext:
    """What every follower of one node shares."""

    session: TransferSession
    parse_torrent: TorrentParser
    image_policy: ImagePolicy | None
    bridge: LoopBridge
    fetch_timeout: float
    show_repository: Callable[[str, MountedRelease], None]  # first revision loaded
    invalidate: Callable[[list[bytes]], None]  # paths whose kernel cache is stale
    images_changed: Callable[[], None]
    meters: FetchMeters = field(default_factory=FetchMeters)  # fetch latencies (swarm.metrics)


@dataclass
class Follower:
    """One followed repository on this node (module docstring)."""

    cfg: RepositoryConfig
    dir: Path
    trusted: TrustedRepository
    fetcher: ExchangeFetcher
    cache: ObjectCache
    source: SwarmObjectSource
    mounted: MountedRelease
    ctx: FollowContext
    started: bool = False
    last_refresh: float | None = None  # epoch seconds, for status
    errors: dict[Phase, str] = field(default_factory=dict)  # of the last refresh
    revision_torrents: dict[int, str] = field(default_factory=dict)  # revision -> info_hash
    images: dict[tuple[str, str], NodeImage] = field(default_factory=dict)
    refused_images: dict[str, str] = field(default_factory=dict)  # "name/version" -> why

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def last_error(self) -> str | None:
        """Every failed phase's error of the last refresh, in phase order."""
        return "; ".join(self.errors[p] for p in PHASES if p in self.errors) or None

    @property
    def retry_soon(self) -> bool:
        """Did a phase fail whose rule asks for a retry on the back-off?"""
        return any(RULES[p].retry_soon for p in self.errors)

    # -- reports -------------------------------------------------------------------------

    def status(self) -> RepositoryStatus:
        current = self.mounted.current.release if self.started else None
        return RepositoryStatus(
            name=self.name,
            origin=self.cfg.origin,
            policy=self.cfg.policy,
            revision=None if current is None else current.revision,
            catalog=None if current is None else current.catalog,
            published=None if current is None else current.published,
            tag=self.cfg.tag,
            last_refresh=self.last_refresh,
            last_error=self.last_error,
            metadata_from=dict(self.fetcher.last_source),
            source_problems=self.fetcher.scores.report(),
            torrents={str(k): v for k, v in self.revision_torrents.items()},
            objects_from_swarm=self.source.from_swarm,
            objects_from_origin=self.source.from_origin,
            images=sorted(f"{n}/{v}" for n, v in self.images),
            refused_images=dict(self.refused_images),
            cache=CacheStats(**self.cache.stats()),
            metadata_expires=self.trusted.expires(),
            start_profile=self.mounted.start_profile_status(),
        )

    def revisions(self) -> list[RevisionReport]:
        """The signed revisions and tags (none before metadata is trusted)."""
        try:
            releases = self.trusted.releases()
            tags = self.trusted.tags()
        except TrustError:
            return []
        by_rev: dict[int, list[str]] = {}
        for tag, t in tags.items():
            by_rev.setdefault(t.revision, []).append(tag)
        current = self.mounted.current.release.revision if self.started else None
        return [
            RevisionReport(
                revision=r.revision,
                catalog=r.catalog,
                published=r.published,
                files=r.files,
                bytes=r.total_bytes,
                tags=sorted(by_rev.get(r.revision, [])),
                current=r.revision == current,
            )
            for r in releases
        ]

    # -- a refresh -----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Run the phases (module docstring).  Raises nothing a phase's rule
        catches: the error is kept in :attr:`errors` and logged."""
        self.last_refresh = time.time()
        self.errors = {}
        for phase in PHASES:
            if phase is Phase.IMAGES and not self.cfg.images:
                continue
            try:
                error, go_on = await self._run(phase)
            except RULES[phase].catches as exc:
                error, go_on = f"{phase}: {exc}", not RULES[phase].stops
            if error is not None:
                self.errors[phase] = error
                log.log(RULES[phase].log_level, "%s: %s", self.name, error)
            if not go_on:
                return

    async def _run(self, phase: Phase) -> tuple[str | None, bool]:
        """Run one phase: its error text (not raised) or None, and whether
        the next phases can run."""
        if phase is Phase.METADATA:
            outcome = await asyncio.to_thread(self.trusted.refresh_or_cached)
            if outcome.error is None:
                return None, True
            verdict = "unreachable" if outcome.unreachable else "refused"
            error = f"{phase} {verdict}: {outcome.error}"
            if outcome.cached_error is not None:
                error += f"; no cached metadata: {outcome.cached_error}"
            return error, outcome.usable
        if phase is Phase.REVISION:
            await self._follow_release()
        else:
            await self._follow_images()
        return None, True

    # -- the revision --------------------------------------------------------------------

    def _wanted_release(self) -> ReleaseTarget | None:
        if self.cfg.tag is not None:
            return self.trusted.tags().get(self.cfg.tag)
        return self.trusted.latest_release()

    async def _torrent_for(self, ref: TorrentRef, where: str) -> TorrentMeta:
        """The verified torrent ``ref`` names: from this node's copy, the
        origin or a peer."""
        path = self.dir / "torrents" / f"{ref.sha256}.torrent"
        data = b""
        with contextlib.suppress(OSError):
            data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            try:
                data, src = await asyncio.to_thread(
                    self.fetcher.fetch_torrent, ref.sha256, ref.length
                )
            except tuf_exceptions.DownloadError as exc:
                raise TransferError(
                    f"{where}: torrent {ref.sha256[:12]} unavailable: {exc}"
                ) from exc
            log.info(
                "%s: torrent %s from %s",
                self.name,
                ref.sha256[:12],
                src,
                extra={"repository": self.name, "peer": src},
            )
        meta = self.ctx.parse_torrent(data)
        ref.check(data, meta)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return meta

    async def _follow_release(self) -> None:
        release = self._wanted_release()
        if release is None:
            raise ReleaseError("no published revision")
        target = self.trusted.targets().get(f"revisions/{release.revision}")
        ref = TorrentRef.from_custom(
            None if target is None else target.custom, f"revision {release.revision}"
        )
        if ref is not None and release.revision not in self.revision_torrents:
            meta = await self._torrent_for(ref, f"revision {release.revision}")
            origin = self.cfg.origin
            transfer = self.ctx.session.add(
                meta,
                self.dir / "swarm",
                prefetch=self.cfg.policy == "prefetch",
                web_seeds=(origin,) if origin else (),
            )
            index = dict(self.source.index)
            for i, f in enumerate(meta.files):
                if f.path.startswith("data/"):
                    index[f.path.rpartition("/")[2]] = Holding(transfer, i)
            self.source.index = index
            self.revision_torrents[release.revision] = meta.info_hash
        if not self.started:
            await asyncio.to_thread(self.mounted.start)
            self.started = True
            self.ctx.show_repository(self.name, self.mounted)
            return
        result = await asyncio.to_thread(self.mounted.update)
        if result.error:
            raise ReleaseError(result.error)
        if result.changed:
            top = self.name.encode()
            self.ctx.invalidate([top + (b"/" + p if p else b"") for p in result.changed_paths])

    # -- images --------------------------------------------------------------------------

    async def _follow_images(self) -> None:
        kept: dict[tuple[str, str], NodeImage] = {}
        refused: dict[str, str] = {}
        for t in self.trusted.images():
            key = (t.name, t.version)
            if self.ctx.image_policy is not None:
                verdict = self.ctx.image_policy.check(self.name, t, self.trusted)
                if not verdict.accepted:
                    refused[f"{t.name}/{t.version}"] = verdict.reason
                    continue
            if key in self.images:
                kept[key] = self.images[key]
                continue
            kept[key] = await self._add_image(t)
        for key, img in self.images.items():
            if key not in kept:
                self.ctx.session.remove(img.transfer.meta.info_hash)
        self.images = kept
        self.refused_images = refused
        self.ctx.images_changed()

    async def _add_image(self, t: ImageTarget) -> NodeImage:
        ref = TorrentRef(t.torrent_sha256, t.torrent_length, t.info_hash)
        meta = await self._torrent_for(ref, f"image {t.name}/{t.version}")
        if len(meta.files) != 1 or meta.files[0].pieces_root != t.pieces_root:
            raise TransferError(f"image {t.name}/{t.version}: torrent does not match target")
        origin = self.cfg.origin
        seeds = () if origin is None else (RepositoryURLs.origin(origin, self.name),)
        transfer = self.ctx.session.add(
            meta,
            self.dir / "images" / t.name / t.version,
            prefetch=self.cfg.policy == "prefetch",
            web_seeds=tuple(urls.image_seed(t.target_name) for urls in seeds),
        )
        return NodeImage(
            self.name,
            t.name,
            t.version,
            t.size,
            t.published,
            t.sha256,
            transfer,
            self.ctx.bridge,
            self.ctx.fetch_timeout,
            self.ctx.meters,
        )
