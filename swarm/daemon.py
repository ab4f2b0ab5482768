"""Starting the node daemon: ``swarm node --config FILE`` wired from its parts.

:func:`run_node` reads the configuration, checks the node's paths before
anything is created, builds the libtorrent session (``[tuning]``), the job
service (``[runner]``), the VM service (``[vm]``) and the image policy, and
runs :func:`build_node`'s daemon until SIGTERM/SIGINT.  Once the node serves (its API answers), it
tells systemd ``READY=1`` when started as a ``Type=notify`` unit
(``swarm/readiness.py``, ``contrib/systemd/swarm-node.service``).
:func:`build_node` is the one place the node meets its HTTP API (swarm.api
depends only on the :class:`swarm.api.NodeView`
protocol, and swarm.node does not import swarm.api).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarm.api import make_api_app
from swarm.config import NodeConfig
from swarm.exceptions import ConfigError
from swarm.follower import TorrentParser
from swarm.node import Node, check_paths
from swarm.options import ValueRangeError, parse_count, parse_seconds
from swarm.readiness import notify_ready
from swarm.transfer import TransferSession
from trust.exceptions import TrustError
from trust.policy import ImagePolicy


def build_node(
    config: NodeConfig,
    session: TransferSession,
    *,
    parse_torrent: TorrentParser,
    image_policy: ImagePolicy | None = None,
    job_service: Any = None,
    site: Any = None,
    vms: Any = None,
    clock: Callable[[], float] = time.monotonic,
) -> Node:
    """The daemon with its HTTP API (``start`` it inside a running loop).
    ``vms``: a :class:`vm.manager.VmService`; it finds images in this node."""
    node = Node(
        config,
        session,
        parse_torrent=parse_torrent,
        image_policy=image_policy,
        job_service=job_service,
        site=site,
        vms=vms,
        clock=clock,
        api=make_api_app,
    )
    if vms is not None:
        from vm.manager import node_image_finder

        vms.find_image = node_image_finder(node)
    return node


_NOT_TUNING = {"listen", "bootstrap", "dht", "lsd"}


def _tuning(table: dict[str, Any], cls: type) -> dict[str, Any]:
    """The ``[tuning]`` table as keyword arguments of the session config.

    Raises:
        ConfigError: an unknown knob or a value of the wrong type.
    """
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in _NOT_TUNING}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in defaults:
            raise ConfigError(f"tuning.{key}: unknown (known: {', '.join(sorted(defaults))})")
        want = type(defaults[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"tuning.{key}: expected {want.__name__}, got {value!r}")
        try:  # libtorrent settings are 32-bit; the float knobs are intervals
            if want is int:
                value = parse_count(value, minimum=0, maximum=2**31 - 1)
            elif want is float:
                value = parse_seconds(value)
        except ValueRangeError as exc:
            raise ConfigError(f"tuning.{key}: {exc}") from None
        out[key] = value
    return out


def _no_lease(why: str) -> Callable[[float], Any]:
    from runner.exceptions import LeaseError

    def lease_at(now: float) -> Any:
        raise LeaseError(why)

    return lease_at


def run_node(config_path: Path) -> None:
    """``swarm node --config FILE``: run the daemon until SIGTERM/SIGINT.

    Raises:
        ConfigError: a bad configuration or an unusable path or address.
    """
    import resource

    from swarm.config import load_config
    from swarm.torrent import SessionConfig, TorrentSession, parse_torrent

    cfg = load_config(config_path)
    try:
        policy = ImagePolicy.from_table(cfg.image_policy, source=f"{config_path} [image_policy]")
    except TrustError as exc:
        raise ConfigError(str(exc)) from None
    site_cfg = None
    if cfg.site:
        from sitejob.config import site_config

        site_cfg = site_config(cfg.site, base=config_path.parent)
        site_cfg.token()  # an unreadable token is a configuration error, now
    vm_table = dict(cfg.vm)
    vm_cfg = None
    if vm_table.get("enabled", True):
        from vm.config import vm_settings
        from vm.exceptions import VmError

        try:
            vm_cfg = vm_settings(vm_table, base=config_path.resolve().parent)
        except VmError as exc:
            raise ConfigError(f"{config_path} [vm]: {exc}") from None
    check_paths(cfg)  # before the job service or the node create anything
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    session = TorrentSession(
        SessionConfig(
            listen=str(cfg.listen),
            bootstrap=[str(b) for b in cfg.bootstrap],
            dht=cfg.dht,
            lsd=cfg.lsd,
            **_tuning(cfg.tuning, SessionConfig),
        ),
        cfg.data_dir / "session",
    )

    from runner.cores import CoreLedger
    from runner.exceptions import RunnerError
    from runner.service import job_service_from_config, runner_settings

    runner_table = dict(cfg.runner)
    cores = CoreLedger()  # node jobs and site ranges share the lease's cores
    jobs = None
    if runner_table.pop("enabled", True):
        try:
            jobs = job_service_from_config(runner_table, cfg.data_dir, cores=cores)
        except RunnerError as exc:
            raise ConfigError(f"{config_path} [runner]: {exc}") from None
    site = None
    if site_cfg is not None:
        from sitejob.service import SiteService

        try:
            settings = runner_settings(runner_table, cfg.data_dir)
        except RunnerError as exc:
            raise ConfigError(f"{config_path} [runner]: {exc}") from None
        site = SiteService(
            site_cfg,
            data_dir=cfg.data_dir,
            cores=cores,
            lease_at=settings.lease_at if jobs is None else jobs.lease_at,
            confinement=settings.confinement,
            grace=settings.grace,
        )

    vms = None
    if vm_cfg is not None:
        from vm.manager import VmService

        if jobs is not None:
            lease_at = jobs.lease_at
        else:
            try:
                lease_at = runner_settings(runner_table, cfg.data_dir).lease_at
            except RunnerError as exc:
                # The job service is off and its table was never a reason to
                # fail: VMs are refused, saying why, and the node starts.
                lease_at = _no_lease(f"{config_path} [runner]: {exc}")
        vms = VmService(
            vm_cfg,
            data_dir=cfg.data_dir,
            cores=cores,
            lease_at=lease_at,
            software=cfg.mount,  # build_node gives it the node's images
            # a migration's destination listens where the node's peers reach it
            migration_host=cfg.listen.host,
        )
        if jobs is not None:
            from vm.job import NodeVmLauncher

            jobs.vms = NodeVmLauncher(vms)  # VM specs in the job queue (runner.vm_jobs)

    async def main() -> None:
        node = build_node(
            cfg,
            session,
            parse_torrent=parse_torrent,
            image_policy=policy,
            job_service=jobs,
            site=site,
            vms=vms,
        )
        try:
            await node.start()
            notify_ready()  # systemd's Type=notify: the API answers from here on
            await node.run()
        finally:
            await node.stop()

    asyncio.run(main())
