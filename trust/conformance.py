"""The tuf-conformance client-under-test CLI over :class:`TrustedRepository`.

Protocol (theupdateframework/tuf-conformance, CLIENT-CLI.md)::

    <client> --metadata-dir D init TRUSTED_ROOT
    <client> --metadata-dir D --metadata-url U refresh
    <client> --metadata-dir D --metadata-url U --target-name T \\
             --target-base-url U2 --target-dir D2 download

Exit status 0 on success, 1 on any failure (the reason goes to stderr).
``init`` only copies the root into ``D`` as ``root.json`` and makes no request.
Wired as ``swarm trust-client ...``, which calls :func:`main`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trust.client import TrustedRepository
from trust.exceptions import TrustError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trust-client", description="TUF conformance client (tuf-conformance CLIENT-CLI)"
    )
    parser.add_argument("--metadata-dir", type=Path, required=True)
    parser.add_argument("--metadata-url")
    parser.add_argument("--target-name")
    parser.add_argument("--target-base-url")
    parser.add_argument("--target-dir", type=Path)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="install the trusted root (no network)")
    init.add_argument("trusted_root", type=Path)
    commands.add_parser("refresh", help="update top-level metadata")
    commands.add_parser("download", help="refresh, then fetch and verify one target")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one conformance command; return the process exit status (0 or 1).

    Never raises for trust, transport or local errors: they are reported on
    stderr with exit status 1.  Bad usage also returns 1 (not argparse's 2),
    as the protocol knows only 0 and 1.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 1
    metadata_dir: Path = args.metadata_dir
    try:
        if args.command == "init":
            metadata_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.trusted_root, metadata_dir / "root.json")
            return 0
        if not args.metadata_url:
            raise _UsageError("--metadata-url is required")
        repo = TrustedRepository(metadata_dir, args.metadata_url)
        if args.command == "refresh":
            repo.refresh()
            return 0
        if not (args.target_name and args.target_base_url and args.target_dir):
            raise _UsageError("download needs --target-name, --target-base-url and --target-dir")
        repo.download_target(args.target_name, args.target_base_url, args.target_dir)
        return 0
    except (TrustError, OSError, _UsageError) as exc:
        print(f"trust-client {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


class _UsageError(Exception):
    pass


if __name__ == "__main__":
    sys.exit(main())
