"""``swarm doctor --config NODE_TOML``: can this node run, and if not, what to fix.

The core is a list of checks (:data:`CHECKS`), each a function of a
:class:`Probe` (the config path, the clock, the HTTP transport, a TCP
connect, the process's uid, the KVM device, thresholds: the seams a test
replaces) returning
:class:`Result` rows: one line each, ``OK``, ``SKIP`` (not configured here),
``WARN`` (the node runs, degraded) or ``FAIL`` (it cannot do its work), with
the fix.  The CLI prints them and exits with the worst: 0 all OK (or
skipped), 1 a WARN, 2 a FAIL (:data:`EXIT_STATUS`).

Invariants: the doctor changes nothing (it binds a port only to learn whether
it is free and closes it at once, and connects to the site broker without
subscribing); every wait on the network has a deadline
(:data:`NETWORK_DEADLINE`, the site's ``request_timeout``); the config is
checked by its owners (``swarm.config.load_config`` and, for the
``[image_policy]``, ``[runner]``, ``[tuning]``, ``[site]`` and ``[vm]``
tables, ``trust.policy``, ``runner.service``, ``swarm.daemon``,
``sitejob.config`` and ``vm.config``), so the doctor and the daemon never
disagree on what is valid.  Programs it runs (qemu's ``--version``) run in
their own process group, killed whole at :data:`VERSION_DEADLINE`.  An
invalid config fails its own line and the checks that need it are skipped.
Timestamps fetched from an origin are screened against the trusted root's
keys before their expiry is used as advice.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from swarm.address import Address
from swarm.config import NodeConfig, load_config
from swarm.exceptions import ConfigError, FetchError, SwarmError
from swarm.http_get import HTTPClient, Transport

NETWORK_DEADLINE = 3.0  # seconds per origin or peer: a doctor answers quickly
ROOT_EXPIRY_WARNING = timedelta(days=30)
TIMESTAMP_LIMIT = 1 << 20
VERSION_DEADLINE = 5.0  # seconds for `qemu --version` (a loaded machine; it takes ~50 ms)
# Free bytes below data_dir under which VM overlays (each grows with its
# guest's writes; a full file system ends the VM) get a warning.
VM_FREE_WARNING = 2 << 30


class Level(Enum):
    OK = "OK"
    SKIP = "SKIP"
    WARN = "WARN"
    FAIL = "FAIL"


EXIT_STATUS = {Level.OK: 0, Level.SKIP: 0, Level.WARN: 1, Level.FAIL: 2}
EPILOG = """\
One line per check: OK, SKIP (not configured on this node), WARN (the node
runs, degraded) or FAIL (it cannot do its work), each with the fix.

exit status (the worst check):
  0    every check OK or skipped
  1    at least one WARN, no FAIL
  2    at least one FAIL (an invalid config is one)
"""


@dataclass(frozen=True)
class Result:
    check: str  # what was checked, e.g. "origin sw.example.org"
    level: Level
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -- fix: {self.fix}" if self.fix else ""
        return f"{self.level.value:<4} {self.check}: {self.message}{fix}"

    def to_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "level": self.level.value,
            "message": self.message,
            "fix": self.fix,
        }


def _tcp_connect(address: Address, timeout: float) -> None:
    with socket.create_connection((address.host, address.port), timeout=timeout):
        pass


@dataclass
class Probe:
    """What the checks look at; each field a seam (tests pass their own)."""

    config_path: Path
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    http: Transport = field(default_factory=HTTPClient)
    connect: Callable[[Address, float], None] = _tcp_connect  # raises OSError
    euid: int = field(default_factory=os.geteuid)
    deadline: float = NETWORK_DEADLINE
    version_deadline: float = VERSION_DEADLINE
    kvm_device: Path = Path("/dev/kvm")
    vm_free_minimum: int = VM_FREE_WARNING
    config: NodeConfig | None = None  # set by check_config when valid
    timestamps: dict[str, bytes] = field(default_factory=dict)  # repo -> origin's timestamp


Check = Callable[[Probe], Iterable[Result]]


def worst(results: Iterable[Result]) -> int:
    """The exit status of ``results`` (:data:`EXIT_STATUS` of the worst)."""
    return max((EXIT_STATUS[r.level] for r in results), default=0)


# -- the checks ------------------------------------------------------------------


def check_config(p: Probe) -> Iterable[Result]:
    """The file and every table, through their owners' validation."""
    fix = f"correct {p.config_path} (keys: docs/NODE.md)"
    try:
        cfg = load_config(p.config_path)
        _check_tables(cfg, p.config_path)
    except (ConfigError, SwarmError) as exc:
        yield Result("config", Level.FAIL, str(exc), fix)
        return
    p.config = cfg
    yield Result("config", Level.OK, f"{p.config_path} is valid")


def _check_tables(cfg: NodeConfig, path: Path) -> None:
    """Raises: ConfigError: a table its owner refuses (naming the table)."""
    from runner.exceptions import RunnerError
    from runner.service import runner_settings
    from swarm.daemon import _tuning
    from swarm.torrent import SessionConfig
    from trust.exceptions import TrustError
    from trust.policy import ImagePolicy

    try:
        ImagePolicy.from_table(cfg.image_policy, source=f"{path} [image_policy]")
    except TrustError as exc:
        raise ConfigError(str(exc)) from None
    runner = dict(cfg.runner)
    runner.pop("enabled", None)
    try:
        runner_settings(runner, cfg.data_dir)
    except RunnerError as exc:
        raise ConfigError(f"[runner]: {exc}") from None
    _tuning(cfg.tuning, SessionConfig)
    if cfg.site:
        from sitejob.config import site_config

        site_config(cfg.site, base=path.parent).token()
    if cfg.vm.get("enabled", True):
        from vm.config import vm_settings
        from vm.exceptions import VmError

        try:
            vm_settings(cfg.vm, base=path.resolve().parent)
        except VmError as exc:
            raise ConfigError(f"[vm]: {exc}") from None


def _needs_config(name: str) -> Result:
    return Result(name, Level.SKIP, "needs a valid config")


def check_fuse(p: Probe) -> Iterable[Result]:
    """/dev/fuse, fusermount3 and the kernel's fuse file system, if the node mounts."""
    if p.config is None:
        yield _needs_config("fuse")
        return
    if p.config.mount is None:
        yield Result("fuse", Level.SKIP, "no mount configured (mount =)")
        return
    dev = Path("/dev/fuse")
    if not dev.exists():
        yield Result(
            "fuse",
            Level.FAIL,
            "/dev/fuse is absent",
            "modprobe fuse (in a container: --device /dev/fuse)",
        )
    elif not os.access(dev, os.R_OK | os.W_OK):
        yield Result(
            "fuse",
            Level.FAIL,
            "/dev/fuse is not readable and writable by this user",
            "run the node as root or add its user to the group owning /dev/fuse",
        )
    else:
        yield Result("fuse", Level.OK, "/dev/fuse is usable")
    if shutil.which("fusermount3") is None:
        level = Level.WARN if p.euid == 0 else Level.FAIL  # root mounts without it
        yield Result("fusermount3", level, "fusermount3 is not on PATH", "apt-get install fuse3")
    else:
        yield Result("fusermount3", Level.OK, shutil.which("fusermount3") or "")
    try:
        filesystems = Path("/proc/filesystems").read_text().split()
    except OSError as exc:
        yield Result("kernel fuse", Level.WARN, f"cannot read /proc/filesystems: {exc.strerror}")
        return
    if "fuse" in filesystems:
        yield Result("kernel fuse", Level.OK, "the kernel has the fuse file system")
    else:
        yield Result(
            "kernel fuse", Level.FAIL, "the kernel has no fuse file system", "modprobe fuse"
        )


def _root(path: Path) -> Any:
    """The trusted root at ``path``, its own signatures checked.

    Raises:
        OSError: unreadable. trust.exceptions.VerificationError: not a valid root.
    """
    from trust.verify import verify_root_chain

    return verify_root_chain(path.read_bytes(), [])


def check_trust(p: Probe) -> Iterable[Result]:
    """Each repository's root.json: readable, a valid root, not expired."""
    from trust.exceptions import TrustError

    if p.config is None:
        yield _needs_config("trust")
        return
    for name, rc in p.config.repositories.items():
        check = f"trust {name}"
        fix = f"install {name}'s current root.json from its publisher at {rc.trust}"
        try:
            root = _root(rc.trust)
        except OSError as exc:
            yield Result(check, Level.FAIL, f"cannot read {rc.trust}: {exc.strerror}", fix)
            continue
        except TrustError as exc:
            yield Result(check, Level.FAIL, f"{rc.trust} is not a valid root: {exc}", fix)
            continue
        now = p.now()
        expires = root.expires
        if expires <= now:
            yield Result(
                check,
                Level.FAIL,
                f"root version {root.version} expired at {expires:%Y-%m-%d %H:%M}Z",
                f"{fix} (or check this clock: now {now:%Y-%m-%d %H:%M}Z)",
            )
        elif expires - now < ROOT_EXPIRY_WARNING:
            yield Result(
                check,
                Level.WARN,
                f"root version {root.version} expires at {expires:%Y-%m-%d %H:%M}Z",
                f"ask {name}'s publisher for a new root (swarm keys rotate --role root)",
            )
        else:
            yield Result(
                check, Level.OK, f"root version {root.version}, expires {expires:%Y-%m-%d}"
            )


def check_origins(p: Probe) -> Iterable[Result]:
    """Each origin answers for its repository's timestamp, within the deadline."""
    import time

    if p.config is None:
        yield _needs_config("origin")
        return
    for name, rc in p.config.repositories.items():
        check = f"origin {name}"
        if rc.origin is None:
            yield Result(check, Level.SKIP, "no origin configured (peers only)")
            continue
        url = f"{rc.origin}{name}/metadata/timestamp.json"
        try:
            body = p.http.get(url, deadline=time.monotonic() + p.deadline, limit=TIMESTAMP_LIMIT)
        except FetchError as exc:
            yield Result(
                check,
                Level.FAIL,
                f"{url}: {exc}",
                f'check repositories."{name}".origin, that the origin runs'
                " (swarm serve) and the firewall",
            )
            continue
        p.timestamps[name] = body
        yield Result(check, Level.OK, f"{rc.origin} answers")


def check_clock(p: Probe) -> Iterable[Result]:
    """This clock against each origin's timestamp expiry: metadata valid by
    the origin's clock but expired by ours means this clock is ahead."""
    from tuf.api.metadata import Metadata, Timestamp

    from trust.exceptions import TrustError
    from trust.verify import screen_metadata

    if p.config is None:
        yield _needs_config("clock")
        return
    for name, body in p.timestamps.items():
        check = f"clock {name}"
        try:
            screen_metadata(_root(p.config.repositories[name].trust), "timestamp", body)
            expires = Metadata[Timestamp].from_bytes(body).signed.expires
        except (OSError, TrustError, ValueError) as exc:
            yield Result(check, Level.WARN, f"the origin's timestamp cannot be checked: {exc}")
            continue
        now = p.now()
        if expires <= now:
            yield Result(
                check,
                Level.FAIL,
                f"the origin's timestamp expired at {expires:%Y-%m-%d %H:%M:%S}Z"
                f" by this clock (now {now:%Y-%m-%d %H:%M:%S}Z)",
                "check this clock (timedatectl, NTP); if it is right the publisher"
                " must re-sign (swarm resign)",
            )
        else:
            yield Result(
                check,
                Level.OK,
                f"the origin's timestamp is valid for {expires - now} by this clock",
            )


def check_peers(p: Probe) -> Iterable[Result]:
    """Each bootstrap peer accepts a TCP connection within the deadline."""
    if p.config is None:
        yield _needs_config("peers")
        return
    if not p.config.bootstrap:
        yield Result("peers", Level.SKIP, "no bootstrap peers configured")
    for peer in p.config.bootstrap:
        try:
            p.connect(peer, p.deadline)
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            yield Result(
                f"peer {peer}",
                Level.WARN,
                f"unreachable: {why}",
                "check bootstrap = [...] and the peer's firewall (the node still"
                " uses the origin and the other peers)",
            )
        else:
            yield Result(f"peer {peer}", Level.OK, "accepts connections")


def _disk_usage(path: Path) -> int:
    """Bytes allocated below ``path`` (0 if absent)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                continue  # evicted while we walked
    return total


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(p: Probe) -> Iterable[Result]:
    """Free space below data_dir against what the cache quotas may still take."""
    if p.config is None:
        yield _needs_config("disk")
        return
    quotas = sum(rc.cache_quota for rc in p.config.repositories.values())
    if quotas == 0:
        yield Result("disk", Level.SKIP, "no repositories, no cache")
        return
    where = _existing(p.config.data_dir)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    used = _disk_usage(p.config.data_dir / "repos")
    gib = 1 << 30
    if free + used < quotas:
        yield Result(
            "disk",
            Level.WARN,
            f"{free / gib:.1f} GiB free on {where} + {used / gib:.1f} GiB cached"
            f" < the cache quotas' {quotas / gib:.1f} GiB",
            "free space there or lower repositories.*.cache_quota",
        )
    else:
        yield Result(
            "disk",
            Level.OK,
            f"{free / gib:.1f} GiB free on {where} for {quotas / gib:.1f} GiB of quotas",
        )


def _node_pid(cfg: NodeConfig) -> int | None:
    """The pid of this node's running daemon (from ``node.json``), if alive."""
    try:
        pid = int(json.loads((cfg.data_dir / "node.json").read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if b"swarm" in cmdline else None


def check_ports(p: Probe) -> Iterable[Result]:
    """listen, peer and api: free, or held by this node's own daemon."""
    if p.config is None:
        yield _needs_config("ports")
        return
    cfg = p.config
    for key, address in (("listen", cfg.listen), ("peer", cfg.peer), ("api", cfg.api)):
        check = f"port {key}"
        if address.port == 0:
            yield Result(check, Level.SKIP, "port 0: any free port")
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address.host, address.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pid = _node_pid(cfg)
                if pid is not None:
                    yield Result(check, Level.OK, f"{address} is held by this node (pid {pid})")
                else:
                    yield Result(
                        check,
                        Level.FAIL,
                        f"{address} is in use by another process",
                        f"stop it (ss -ltnp 'sport = :{address.port}') or change {key}",
                    )
            else:
                yield Result(
                    check,
                    Level.FAIL,
                    f"cannot bind {address}: {exc.strerror}",
                    f"use an address of this machine and a port above 1023 for {key}",
                )
            continue
        yield Result(check, Level.OK, f"{address} is free")


def _runner_enabled(cfg: NodeConfig) -> bool:
    return bool(cfg.runner.get("enabled", True)) or bool(cfg.site)


def check_job_user(p: Probe) -> Iterable[Result]:
    """The job user exists (a root node runs tasks as it)."""
    from runner.exceptions import RunnerError
    from runner.job_user import DEFAULT_JOB_USER, job_user_for_node

    if p.config is None:
        yield _needs_config("job user")
        return
    if not _runner_enabled(p.config):
        yield Result("job user", Level.SKIP, "the runner is disabled")
        return
    name = p.config.runner.get("job_user", DEFAULT_JOB_USER)
    try:
        user = job_user_for_node(name, euid=p.euid)
    except RunnerError as exc:
        yield Result(
            "job user",
            Level.FAIL,
            str(exc),
            f"useradd --system --no-create-home {name} (or set runner.job_user)",
        )
        return
    if user is None:
        yield Result("job user", Level.OK, f"not root: tasks run as this user (uid {p.euid})")
    else:
        yield Result("job user", Level.OK, f"tasks run as {user}")


def check_cgroups(p: Probe) -> Iterable[Result]:
    """A memory cgroup controller the runner can use for each job's limit."""
    from runner.memory_cgroup import find_memory_hierarchy, read_controllers

    if p.config is None:
        yield _needs_config("cgroups")
        return
    if not _runner_enabled(p.config):
        yield Result("cgroups", Level.SKIP, "the runner is disabled")
        return
    fallback = "job memory falls back to RLIMIT_DATA per task"
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError as exc:
        yield Result("cgroups", Level.WARN, f"cannot read /proc/self/mounts: {exc.strerror}")
        return
    found = find_memory_hierarchy(mounts, read_controllers)
    if found is None:
        yield Result(
            "cgroups",
            Level.WARN,
            f"no memory cgroup controller: {fallback}",
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1)",
        )
    elif p.euid != 0 or not os.access(found.mountpoint, os.W_OK):
        yield Result(
            "cgroups",
            Level.WARN,
            f"cgroup v{found.version} at {found.mountpoint} is not writable: {fallback}",
            "run the node as root (contrib/systemd/swarm-node.service)",
        )
    else:
        yield Result(
            "cgroups",
            Level.OK,
            f"memory controller on cgroup v{found.version} at {found.mountpoint}",
        )


def check_site(p: Probe) -> Iterable[Result]:
    """The site broker accepts this node's credentials (``[site]``)."""
    if p.config is None:
        yield _needs_config("site broker")
        return
    if not p.config.site:
        yield Result("site broker", Level.SKIP, "no [site] configured")
        return
    from sitejob.config import connect, site_config
    from sitejob.exceptions import BrokerError

    site = site_config(p.config.site, base=p.config_path.parent)  # valid: check_config
    # connect() tries each server once with request_timeout; the outer bound
    # covers a broker that accepts TCP and then says nothing.
    bound = site.request_timeout * len(site.servers) + p.deadline

    async def probe() -> None:
        nc = await asyncio.wait_for(connect(site, reconnect=False), bound)
        await nc.close()

    try:
        asyncio.run(probe())
    except (BrokerError, ConfigError) as exc:
        yield Result(
            "site broker",
            Level.FAIL,
            str(exc),
            "check site.nats, the token and that the broker runs (swarm site-broker)",
        )
    except TimeoutError:
        yield Result(
            "site broker",
            Level.FAIL,
            f"no answer from {', '.join(site.servers)} within {bound:.0f} s",
            "check site.nats and the broker",
        )
    else:
        yield Result("site broker", Level.OK, f"{', '.join(site.servers)} accepts this node")


def _version(program: str, deadline: float) -> tuple[str | None, str]:
    """``program --version``: (its first line, "") or (None, why it failed).
    Run in its own process group, killed whole at ``deadline``."""
    path = shutil.which(program)
    if path is None:
        return None, f"{program} is not found"
    try:
        proc = subprocess.Popen(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return None, f"cannot run {path}: {exc.strerror}"
    with proc:
        try:
            out, err = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its children too: none may hold the pipes
            proc.wait()
            return None, f"{path} --version did not answer within {deadline:g} s"
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()
        return None, f"{path} --version exited with status {proc.returncode}" + (
            f": {tail[-1][:200]}" if tail else ""
        )
    lines = out.decode(errors="replace").strip().splitlines()
    return (lines[0][:200] if lines else f"{path} runs"), ""


def check_vms(p: Probe) -> Iterable[Result]:
    """qemu and qemu-img run, /dev/kvm for the accelerator, free space for
    overlays; where VMs are enabled (``[vm]``, on by default).  A program
    missing fails where a ``[vm]`` table configures VMs and only warns where
    they are on by default (the node runs; only VM starts fail)."""
    from vm.config import vm_settings

    if p.config is None:
        yield _needs_config("vms")
        return
    table = p.config.vm
    if not table.get("enabled", True):
        yield Result("vms", Level.SKIP, "VMs are disabled ([vm] enabled = false)")
        return
    s = vm_settings(table, base=p.config_path.resolve().parent)  # valid: check_config
    missing = Level.FAIL if table else Level.WARN
    for check, key, program, package in (
        ("qemu", "qemu", s.qemu, "qemu-system-x86"),
        ("qemu-img", "qemu_img", s.qemu_img, "qemu-utils"),
    ):
        version, why = _version(program, p.version_deadline)
        if version is None:
            yield Result(
                check,
                missing,
                why,
                f"apt-get install {package}, or set vm.{key}"
                + ("" if table else " (or [vm] enabled = false: no VMs on this node)"),
            )
        else:
            yield Result(check, Level.OK, version)
    yield from _check_kvm(p.kvm_device, s.accelerator)
    where = _existing(p.config.data_dir / "vms")
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    gib = 1 << 30
    if free < p.vm_free_minimum:
        yield Result(
            "vm disk",
            Level.WARN,
            f"{free / gib:.1f} GiB free on {where} for VM overlays"
            f" (less than {p.vm_free_minimum / gib:.1f} GiB)",
            "free space there: each VM's overlay grows with its guest's writes,"
            " and a VM whose overlay cannot grow is ended",
        )
    else:
        yield Result("vm disk", Level.OK, f"{free / gib:.1f} GiB free on {where} for VM overlays")


def _check_kvm(device: Path, accelerator: str) -> Iterable[Result]:
    if accelerator == "tcg":
        yield Result("kvm", Level.SKIP, "vm.accelerator = tcg: software emulation, no KVM")
        return
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        why = f"{device} is absent"
    except OSError as exc:
        why = f"{device} cannot be opened: {exc.strerror}"
    else:
        auto = "; auto: used if a Linux guest boots under it (probed at the first VM)"
        yield Result("kvm", Level.OK, f"{device} opens" + (auto if accelerator == "auto" else ""))
        return
    fix = (
        "load KVM (modprobe kvm_intel or kvm_amd; in a VM, enable nested virtualisation)"
        " and let the node's user open it (group kvm)"
    )
    if accelerator == "kvm":
        yield Result(
            "kvm",
            Level.FAIL,
            f"{why}, and vm.accelerator = kvm: no VM can start",
            f'{fix}, or set vm.accelerator = "auto" (software emulation where KVM is missing)',
        )
    else:
        yield Result("kvm", Level.WARN, f"{why}: software emulation only (much slower)", fix)


CHECKS: tuple[Check, ...] = (
    check_config,  # first: the others need its NodeConfig
    check_fuse,
    check_trust,
    check_origins,
    check_clock,  # after check_origins: uses the timestamps it fetched
    check_peers,
    check_disk,
    check_ports,
    check_job_user,
    check_cgroups,
    check_site,
    check_vms,
)


def run_checks(p: Probe, checks: Iterable[Check] = CHECKS) -> list[Result]:
    """Every check's results, in order; a check that raises an error of ours
    fails its own line instead of ending the run."""
    results: list[Result] = []
    for check in checks:
        try:
            results.extend(check(p))
        except (SwarmError, OSError) as exc:
            results.append(Result(check.__name__.removeprefix("check_"), Level.FAIL, str(exc)))
    return results


# -- the command -----------------------------------------------------------------


def cmd_doctor(a: argparse.Namespace) -> int:
    results = run_checks(Probe(config_path=a.config))
    status = worst(results)
    if a.json:
        print(json.dumps({"status": status, "checks": [r.to_json() for r in results]}, indent=2))
    else:
        for r in results:
            print(r.line())
    return status


def add_doctor_command(sub: Any) -> None:
    """Register ``doctor`` on a subparsers object."""
    s = sub.add_parser(
        "doctor",
        help="check that this node can run, one line per check with the fix",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    s.add_argument("--json", action="store_true", help="the results as JSON")
    s.set_defaults(func=cmd_doctor)
