"""``python -m bench.distribution``: one file from one source to N clients, side by side.

Every system runs in a fresh :class:`swarm_testing.netns.Network` of network namespaces in
which every node's link is shaped to ``--rate-mbit`` each way: the source is host 0,
the clients the next N hosts (for ``squid`` the site cache is host 1 and the clients
follow it).  The clock starts when the clients are started (servers and seeds are
already up) and stops when the last client holds the complete file; afterwards the
SHA-256 of every client's copy is checked, and a system whose copies do not all
match is reported as failed, not timed.

Systems:

- ``http``: nginx on the source, N ``curl`` clients at once;
- ``squid``: the same nginx as origin, one squid site cache in its own namespace
  (memory cache big enough for the file, ``collapsed_forwarding on``, so the origin
  serves the file once), N ``curl`` clients through it: the CVMFS model;
- ``aria2``: a BitTorrent swarm of aria2c (a v1 torrent made here, a tiny HTTP
  tracker of ours inside the source namespace, no DHT/LPD; peer exchange on); the
  source seeds with aria2c, every client keeps seeding after it completes;
- ``swarm``: ours, through ``bench.swarm_distribution.run_swarm(net, source,
  clients, file)`` when that module exists.  The call is timed as a whole unless it
  returns a mapping with ``"seconds"`` (the time it measured itself, e.g. without
  daemon start-up) and/or ``"files"`` (the clients' copies, which are then checked
  here like the others'; without them the hook is trusted to have verified).

Each figure is also given as a ratio to the Kumar-Ross lower bound
``max(F/u_s, F/d_min, N*F/(u_s + sum u_i))`` with the nominal link rate, and the
source's upload is reported in copies of the file (what the origin had to send).

Where things are: :mod:`bench.distribution_trial` (what a trial is given and
returns, the checks of the copies), :mod:`bench.distribution_baselines` (http,
squid, aria2), :mod:`bench.bittorrent` (the torrent and tracker for aria2),
:mod:`bench.distribution_report` (the record and its markdown); this module runs
the systems one after the other and is the command line.

Only processes started here (through the network's hosts, by PID) are ended; the
namespaces, veths and bridge go with the network even on an error or Ctrl-C
(SIGTERM is turned into the same orderly exit).  Results go to
``bench/results/distribution.json`` and ``bench/results/DISTRIBUTION.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.bittorrent import TRACKER_PORT, serve_tracker
from bench.distribution_baselines import system_aria2, system_http, system_squid
from bench.distribution_report import describe, make_record, markdown, write
from bench.distribution_trial import (
    FILE_NAME,
    MIB,
    PREFIX,
    Outcome,
    Setup,
    checked_outcome,
    make_source_file,
)
from bench.util import ROOT, BenchError, say
from swarm_testing.netns import Network, cleanup_stale

SYSTEMS = ("http", "squid", "aria2", "swarm")
WORK = ROOT / "bench" / "work" / "distribution"
RESULTS = ROOT / "bench" / "results"


def system_swarm(setup: Setup, out: Path) -> Outcome:
    try:
        mod = importlib.import_module("bench.swarm_distribution")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.swarm_distribution":
            raise
        return Outcome("swarm", note="not available (no bench/swarm_distribution.py yet)")
    run_swarm = mod.run_swarm
    with Network(setup.nodes + 1, rate_mbit=setup.rate_mbit, prefix=PREFIX) as net:
        source, clients = net.hosts[0], net.hosts[1:]
        sent0 = net.counters(source)[0]
        t0 = time.monotonic()
        got = run_swarm(net, source, clients, setup.file)
        elapsed = time.monotonic() - t0
        sent = net.counters(source)[0] - sent0
    seconds = elapsed
    files: list[Path] = []
    if isinstance(got, Mapping):
        seconds = float(got.get("seconds", elapsed))
        files = [Path(p) for p in got.get("files", [])]
    if files:
        o = checked_outcome("swarm", setup, [], files, sent, {"call_seconds": elapsed})
        if o.error is None:
            o.seconds = seconds
        return o
    note = "copies verified by run_swarm itself"
    return Outcome(
        "swarm",
        seconds=seconds,
        verified=setup.nodes,
        source_sent_bytes=sent,
        extra={"call_seconds": elapsed},
        note=note,
    )


RUNNERS: dict[str, Callable[[Setup, Path], Outcome]] = {
    "http": system_http,
    "squid": system_squid,
    "aria2": system_aria2,
    "swarm": system_swarm,
}


# -- the run -----------------------------------------------------------------------


def run_distribution(
    nodes: int = 16,
    size_mib: float = 256,
    rate_mbit: float = 50.0,
    systems: Iterable[str] = SYSTEMS,
    *,
    work: Path = WORK,
    results: Path | None = RESULTS,
    command: str = "",
) -> dict[str, Any]:
    """Run the systems one after the other, each in a fresh network; return the record.

    Writes ``distribution.json`` and ``DISTRIBUTION.md`` into ``results`` unless it is
    None.  A system that fails is recorded with its error; the others still run.
    Raises ``BenchError`` when a prerequisite is missing (not root, no nginx...).
    """
    systems = list(systems)
    unknown = [s for s in systems if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(RUNNERS)}")
    check_prerequisites(systems)
    removed = cleanup_stale(PREFIX)
    if removed:
        say(f"removed leftovers of an earlier run: {removed}")
    size = int(size_mib * MIB)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_mkdir(work)))
    os.chmod(run_dir, 0o755)  # squid (user proxy) writes below it
    record: dict[str, Any]
    try:
        say(f"distribution: {size_mib:g} MiB to {nodes} clients, links {rate_mbit:g} Mbit/s")
        file, digest = make_source_file(run_dir, size)
        setup = Setup(nodes, size, rate_mbit, file, digest, run_dir)
        outcomes: list[Outcome] = []
        for name in systems:
            say(f"{name}: starting (Kumar-Ross bound {setup.bound:.1f} s)")
            out = run_dir / name
            out.mkdir()
            os.chmod(out, 0o755)
            try:
                o = RUNNERS[name](setup, out)
            except Exception as exc:  # recorded; the other systems still run
                say(traceback.format_exc().rstrip())
                o = Outcome(name, error=f"{type(exc).__name__}: {exc}")
            finally:
                _remove_copies(out)
            outcomes.append(o)
            say(f"{name}: {describe(o, setup)}")
        record = make_record(setup, outcomes, command or shlex.join(sys.argv))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if results is not None:
        write(record, results)
    return record


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _remove_copies(out: Path) -> None:
    for p in out.glob(f"c*/{FILE_NAME}"):
        p.unlink()


def check_prerequisites(systems: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("network namespaces need root")
    need = {"ip": True, "tc": True, "nsenter": True, "curl": True}
    need["nginx"] = "http" in systems or "squid" in systems
    need["squid"] = "squid" in systems
    need["aria2c"] = "aria2" in systems
    missing = [t for t, needed in need.items() if needed and shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: run `make bench` (it installs nginx, squid,"
            " aria2, curl and iproute2)"
        )


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distribution", description=__doc__)
    p.add_argument("--nodes", type=int, default=16, help="clients (default 16)")
    p.add_argument("--size-mib", type=float, default=256, help="file size (default 256)")
    p.add_argument("--rate-mbit", type=float, default=50.0, help="every link (default 50)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--serve-tracker", metavar="ADDR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_tracker:
        serve_tracker(args.serve_tracker, TRACKER_PORT)
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        record = run_distribution(
            args.nodes,
            args.size_mib,
            args.rate_mbit,
            args.systems,
            results=args.results,
            command=shlex.join(["python", "-m", "bench.distribution", *sys.argv[1:]]),
        )
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    sys.stdout.write(markdown(record))
    return 1 if any(r["error"] for r in record["systems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
