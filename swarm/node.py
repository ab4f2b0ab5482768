"""The node daemon: one asyncio process per node (``swarm node --config FILE``).

It follows repositories, gets their metadata and content from peers (the
origin only as a fallback and web seed), seeds whatever it holds, and exposes
releases and VM images in its FUSE mount, fetched on first read and verified.

Where things live: :class:`Node` owns the lifecycle (state directory, API
token, listeners, the mount, the refresh loop and its back-off); each
repository is opened by :func:`swarm.repository.open_repository` and
followed by a :class:`swarm.follower.Follower` (phases metadata, revision,
images); reads from FUSE threads reach the loop through
:class:`swarm.reads.LoopBridge`, one deadline per fetch on the node's clock.

Threads and the loop: the event loop owns libtorrent (through
:class:`swarm.transfer.TransferSession`), the HTTP API and the peer exchange.
Blocking work (TUF refreshes, catalog loads, hashing) runs in worker threads;
FUSE callbacks arrive on libfuse's threads and never wait on the loop thread
itself.

Trust: see :mod:`swarm.follower` (what is followed, and only through
verified targets) and :mod:`swarm.reads` (nothing is served unverified).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from cvmfs_like.cache import MOUNT_THREADS, FetchGate
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.namespace import ImageFile, Namespace
from cvmfs_like.start_profile import ProfileSettings
from runner.pid_lock import take_pid_lock
from swarm.config import NodeConfig, RepositoryConfig
from swarm.exceptions import ConfigError, SwarmError
from swarm.exchange import PeerExchange
from swarm.follower import FollowContext, Follower, TorrentParser
from swarm.metrics import FetchMeters
from swarm.origin_client import OriginObjectSource
from swarm.reads import LoopBridge, SwarmObjectSource
from swarm.repository import RepositorySpec, open_repository
from swarm.status import (
    CacheStats,
    ImageReport,
    NodeStatus,
    PeerReport,
    RepositoryStatus,
    RevisionReport,
    TransferReport,
)
from swarm.transfer import Transfer, TransferSession
from trust.policy import ImagePolicy

log = logging.getLogger(__name__)


class Node:
    """The daemon (see the module docstring).  ``start`` inside a running loop."""

    def __init__(
        self,
        config: NodeConfig,
        session: TransferSession,
        *,
        parse_torrent: TorrentParser,
        image_policy: ImagePolicy | None = None,
        job_service: Any = None,
        site: Any = None,
        vms: Any = None,
        clock: Callable[[], float] = time.monotonic,
        api: Callable[[Node], web.Application] | None = None,
    ) -> None:
        """``api`` builds the HTTP API's app over this node (swarm.daemon
        passes swarm.api.make_api_app); None: no API. ``site``: the node's
        :class:`sitejob.service.SiteService` (None without ``[site]``); its
        ``js`` is the broker's JetStream context while connected. ``vms``:
        the node's :class:`vm.manager.VmService` (None: VMs turned off)."""
        self._api = api
        self.config = config
        self.session = session
        self._parse_torrent = parse_torrent
        self.image_policy = image_policy
        self.job_service = job_service
        self.site = site
        self.vms = vms
        self.clock = clock
        self.repos: dict[str, Follower] = {}
        self.namespace = Namespace()
        self.ops: Any = None  # fs.ReleaseOperations once mounted
        self._mount_thread: threading.Thread | None = None
        self._runners: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # a refresh failed: retry soon
        self.started_at = time.time()
        self.api_port: int | None = None
        self.peer_port: int | None = None
        self._extra_peers: set[str] = set()
        # One mount serves every repository: their caches share its gate.
        self._fetch_gate = FetchGate.for_threads(MOUNT_THREADS)
        self.meters = FetchMeters()  # what no status report holds (GET /metrics)
        self._lock_fd: int | None = None  # data_dir/node.lock, held while started

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open state, start libtorrent, the API and peer exchange, load what
        is cached, then mount.

        Raises:
            ConfigError: unusable paths or addresses.
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(check_paths, cfg)
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_dir: {cfg.data_dir}: {exc.strerror}") from None
        self._take_data_dir()
        self._token = self._load_token()
        ctx = FollowContext(
            self.session,
            self._parse_torrent,
            self.image_policy,
            LoopBridge(loop, self.clock),
            cfg.fetch_timeout,
            self._show_repository,
            self._invalidate,
            self._publish_images,
            self.meters,
        )
        for name, rc in cfg.repositories.items():
            self.repos[name] = self._open_repo(rc, ctx)
        await self.session.start()
        for b in cfg.bootstrap:
            self.session.connect(str(b))
        await self._start_http()
        for name in self.repos:
            await self.refresh(name)
        if cfg.mount is not None:
            await self._mount(cfg.mount)
        if self.vms is not None:
            await self.vms.start()  # after the mount: VMs boot from images in it
        if self.job_service is not None:
            # After the VMs: a qemu a killed node left is ended before the
            # pilot starts its job's VM again (its spec was queued again).
            self.job_service.start()
        if self.site is not None:
            await self.site.start()  # connects in the background: a broker down is no failure
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        self._write_state_file()
        log.info("node ready: api %s, peer %s, listen %s", cfg.api, cfg.peer, cfg.listen)

    def _take_data_dir(self) -> None:
        """Hold ``data_dir/node.lock`` for this node's life: two daemons on one
        data directory would share caches, torrents and the job queue, each
        believing it alone writes them.  The kernel drops the lock when this
        process dies, so a crashed node never blocks the next start.

        Raises:
            ConfigError: another live process holds the data directory.
        """
        path = self.config.data_dir / "node.lock"

        def busy(pid: str) -> ConfigError:
            holder = f"the node with pid {pid}" if pid else "another node"
            return ConfigError(f"data_dir: {self.config.data_dir} is in use by {holder}")

        try:
            self._lock_fd = take_pid_lock(path, busy)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot lock {path}: {exc.strerror}") from None

    def _load_token(self) -> str:
        """The API token from its file, made (0600) if missing or empty.  A
        file others may read or change is used, with a warning: they could
        act as the node's operator.

        Raises:
            ConfigError: the file cannot be read or written.
        """
        path = self.config.token_path
        token = ""
        try:
            with open(path) as f:
                mode = os.fstat(f.fileno()).st_mode
                token = f.read().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"api_token_file: {path}: {exc.strerror}") from None
        if token:
            if mode & 0o066:
                log.warning(
                    "api token file %s has mode %04o: group or others can read or change it;"
                    " chmod 600 %s",
                    path,
                    stat.S_IMODE(mode),
                    path,
                )
            return token
        token = secrets.token_urlsafe(32)
        try:
            _write_private(path, (token + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"api_token_file: cannot write {path}: {exc.strerror}") from None
        return token

    def check_token(self, presented: str | None) -> bool:
        return presented is not None and secrets.compare_digest(presented, self._token)

    def _open_repo(self, rc: RepositoryConfig, ctx: FollowContext) -> Follower:
        rdir = self.config.repo_dir(rc.name)
        for sub in ("metadata", "torrents", "swarm", "cache", "images"):
            (rdir / sub).mkdir(parents=True, exist_ok=True)
        try:
            root_bytes = rc.trust.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f'repositories."{rc.name}".trust: cannot read {rc.trust}: {exc.strerror}'
            ) from None
        spec = RepositorySpec(
            rc.name, rc.origin, root_bytes, rdir / "metadata", self.config.fetch_timeout
        )
        origin = (
            OriginObjectSource(rc.origin, rc.name, timeout=self.config.fetch_timeout)
            if rc.origin is not None
            else None
        )
        source = SwarmObjectSource(
            rc.name, ctx.bridge, origin, timeout=self.config.fetch_timeout, meters=ctx.meters
        )
        repo = open_repository(
            spec,
            source,
            cache_dir=rdir / "cache",
            quota=rc.cache_quota,
            gate=self._fetch_gate,
            tag=rc.tag,
            peers=self.peer_urls,
            refreshes=False,  # the node refreshes first, then follows the torrent
            start_profile=ProfileSettings(
                enabled=rc.start_profile, stop_wait=self.config.fetch_timeout + 5.0
            ),
        )
        return Follower(rc, rdir, repo.trusted, repo.fetcher, repo.cache, source, repo.mounted, ctx)

    async def _start_http(self) -> None:
        exchange = PeerExchange(lambda: {n: r.dir for n, r in self.repos.items()})
        apps = [(exchange.app(), self.config.peer, "peer_port")]
        if self._api is not None:
            apps.append((self._api(self), self.config.api, "api_port"))
        for app, addr, attr in apps:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise ConfigError(f"cannot listen on {addr}: {exc.strerror}") from None
            self._runners.append(runner)
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            setattr(self, attr, sockets[0].getsockname()[1] if sockets else addr.port)

    def _write_state_file(self) -> None:
        state = {
            "pid": os.getpid(),
            "api": f"http://{self.config.api.host}:{self.api_port}/",
            "peer_port": self.peer_port,
            "mount": None if self.config.mount is None else str(self.config.mount),
        }
        tmp = self.config.data_dir / "node.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.config.data_dir / "node.json")

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`request_stop`."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Unmount, close the object caches, save resume data, close listeners.

        Safe to call twice.
        """
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.vms is not None:
            # Every VM: STOP and the power button, the grace, then ended; before
            # the unmount, as they read their images and software from it.
            await self.vms.stop()
        if self.site is not None:
            # Running ranges: the runner's grace, then cut and handed back.
            await self.site.stop()
        if self.job_service is not None:
            await asyncio.to_thread(self.job_service.stop, 30.0)
        await self._unmount()
        for rs in self.repos.values():
            # Unmounted: the start profile's prefetch stops first, then the
            # cache is flushed, so the next start need not hash cached objects.
            await asyncio.to_thread(rs.mounted.close)
            await asyncio.to_thread(rs.cache.close)
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        await self.session.close()
        with contextlib.suppress(OSError):
            (self.config.data_dir / "node.json").unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # last: the data directory is free now
            self._lock_fd = None

    # -- peers ---------------------------------------------------------------------------

    def peer_urls(self) -> list[str]:
        """Peer exchange URLs: bootstrap hosts, then peers seen in transfers.

        The site runs the peer exchange on one port (config ``peer``) on
        every node, so a BitTorrent peer's address gives its exchange URL.
        """
        port = self.config.peer.port
        mine = {self.config.listen.host, self.config.peer.host}
        hosts: list[str] = []
        for b in self.config.bootstrap:
            if b.host not in hosts:
                hosts.append(b.host)
        for h in sorted(self._extra_peers):
            if h not in hosts:
                hosts.append(h)
        return [f"http://{h}:{port}/" for h in hosts if h not in mine]

    def _transfers(self) -> Iterator[tuple[str, str, Transfer]]:
        """(repository, what, transfer) for every torrent this node follows."""
        for name, rs in self.repos.items():
            hashes = [(f"revision {r}", ih) for r, ih in rs.revision_torrents.items()]
            hashes += [
                (f"image {n}/{v}", i.transfer.meta.info_hash) for (n, v), i in rs.images.items()
            ]
            for what, ih in hashes:
                t = self.session.get(ih)
                if t is not None:
                    yield name, what, t

    def _learn_peers(self) -> None:
        """Remember the hosts of BitTorrent peers (not the origins, which are
        web seeds without a peer exchange) as peer exchange hosts."""
        import urllib.parse

        origins = {
            urllib.parse.urlsplit(r.cfg.origin).hostname
            for r in self.repos.values()
            if r.cfg.origin is not None
        }
        for _, _, t in self._transfers():
            for p in t.peers():
                host = p.address.rpartition(":")[0].strip("[]")
                if host and host not in origins:
                    self._extra_peers.add(host)

    # -- repositories --------------------------------------------------------------------

    def _retry_soon(self) -> bool:
        return any(r.retry_soon for r in self.repos.values())

    async def _refresh_loop(self) -> None:
        """Refresh every ``refresh_interval``.  While a repository's metadata
        fetch is failing (a peer hiccuped, the origin is down), retry sooner:
        2 s, doubling up to the interval; a failed refresh asked for through
        the API wakes the loop, so a node never misses a publish for a whole
        interval because one fetch failed."""
        backoff: float | None = None
        while not self._stopping.is_set():
            if self._retry_soon():
                backoff = 2.0 if backoff is None else backoff * 2
                delay = min(backoff, self.config.refresh_interval)
            else:
                backoff = None
                delay = self.config.refresh_interval
            self._wake.clear()
            waits = {asyncio.ensure_future(self._stopping.wait())}
            if backoff is None:
                waits.add(asyncio.ensure_future(self._wake.wait()))
            _, pending = await asyncio.wait(waits, timeout=delay, return_when="FIRST_COMPLETED")
            for w in pending:
                w.cancel()
            if self._stopping.is_set():
                return
            if self._wake.is_set():
                continue  # a refresh failed: recompute the delay (2 s) first
            self._learn_peers()
            for name in list(self.repos):
                try:
                    await self.refresh(name)
                except Exception:  # one repository's failure must not stop the others
                    log.exception("%s: refresh failed", name, extra={"repository": name})

    async def refresh(self, name: str) -> RepositoryStatus:
        """Refresh one repository's metadata now and switch to a newer revision.

        Never raises for transport or verification failures: the current
        revision keeps being served and the error is reported (each phase's
        own, swarm.follower).
        """
        follower = self.repos[name]
        async with self._refresh_lock:
            await follower.refresh()
        if follower.retry_soon:
            self._wake.set()
        return self.repo_status(name)

    def _publish_images(self) -> None:
        table: dict[tuple[str, str, str], ImageFile] = {}
        for name, rs in self.repos.items():
            for (image, version), img in rs.images.items():
                table[(name, image, version)] = img
        changed = self.namespace.set_images(table)
        self._invalidate(changed)

    # -- the mount ------------------------------------------------------------------------

    async def _mount(self, mountpoint: Path) -> None:
        from cvmfs_like import fs
        from swarm.mount_service import prepare_mount_point

        # A dead mount left by a node killed earlier is cleared; a live one is an error.
        await asyncio.to_thread(prepare_mount_point, mountpoint, create=True, what="mount")
        ready = threading.Event()
        ops = fs.ReleaseOperations(self.namespace, ttl=None, on_ready=ready.set)
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                fs.mount(ops, mountpoint)
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()

        self.ops = ops
        self._mount_thread = threading.Thread(target=serve, name="swarm-fuse", daemon=True)
        self._mount_thread.start()
        if not await asyncio.to_thread(ready.wait, 30.0) or errors:
            why = errors[0] if errors else "no answer within 30 s"
            raise ConfigError(f"cannot mount {mountpoint}: {why}")

    def _show_repository(self, name: str, mounted: MountedRelease) -> None:
        self.namespace.set_repository(name, mounted)
        # The root's listing, and the name itself: a lookup of it before it
        # was shown left a negative entry in the kernel.
        self._invalidate([b"", name.encode()])

    def _invalidate(self, paths: list[bytes]) -> None:
        if self.ops is not None and paths:
            self.ops.invalidate(paths)

    async def _unmount(self) -> None:
        thread, self._mount_thread = self._mount_thread, None
        if thread is None or self.config.mount is None:
            return
        from swarm.mount_service import unmount

        try:
            await asyncio.to_thread(unmount, self.config.mount)
        except SwarmError as exc:
            log.error("unmount of %s failed: %s", self.config.mount, exc)
        await asyncio.to_thread(thread.join, 10.0)

    # -- reports (the HTTP API and `swarm status`, swarm.status) ---------------------------

    def follows(self, name: str) -> bool:
        return name in self.repos

    def repo_names(self) -> list[str]:
        return list(self.repos)

    def repo_status(self, name: str) -> RepositoryStatus:
        return self.repos[name].status()

    def revisions(self, name: str) -> list[RevisionReport]:
        return self.repos[name].revisions()

    def images(self) -> list[ImageReport]:
        out = []
        for name, rs in self.repos.items():
            for (image, version), img in sorted(rs.images.items()):
                out.append(
                    ImageReport(
                        repository=name,
                        name=image,
                        version=version,
                        accepted=True,
                        size=img.size,
                        sha256=img.sha256,
                        info_hash=img.transfer.meta.info_hash,
                        path=f".images/{name}/{image}/{version}",
                        progress=img.transfer.status().progress,
                    )
                )
            for key, why in sorted(rs.refused_images.items()):
                image, _, version = key.partition("/")
                out.append(ImageReport(name, image, version, accepted=False, reason=why))
        return out

    def transfers(self) -> list[TransferReport]:
        return [
            TransferReport(**dataclasses.asdict(t.status()), repository=name, what=what)
            for name, what, t in self._transfers()
        ]

    def peers(self) -> list[PeerReport]:
        seen: dict[str, PeerReport] = {}
        for _, _, t in self._transfers():
            for p in t.peers():
                was = seen.get(p.address, PeerReport(p.address, p.client, 0, 0, 0))
                seen[p.address] = dataclasses.replace(
                    was,
                    torrents=was.torrents + 1,
                    downloaded=was.downloaded + p.downloaded,
                    uploaded=was.uploaded + p.uploaded,
                )
        return list(seen.values())

    def status(self) -> NodeStatus:
        return NodeStatus(
            pid=os.getpid(),
            uptime=time.time() - self.started_at,
            listen=str(self.config.listen),
            api=str(self.config.api),
            peer=str(self.config.peer),
            mount=None if self.config.mount is None else str(self.config.mount),
            mounted=self._mount_thread is not None and self._mount_thread.is_alive(),
            bootstrap=[str(b) for b in self.config.bootstrap],
            session=self.session.status(),
            banned=self.session.banned(),
            repositories={n: self.repo_status(n) for n in self.repos},
            transfers=self.transfers(),
            site=None if self.site is None else self.site.status(),
            vms=None if self.vms is None else self.vms.status(),
        )

    def cache(self) -> dict[str, CacheStats]:
        return {n: CacheStats(**rs.cache.stats()) for n, rs in self.repos.items()}


def check_paths(config: NodeConfig) -> None:
    """Check the node's paths before anything is created: ``data_dir`` a
    directory it can write in (or can create), the API token file's
    directory, the mount point (a dead swarm mount there is cleared, a
    live one refused; a missing one is created, last).

    Raises:
        ConfigError: naming the key: a file where a directory is needed, a
            read-only file system, a missing or unwritable directory.
    """
    from swarm.mount_service import prepare_mount_point
    from swarm.options import check_directory, existing_directory

    check_directory(config.data_dir, "data_dir")
    token = config.token_path
    if token.parent != config.data_dir:  # the node creates data_dir, not the token's directory
        check_directory(existing_directory(token.parent, "api_token_file"), "api_token_file")
    if token.is_dir():
        raise ConfigError(f"api_token_file: {token} is a directory")
    if config.mount is not None:
        prepare_mount_point(config.mount, create=True, what="mount")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` as a new 0600 file, atomically: a temporary file made
    0600 from its creation (whatever the umask) is renamed over ``path``, so
    no reader ever sees it partly written or more open than 0600."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
