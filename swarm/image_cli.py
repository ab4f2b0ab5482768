"""The ``swarm image`` subcommands: ``publish``, ``verify`` and ``list``.

:func:`add_image_commands` registers them on the ``swarm`` parser.  Exit
status: 0 done (``verify``: the image is accepted), 1 refused or failed
(``verify``: the reason is printed), 2 usage errors (bad options, an
unreadable or invalid node configuration or policy file).

``verify`` and ``list`` read the repositories either from a node
configuration (``--config NODE.toml``: ``data_dir``, the
``[repositories."NAME"]`` tables and ``[image_policy]``; each repository's
metadata cache is ``DATA_DIR/repos/NAME/metadata``, the daemon's) or from
explicit options for one repository.  They refresh the metadata from the
origin and fall back to the cached verified state (expired metadata is then
accepted, with a warning) when the origin cannot be reached; ``--offline``
uses the cache only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cvmfs_like.exceptions import ReleaseError
from runner.sizes import size_argument
from swarm.config import parse_origin
from swarm.exceptions import ConfigError, SwarmError
from swarm.image_verify import ImageRepository, verify_image
from swarm.images import DEFAULT_PIECE_LENGTH, KNOWN_FORMATS, StderrProgress, publish_image
from swarm.options import OneLineParser, check_directory, existing_directory, seconds_argument
from trust.client import RoleSigners, TrustedRepository
from trust.exceptions import TrustConfigError, TrustError, TrustTransportError, VerificationError
from trust.policy import ImagePolicy
from trust.targets import ImageTarget

Handler = Callable[[argparse.Namespace], int]


def _guard(func: Handler) -> Handler:
    def run(a: argparse.Namespace) -> int:
        try:
            return func(a)
        except ConfigError as exc:
            print(f"swarm: {exc}", file=sys.stderr)
            return 2
        except (SwarmError, TrustError, ReleaseError) as exc:
            if getattr(a, "debug", False):
                raise
            print(f"swarm: {exc}", file=sys.stderr)
            return 1

    return run


def _warn(text: str) -> None:
    print(f"swarm: warning: {text}", file=sys.stderr)


# -- publish -------------------------------------------------------------------------------


def _summary(repo: str, t: ImageTarget) -> dict[str, Any]:
    return {
        "repository": repo,
        "target": t.target_name,
        "path": t.relative_path,
        "torrent_object": f"data/{t.torrent_sha256[:2]}/{t.torrent_sha256}",
        **t.to_custom(),
    }


def cmd_publish(a: argparse.Namespace) -> int:
    existing_directory(a.keys, "--keys")
    check_directory(a.store, "--store")
    target = publish_image(
        a.image,
        name=a.name,
        version=a.version,
        repo=a.repo,
        keys=a.keys,
        store=a.store,
        format=a.format,
        piece_length=a.piece_length,
        progress=None if a.quiet else StderrProgress(),
    )
    if a.json:
        print(json.dumps(_summary(a.repo, target), indent=1))
        return 0
    t = target
    print(
        f"published image {t.name} {t.version} in {a.repo}: {t.format}, "
        f"{t.size / 2**20:,.1f} MiB ({t.size} bytes)"
    )
    for label, value in (
        ("target", t.target_name),
        ("sha256", t.sha256),
        ("info-hash", f"{t.info_hash} (BitTorrent v2)"),
        ("pieces root", f"{t.pieces_root} ({t.piece_length // 1024} KiB pieces)"),
        ("file", f"{a.store / a.repo / t.relative_path}"),
        ("torrent", f"{a.store / a.repo}/data/{t.torrent_sha256[:2]}/{t.torrent_sha256}"),
    ):
        print(f"  {label:12} {value}")
    return 0


# -- where verify and list find repositories ---------------------------------------------------


@dataclass(frozen=True)
class RepositorySource:
    """One repository as a node follows it: where its metadata comes from."""

    name: str
    origin: str | None  # base URL of the store, None: cached metadata only
    trust: Path  # root.json installed out of band
    metadata_dir: Path  # the TUF metadata cache
    images: bool = True  # the node follows this repository's images


def _usage(text: str) -> NoReturn:
    raise ConfigError(text)


@contextmanager
def _sources(a: argparse.Namespace) -> Iterator[tuple[list[RepositorySource], ImagePolicy]]:
    """The repositories and policy the options name (temporary caches are
    removed on exit)."""
    explicit = [f"--{n}" for n in ("repo", "trust", "origin", "metadata-dir", "policy")]
    given = [f for f in explicit if getattr(a, f[2:].replace("-", "_")) is not None]
    if a.config is not None:
        if given:
            _usage(f"--config and {', '.join(given)} exclude each other")
        from swarm.config import load_config

        cfg = load_config(a.config)
        try:
            policy = ImagePolicy.from_table(cfg.image_policy, source=f"{a.config} [image_policy]")
        except TrustConfigError as exc:
            raise ConfigError(str(exc)) from None
        sources = [
            RepositorySource(r.name, r.origin, r.trust, cfg.repo_dir(r.name) / "metadata", r.images)
            for r in cfg.repositories.values()
        ]
        if not sources:
            _usage(f'{a.config} follows no repository ([repositories."NAME"] tables)')
        off = [s.name for s in sources if not s.images]
        policy = policy.decline(
            off,
            f"this node does not follow the repository's images (images = false in {a.config})",
        )
        yield sources, policy
        return
    if a.repo is None or a.trust is None:
        _usage("give --config NODE.toml, or --repo NAME --trust ROOT.json --origin URL")
    if a.origin is None and (a.metadata_dir is None or not a.offline):
        _usage("--origin URL is needed unless --offline reads an existing --metadata-dir")
    origin = None if a.origin is None else parse_origin(a.origin, "--origin")
    if a.metadata_dir is not None:
        check_directory(a.metadata_dir, "--metadata-dir")
    policy = ImagePolicy()
    if a.policy is not None:
        try:
            text = a.policy.read_text()
        except OSError as exc:
            _usage(f"cannot read policy {a.policy}: {exc.strerror}")
        try:
            policy = ImagePolicy.from_toml(text, source=str(a.policy))
        except TrustConfigError as exc:
            raise ConfigError(str(exc)) from None
    with ExitStack() as stack:
        metadata_dir = a.metadata_dir
        if metadata_dir is None:
            metadata_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-")))
        yield [RepositorySource(a.repo, origin, a.trust, metadata_dir)], policy


def open_repository(
    source: RepositorySource, *, offline: bool, timeout: float
) -> TrustedRepository:
    """A verified view of ``source``: refreshed from its origin, or the
    cached state when ``offline``, when it has no origin, or (with a
    warning) when the origin cannot be reached.

    Raises:
        ConfigError: the trusted root file cannot be read.
        VerificationError: the metadata on offer fails verification.
        TrustTransportError: no origin reachable and nothing usable cached.
        TrustConfigError: the cache or the trusted root is unusable.
    """
    from swarm.repository import RepositorySpec, open_trusted

    try:
        root = source.trust.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the trusted root of {source.name} ({source.trust}): {exc.strerror}"
        ) from None
    spec = RepositorySpec(source.name, source.origin, root, source.metadata_dir, timeout)
    trusted, _ = open_trusted(spec)
    if offline or source.origin is None:
        trusted.load_cached()
        return trusted
    outcome = trusted.refresh_or_cached()
    if isinstance(outcome.error, VerificationError):
        raise outcome.error
    if outcome.cached_error is not None:
        raise TrustTransportError(
            f"{source.name}: cannot refresh ({outcome.error}) and no usable cached metadata"
            f" ({outcome.cached_error})"
        ) from outcome.error
    if outcome.error is not None:
        _warn(f"{source.name}: using cached metadata: cannot refresh ({outcome.error})")
    return trusted


class _Unavailable:
    """A repository whose metadata could not be had: every question raises."""

    def __init__(self, error: TrustError) -> None:
        self.error = error

    def images(self) -> list[ImageTarget]:
        raise self.error

    def image(self, name: str, version: str) -> ImageTarget | None:
        raise self.error

    def signers(self, role: str = "targets") -> RoleSigners:
        raise self.error


def _open_all(sources: list[RepositorySource], a: argparse.Namespace) -> dict[str, ImageRepository]:
    repos: dict[str, ImageRepository] = {}
    for source in sources:
        try:
            repos[source.name] = open_repository(source, offline=a.offline, timeout=a.timeout)
        except ConfigError:
            raise
        except TrustError as exc:
            if len(sources) == 1:
                raise
            _warn(f"{source.name}: {exc}")
            repos[source.name] = _Unavailable(exc)
    return repos


# -- verify and list ---------------------------------------------------------------------------


def cmd_verify(a: argparse.Namespace) -> int:
    if not a.file.is_file():
        _usage(f"{a.file}: no such file" if not a.file.exists() else f"{a.file}: not a file")
    with _sources(a) as (sources, policy):
        repos = _open_all(sources, a)
        verdict = verify_image(
            a.file, repos, policy, progress=None if a.quiet else StderrProgress()
        )
    if a.json:
        print(json.dumps(verdict.to_json(), indent=1))
    else:
        print(f"{'accepted' if verdict.accepted else 'rejected'}: {verdict.reason}")
    return 0 if verdict.accepted else 1


def _signers_json(trusted: ImageRepository) -> dict[str, Any]:
    try:
        s = trusted.signers("targets")
    except TrustError as exc:
        return {"error": str(exc)}
    return {"version": s.version, "threshold": s.threshold, "keyids": sorted(s.signed)}


def cmd_list(a: argparse.Namespace) -> int:
    out: list[dict[str, Any]] = []
    with _sources(a) as (sources, policy):
        repos = _open_all(sources, a)
        for name in sorted(repos):
            trusted = repos[name]
            entry: dict[str, Any] = {"repository": name}
            try:
                images = trusted.images()
            except TrustError as exc:
                entry["error"] = str(exc)
                out.append(entry)
                continue
            entry["targets"] = _signers_json(trusted)
            entry["images"] = []
            for t in images:
                v = policy.check(name, t, trusted)
                entry["images"].append(
                    {
                        "target": t.target_name,
                        "accepted": v.accepted,
                        "code": v.code,
                        "reason": v.reason,
                        **t.to_custom(),
                    }
                )
            out.append(entry)
    if a.json:
        print(json.dumps({"repositories": out}, indent=1))
        return 0
    for entry in out:
        if "error" in entry:
            print(f"{entry['repository']}: unavailable: {entry['error']}")
            continue
        signers = entry["targets"]
        keys = ", ".join(signers.get("keyids", [])) or signers.get("error", "?")
        print(
            f"{entry['repository']}: {len(entry['images'])} image(s); targets "
            f"v{signers.get('version', '?')} signed by {keys}"
        )
        for i in entry["images"]:
            verdict = "accepted" if i["accepted"] else f"refused: {i['reason']}"
            print(
                f"  {i['name']:20} {i['version']:12} {i['format']:6} "
                f"{i['size'] / 2**20:10,.1f} MiB  {i['sha256'][:16]}  {verdict}"
            )
    return 0


# -- parser -------------------------------------------------------------------------------------


def _source_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", type=Path, help="the node configuration (repositories, policy)")
    s.add_argument("--repo", help="or one repository: its name")
    s.add_argument("--trust", type=Path, help="its trusted root.json")
    s.add_argument("--origin", help="its origin base URL, e.g. http://origin.example.org/")
    s.add_argument(
        "--metadata-dir", type=Path, help="its TUF metadata cache (default: a temporary one)"
    )
    s.add_argument("--policy", type=Path, help="a policy file ([image_policy]; default: accept)")
    s.add_argument("--offline", action="store_true", help="use cached metadata only")
    s.add_argument(
        "--timeout",
        type=seconds_argument(),
        default=10.0,
        help="seconds per origin request (default 10)",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")


def add_image_commands(sub: Any) -> None:
    """Register ``image publish``, ``image verify`` and ``image list`` on a
    subparsers object."""
    image = sub.add_parser("image", help="signed VM images: publish, verify, list")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")

    s = isub.add_parser("publish", help="publish a VM image as a signed, immutable version")
    s.add_argument("image", type=Path, help="the image file")
    s.add_argument("--name", required=True, help="image name, e.g. alma9-worker")
    s.add_argument("--version", required=True, help="image version, e.g. 2024.06.1")
    s.add_argument("--repo", required=True, help="repository name, e.g. sw.example.org")
    s.add_argument("--keys", required=True, type=Path, help="the repository's key directory")
    s.add_argument("--store", required=True, type=Path, help="origin store directory")
    s.add_argument(
        "--format", choices=KNOWN_FORMATS, help="image format (default: detected from content)"
    )
    s.add_argument(
        "--piece-length",
        type=size_argument,
        default=DEFAULT_PIECE_LENGTH,
        help="BitTorrent piece length, a power of two >= 16K (default 256K)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--json", action="store_true", help="print the target as JSON")
    s.set_defaults(func=_guard(cmd_publish))

    s = isub.add_parser(
        "verify", help="is this file a signed image the site accepts? (exit 0 yes, 1 no)"
    )
    s.add_argument("file", type=Path)
    _source_options(s)
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_guard(cmd_verify))

    s = isub.add_parser("list", help="signed images of the repositories and the policy's verdict")
    _source_options(s)
    s.set_defaults(func=_guard(cmd_list))


def main(argv: list[str] | None = None) -> int:
    """``swarm image ...`` on its own (tests; ``swarm.cli`` wires the same commands)."""
    p = OneLineParser(prog="swarm")
    add_image_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    code: int = a.func(a)
    return code
