"""The ``swarm`` command line.

:func:`main` catches every error of ours (the roots of each package:
``SwarmError``, ``ReleaseError``, ``TrustError``, ``RunnerError``, and
sitejob's ``SiteJobError`` and ``BrokerError``), prints it
as one line naming what was wrong, and exits with the status
:data:`EXIT_STATUSES` gives its cause (documented in ``swarm --help`` and
``docs/NODE.md``); usage errors (a bad option or config value, an unusable
path: :class:`ConfigError` and argparse's) name the option or key and exit
with status 2.  Tracebacks only with ``--debug``.  Every numeric option has a
checked type (``swarm/options.py``, ``runner/sizes.py``), every address and
repository name too (``swarm/address.py``, ``trust/names.py``), and every
path is checked before anything is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmfs_like.cache import MOUNT_THREADS
from cvmfs_like.exceptions import ObjectUnavailable, ObjectVerificationError, ReleaseError
from cvmfs_like.start_profile import ProfileSettings
from runner import cli as runner_cli
from runner.cli import add_runner_commands
from runner.exceptions import RunnerError
from runner.sizes import size_argument
from sitejob.cli import add_site_commands
from sitejob.exceptions import BrokerError, SiteJobError
from swarm.address import Address, AddressError
from swarm.config import parse_origin
from swarm.doctor import add_doctor_command
from swarm.exceptions import ConfigError, FetchError, SwarmError
from swarm.image_cli import add_image_commands
from swarm.job_cli import add_job_client_commands
from swarm.logs import add_log_format_option, configure_logging, subcommand
from swarm.options import (
    OneLineParser,
    check_directory,
    count_argument,
    existing_directory,
    seconds_argument,
)
from trust.exceptions import TrustConfigError, TrustError, TrustTransportError, VerificationError
from trust.names import repo_name_problem
from vm.cli import add_vm_commands
from vm.exceptions import VmConfigError, VmError

log = logging.getLogger("swarm")
# The commands that run until stopped, whose logs a collector reads.
LONG_RUNNING = (("node",), ("serve",), ("mount",), ("site-job", "gather"), ("pilot",))
MAX_ROOT_KEYS = 64  # a root signed by more keys than this is a typo, not a policy

# Exit statuses by cause: the first row whose class an error is an instance of
# decides.  Runner errors keep the runner's own statuses (runner/cli.py).
USAGE, VERIFICATION_FAILED, UNAVAILABLE = 2, 5, 6
EXIT_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, USAGE),
    (TrustConfigError, USAGE),
    (VmConfigError, USAGE),
    (VerificationError, VERIFICATION_FAILED),
    (ObjectVerificationError, VERIFICATION_FAILED),
    (FetchError, UNAVAILABLE),
    (TrustTransportError, UNAVAILABLE),
    (ObjectUnavailable, UNAVAILABLE),
    (BrokerError, UNAVAILABLE),
)
OUR_ERRORS = (SwarmError, ReleaseError, TrustError, RunnerError, SiteJobError, BrokerError, VmError)
EPILOG = f"""\
exit status:
  0    done
  1    an error (one line on stderr); `status`: a mount is dead or does not answer;
       `site-job gather`: some ranges were abandoned; `doctor`: a check warned
  {USAGE}    bad usage: an option, a config key or value, a path, local keys or state;
       `doctor`: a check failed
  {runner_cli.JOB_REFUSED}    `job run`: the job does not fit the lease, nothing ran
  {runner_cli.JOB_INCOMPLETE}    `job run`: the job was stopped or did not finish every event
  {VERIFICATION_FAILED}    untrusted data failed verification (signature, hash, rollback,
       expiry) and was refused
  {UNAVAILABLE}    the origin, the peers or the site's broker could not deliver in time
       (transport)
  130  interrupted
--debug shows a traceback instead of the one-line error.
"""


def exit_status(exc: Exception) -> int:
    """The documented exit status for an error of ours (see :data:`EPILOG`)."""
    if isinstance(exc, RunnerError):
        return runner_cli.exit_status(exc)
    for cause, status in EXIT_STATUSES:
        if isinstance(exc, cause):
            return status
    return 1


def _listen_argument(text: str) -> Address:
    """``HOST:PORT`` to listen on (argparse ``type=``; the port cannot be 0:
    the command prints the URL it serves)."""
    try:
        return Address.parse(text, default_host="0.0.0.0")
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _repo_argument(text: str) -> str:
    """A repository name (argparse ``type=``; the rule of ``trust/names.py``)."""
    problem = repo_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _store(a: argparse.Namespace, *, create: bool = False) -> Path:
    """``--store``: an existing directory (``create``: one that can be made)."""
    if create:
        return check_directory(a.store, "--store")
    return check_directory(existing_directory(a.store, "--store"), "--store")


def _progress_printer(enabled: bool) -> Callable[[Any], None] | None:
    if not enabled:
        return None
    start = time.monotonic()

    def show(stats: Any) -> None:
        rate = stats.hashed_bytes / max(time.monotonic() - start, 1e-6) / 1e6
        sys.stderr.write(
            f"\r  {stats.entries} entries, {stats.hashed_files} files hashed"
            f" ({stats.hashed_bytes / 1e6:.1f} MB, {rate:.0f} MB/s),"
            f" {stats.new_objects} new objects   "
        )
        sys.stderr.flush()

    return show


# -- subcommands -------------------------------------------------------------------


def cmd_keys_init(a: argparse.Namespace) -> int:
    from trust.keys import init_keys

    check_directory(a.keydir, "keydir")
    root = init_keys(a.keydir, a.repo, root_keys=a.root_keys, root_threshold=a.threshold)
    print(f"created keys for {a.repo} in {a.keydir}")
    print(f"trusted root (install it on nodes out of band): {root}")
    return 0


def cmd_keys_rotate(a: argparse.Namespace) -> int:
    from cvmfs_like.store import OriginStore
    from trust.repository import rotate_key

    existing_directory(a.keydir, "keydir")
    store = OriginStore(_store(a), a.repo)
    rotate_key(a.keydir, store.metadata_dir, a.role)
    print(f"rotated the {a.role} key of {a.repo}; new root: {a.keydir / 'root.json'}")
    return 0


def cmd_publish(a: argparse.Namespace) -> int:
    from cvmfs_like.publish import publish
    from cvmfs_like.store import OriginStore

    existing_directory(a.src, "src")
    existing_directory(a.keys, "--keys")
    store = OriginStore(_store(a, create=True), a.repo)
    show = _progress_printer(not a.quiet and sys.stderr.isatty())
    extend = None
    if not a.no_torrent:
        from swarm.release_torrent import torrent_extension

        extend = torrent_extension(store, progress=show is not None)
    result = publish(
        a.src,
        store,
        a.keys,
        progress=show,
        nest_threshold=a.catalog_entries,
        extend_target=extend,
    )
    if show is not None:
        sys.stderr.write("\n")
    s = result.stats
    for skipped in s.skipped:
        print(f"warning: skipped {skipped}", file=sys.stderr)
    if a.json:
        print(
            json.dumps(
                {
                    "repository": a.repo,
                    "revision": result.release.revision,
                    "catalog": result.release.catalog,
                    "entries": s.entries,
                    "files": s.files,
                    "bytes": s.bytes,
                    "hashed_files": s.hashed_files,
                    "hashed_bytes": s.hashed_bytes,
                    "new_objects": s.new_objects,
                    "new_bytes": s.new_bytes,
                    "seconds": round(result.seconds, 3),
                }
            )
        )
    else:
        print(
            f"published {a.repo} revision {result.release.revision}: {s.entries} entries,"
            f" {s.bytes / 1e6:.1f} MB; hashed {s.hashed_files} files, stored {s.new_objects}"
            f" new objects ({s.new_bytes / 1e6:.1f} MB) in {result.seconds:.2f} s"
        )
    return 0


def cmd_revisions(a: argparse.Namespace) -> int:
    from cvmfs_like.retention import list_revisions
    from cvmfs_like.store import OriginStore

    releases, tags = list_revisions(OriginStore(existing_directory(a.store, "--store"), a.repo))
    by_rev: dict[int, list[str]] = {}
    for name, t in tags.items():
        by_rev.setdefault(t.revision, []).append(name)
    for r in releases:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.published))
        names = ",".join(sorted(by_rev.get(r.revision, [])))
        size = f"{r.total_bytes / 1e6:>10.1f} MB"
        print(f"{r.revision:>6}  {when}Z  {r.files:>8} files  {size}  {names}")
    return 0


def cmd_tag(a: argparse.Namespace) -> int:
    from cvmfs_like.retention import tag
    from cvmfs_like.store import OriginStore

    existing_directory(a.keys, "--keys")
    t = tag(OriginStore(_store(a), a.repo), a.keys, a.name, a.revision, delete=a.delete)
    print(f"deleted tag {a.name}" if t is None else f"tag {a.name} -> revision {t.revision}")
    return 0


def cmd_gc(a: argparse.Namespace) -> int:
    from cvmfs_like.retention import gc
    from cvmfs_like.store import OriginStore

    existing_directory(a.keys, "--keys")
    r = gc(OriginStore(_store(a), a.repo), a.keys, keep=a.keep, dry_run=a.dry_run)
    verb = "would remove" if a.dry_run else "removed"
    print(
        f"{verb} revisions {r.removed_revisions or 'none'}; kept {r.kept_revisions};"
        f" {verb} {r.deleted_objects} objects ({r.deleted_bytes / 1e6:.1f} MB)"
    )
    return 0


def cmd_resign(a: argparse.Namespace) -> int:
    from cvmfs_like.store import OriginStore
    from trust.repository import RepositoryWriter

    existing_directory(a.keys, "--keys")
    store = OriginStore(_store(a), a.repo)
    with RepositoryWriter.open(store.metadata_dir, a.keys) as repo:
        if a.all:
            repo.refresh_all()
        else:
            repo.refresh_timestamp()
    print(f"re-signed {'all roles' if a.all else 'timestamp'} of {a.repo}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from swarm.origin import serve
    from swarm.readiness import notify_ready

    listen: Address = a.listen
    existing_directory(a.store, "store")
    print(f"serving {a.store} on http://{listen}/", flush=True)
    serve(a.store, listen.host, listen.port, ready=notify_ready)
    return 0


def _mount_config(a: argparse.Namespace) -> Any:
    from swarm.mount_service import MountConfig

    return MountConfig(
        name=a.name,
        mountpoint=a.mountpoint.resolve(),
        origin=parse_origin(a.origin, "--origin"),
        trust_root=a.trust.resolve(),
        cache=a.cache.resolve(),
        quota=a.quota,
        ttl=a.ttl,
        fetch_timeout=a.fetch_timeout,
        tag=a.tag,
        threads=a.threads,
        start_profile=not a.no_start_profile,
        start_profile_window=a.start_profile_window,
        start_profile_entries=a.start_profile_entries,
    )


def cmd_mount(a: argparse.Namespace) -> int:
    from swarm.mount_service import check_mount_config, run_mount, start_detached

    cfg = _mount_config(a)
    if a.foreground:
        run_mount(cfg, ready_fd=a.ready_fd)
        return 0
    argv = [
        "mount",
        a.name,
        str(cfg.mountpoint),
        "--origin",
        a.origin,
        "--trust",
        str(cfg.trust_root),
        "--cache",
        str(cfg.cache),
        "--quota",
        str(a.quota),
        "--ttl",
        str(a.ttl),
        "--fetch-timeout",
        str(a.fetch_timeout),
        "--threads",
        str(a.threads),
    ]
    if a.tag:
        argv += ["--tag", a.tag]
    if a.no_start_profile:
        argv.append("--no-start-profile")
    argv += ["--start-profile-window", str(a.start_profile_window)]
    argv += ["--start-profile-entries", str(a.start_profile_entries)]
    argv += ["--log-format", a.log_format]
    if a.debug:
        argv.insert(0, "--debug")
    check_mount_config(cfg)  # a bad option is reported here, not in the child's log
    msg = start_detached(argv, cfg.cache)
    print(f"mounted {a.name} revision {msg.split()[1]} at {cfg.mountpoint}")
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    from swarm.mount_service import unmount

    unmount(a.mountpoint)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    """Exit status 1 when a mount is dead or does not answer (each is reported)."""
    from swarm.mount_service import MountState, is_swarm_mountpoint, mount_state, swarm_mounts

    if a.config or a.api:
        return _node_status(a)
    if a.mountpoint and not is_swarm_mountpoint(a.mountpoint):
        raise ConfigError(f"{a.mountpoint} is not a swarm mount")
    targets = [a.mountpoint] if a.mountpoint else [mp for _, mp in swarm_mounts()]
    reports = [{"mountpoint": str(mp), **mount_state(mp)} for mp in targets]
    trouble = any(st["state"] in (MountState.DEAD, MountState.UNKNOWN) for st in reports)
    if a.json:
        print(json.dumps(reports if not a.mountpoint else reports[0], indent=2))
        return 1 if trouble else 0
    if not reports:
        print("no swarm mounts")
    for st in reports:
        if st["state"] != MountState.MOUNTED:
            print(f"{st['mountpoint']}: {st['error']}")
            continue
        cache: dict[str, int] = st["cache"]  # type: ignore[assignment]
        print(
            f"{st['mountpoint']}: {st['repository']} revision {st['revision']}"
            f"{' (tag ' + str(st['tag']) + ')' if st['tag'] else ''}"
        )
        print(f"  catalog {st['catalog']}")
        print(
            f"  cache {cache['used'] / 1e6:.1f} / {cache['quota'] / 1e6:.1f} MB,"
            f" {cache['objects']} objects, {cache['hits']} hits, {cache['misses']} misses,"
            f" {cache['failures']} failures"
        )
        profile = st.get("start_profile")
        if isinstance(profile, dict) and profile.get("state") not in (None, "off", "none"):
            counts = ", ".join(f"{v} {k}" for k, v in profile.items() if k != "state" and v)
            print(f"  start profile: {profile['state']}" + (f" ({counts})" if counts else ""))
        if st.get("offline"):
            print("  OFFLINE: serving cached metadata")
        if st.get("last_error"):
            print(f"  last error: {st['last_error']}")
    return 1 if trouble else 0


def cmd_reload(a: argparse.Namespace) -> int:
    from swarm.mount_service import control

    r = control(a.mountpoint, "reload", timeout=a.timeout)
    if r.get("error"):
        print(f"swarm: reload: {r['error']} (still revision {r.get('revision')})", file=sys.stderr)
        return 1
    print(
        f"revision {r['revision']}"
        + (f" ({r['changed_paths']} paths changed)" if r["changed"] else " (unchanged)")
    )
    return 0


def cmd_node(a: argparse.Namespace) -> int:
    from swarm.daemon import run_node

    run_node(a.config)
    return 0


def _api_base(a: argparse.Namespace) -> str:
    if a.api:
        return str(a.api).rstrip("/") + "/"
    from swarm.config import load_config

    cfg = load_config(a.config)
    state = cfg.data_dir / "node.json"
    try:
        return str(json.loads(state.read_text())["api"])
    except (OSError, ValueError, KeyError):
        host = "127.0.0.1" if cfg.api.host in ("0.0.0.0", "::") else cfg.api.host
        return f"http://{host}:{cfg.api.port}/"


def _node_status(a: argparse.Namespace) -> int:
    from swarm.exceptions import FetchStatus
    from swarm.http_get import HTTPClient
    from swarm.status import NodeStatus, render

    base = _api_base(a)
    try:  # one deadline for the whole answer: a hung daemon cannot hang `swarm status`
        body = HTTPClient().get(
            base + "v1/status", deadline=time.monotonic() + 10.0, limit=64 << 20
        )
        st = json.loads(body)
    except FetchStatus as exc:
        raise FetchError(f"node API {base}: HTTP {exc.status}") from None
    except FetchError as exc:
        raise FetchError(f"node API {base} unreachable: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"node API {base}: not a status report: {exc}") from None
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    try:
        report = NodeStatus.from_json(st)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"node API {base}: not a status report: {exc}") from None
    print("\n".join(render(report)))
    return 0


def cmd_trust_client(a: argparse.Namespace, rest: list[str]) -> int:
    from trust.conformance import main as conformance_main

    return conformance_main(rest)


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="swarm",
        description="Signed software releases, shared and mounted.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="repository signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser("init", help="create a repository's keys and trusted root")
    k.add_argument("keydir", type=Path)
    k.add_argument("--repo", required=True, type=_repo_argument)
    k.add_argument(
        "--root-keys",
        type=count_argument(1, MAX_ROOT_KEYS),
        default=1,
        help="number of root keys (default 1)",
    )
    k.add_argument(
        "--threshold",
        type=count_argument(1, MAX_ROOT_KEYS),
        default=1,
        help="root signatures needed (default 1)",
    )
    k.set_defaults(func=cmd_keys_init)
    k = ksub.add_parser("rotate", help="replace a role's key (writes a new root version)")
    k.add_argument("keydir", type=Path)
    k.add_argument("--role", required=True, choices=["root", "targets", "snapshot", "timestamp"])
    k.add_argument("--repo", required=True, type=_repo_argument)
    k.add_argument("--store", required=True, type=Path)
    k.set_defaults(func=cmd_keys_rotate)

    def repo_args(sp: argparse.ArgumentParser, keys: bool = True) -> None:
        sp.add_argument(
            "--repo", required=True, type=_repo_argument, help="repository name (sw.example.org)"
        )
        if keys:
            sp.add_argument("--keys", required=True, type=Path, help="key directory")
        sp.add_argument("--store", required=True, type=Path, help="origin store directory")

    s = sub.add_parser("publish", help="publish a directory tree as a new signed revision")
    s.add_argument("src", type=Path)
    repo_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument(
        "--catalog-entries",
        type=count_argument(1),
        default=4096,
        metavar="N",
        help="a directory with N or more entries below it gets its own catalog (default 4096)",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument(
        "--no-torrent",
        action="store_true",
        help="sign no BitTorrent v2 torrent for the revision (nodes then fetch from the origin)",
    )
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("revisions", help="list a repository's revisions and tags")
    repo_args(s, keys=False)
    s.set_defaults(func=cmd_revisions)

    s = sub.add_parser("tag", help="name a revision (default: the newest)")
    s.add_argument("name")
    repo_args(s)
    s.add_argument("--revision", type=count_argument(1))
    s.add_argument("--delete", action="store_true")
    s.set_defaults(func=cmd_tag)

    s = sub.add_parser("gc", help="drop old revisions and unreferenced objects from a store")
    repo_args(s)
    s.add_argument(
        "--keep", type=count_argument(1), default=3, help="newest revisions to keep (default 3)"
    )
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("resign", help="re-sign the timestamp (cron) or every role")
    repo_args(s)
    s.add_argument("--all", action="store_true", help="re-sign targets and snapshot too")
    s.set_defaults(func=cmd_resign)

    s = sub.add_parser("serve", help="serve a store over HTTP (the origin)")
    s.add_argument("store", type=Path)
    s.add_argument("--listen", type=_listen_argument, default="127.0.0.1:8080")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("mount", help="mount a repository read-only (FUSE)")
    s.add_argument("name", type=_repo_argument)
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--origin", required=True, help="origin base URL, e.g. http://127.0.0.1:8080/")
    s.add_argument("--trust", required=True, type=Path, help="the repository's trusted root.json")
    s.add_argument("--cache", required=True, type=Path)
    s.add_argument("--quota", type=size_argument, default="10G", help="cache quota (default 10G)")
    s.add_argument(
        "--ttl", type=seconds_argument(), default=60.0, help="seconds between revision checks"
    )
    s.add_argument(
        "--fetch-timeout", type=seconds_argument(), default=10.0, help="seconds per object fetch"
    )
    s.add_argument(
        "--threads",
        type=count_argument(2, 10000),
        default=MOUNT_THREADS,
        help=f"FUSE worker threads (default {MOUNT_THREADS}); at most 3/4 wait on fetches",
    )
    s.add_argument("--tag", help="follow a tag instead of the newest revision")
    s.add_argument(
        "--no-start-profile",
        action="store_true",
        help="neither record what readers read first nor prefetch it on a cold start",
    )
    s.add_argument(
        "--start-profile-window",
        type=seconds_argument(),
        default=ProfileSettings.window,
        help="seconds after a revision's first read that its start profile records"
        f" (default {ProfileSettings.window:g})",
    )
    s.add_argument(
        "--start-profile-entries",
        type=count_argument(1, 1_000_000),
        default=ProfileSettings.max_entries,
        help=f"most entries in a start profile (default {ProfileSettings.max_entries})",
    )
    s.add_argument("--foreground", action="store_true")
    s.add_argument("--ready-fd", type=count_argument(0), help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount a swarm mount")
    s.add_argument("mountpoint", type=Path)
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("status", help="a node daemon's state, or revision and cache of mounts")
    s.add_argument("mountpoint", type=Path, nargs="?")
    s.add_argument("--config", type=Path, help="the node's config: ask its daemon")
    s.add_argument("--api", help="the node daemon's API URL (default: from --config)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reload", help="check for a new revision now")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--timeout", type=seconds_argument(), default=60.0)
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("node", help="run the node daemon (swarm, mount, API)")
    s.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    s.set_defaults(func=cmd_node)

    sub.add_parser(
        "trust-client", help="TUF conformance client (see tuf-conformance)", add_help=False
    )
    jobs = add_runner_commands(sub)  # lease, job run, pilot (runner/cli.py)
    add_job_client_commands(jobs)  # job submit / list / status of a node (swarm/job_cli.py)
    add_image_commands(sub)  # image publish / verify / list (swarm/image_cli.py)
    add_doctor_command(sub)  # doctor: can this node run (swarm/doctor.py)
    add_site_commands(sub)  # site-job submit / status / list / gather, site-broker (sitejob/cli.py)
    add_vm_commands(sub)  # vm start / list / status / stop (vm/cli.py)
    for path in LONG_RUNNING:  # --log-format text|json (swarm/logs.py)
        add_log_format_option(subcommand(p, *path))
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    debug = "--debug" in args_in[:1]
    if "trust-client" in args_in[:2]:
        rest = args_in[args_in.index("trust-client") + 1 :]
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
        return cmd_trust_client(argparse.Namespace(), rest)
    a = parser.parse_args(args_in)
    configure_logging(debug=a.debug, log_format=getattr(a, "log_format", "text"))
    try:
        code: int = a.func(a)
        return code
    except OUR_ERRORS as exc:
        if a.debug:
            raise
        one_line = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"swarm: {one_line}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        print("swarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
