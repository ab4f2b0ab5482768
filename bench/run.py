"""``python -m bench.run``: the "signed software releases" benchmark.

Publishes a generated tree and a real Python package tree, serves them from a
loopback origin, mounts them, and compares, in one run, against ``sha256sum``,
the native directory and squashfuse (a C FUSE filesystem over a mksquashfs
image of the same tree).  See ``bench/README.md`` for what each row means.

This module is the command line and runs the sections in order: the lease trace
(:mod:`bench.lease_trace`), the swarm's distribution and streaming
(:mod:`bench.distribution`, :mod:`bench.image_streaming`), the site event
service (:mod:`bench.site_gather`, :mod:`bench.site_service`), VMs and live
migration (:mod:`bench.vm_bench`), then the release
sections (:mod:`bench.release_bench` holds their state, :mod:`bench.release_sections`
the timed sections, :mod:`bench.report` the results files).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from bench import lease_trace
from bench.release_bench import RESULTS, ReleaseBench, check_prerequisites, mount_possible
from bench.release_sections import (
    find_section,
    import_section,
    publish_section,
    read_section,
    readers_section,
)
from bench.report import base_meta, write_results
from bench.start_profile_bench import start_profile_section
from bench.util import BenchError, say


def run_releases(args: argparse.Namespace) -> int:
    """The release sections (publish, then find, read, import unless ``--only`` skips
    them); writes the results even when a section failed.  Raises ``BenchError`` when a
    prerequisite is missing."""
    b = ReleaseBench(args)
    b.meta = base_meta("")
    b.meta["notes"] += check_prerequisites()
    sections: list[tuple[str, Callable[[ReleaseBench], None]]] = [
        ("find", find_section),
        ("read", read_section),
        ("readers", readers_section),
    ]
    if not b.args.skip_python:
        sections.append(("import", import_section))
        sections.append(("profile", start_profile_section))  # bench/start_profile_bench.py
    try:
        b.prepare()
        publish_section(b)
        b.origin = b.res.start_origin(b.store, b.run_dir / "origin.log")
        say(f"origin at {b.origin}")
        why = mount_possible()
        if why:
            b.meta["errors"].append(f"mount sections skipped: {why}")
            say(f"skipping the mount sections: {why}")
            sections = []
        for name, fn in sections:
            if b.args.only and name not in b.args.only:
                continue
            try:
                fn(b)
            except BenchError as exc:
                say(f"section {name} failed: {exc}")
                b.meta["errors"].append(f"{name}: {str(exc).splitlines()[0]}")
                b.res.close()
                b.origin = b.res.start_origin(b.store, b.run_dir / "origin.log")
            except Exception:
                say(f"section {name} crashed:\n{traceback.format_exc()}")
                b.meta["errors"].append(f"{name}: crashed (see stderr)")
                raise
    finally:
        b.res.close()
        if b.rows:
            tag = b.args.tag or ("quick" if b.args.quick else "full")
            j, md = write_results(RESULTS, tag, b.rows, b.samples, b.meta)
            say(f"wrote {j} and {md}")
            sys.stdout.write(md.read_text())
    failed = [r.name for r in b.rows if r.passed is False]
    if failed:
        say(f"{len(failed)} goal(s) missed: {'; '.join(failed)}")
    return 1 if b.meta["errors"] else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="5k files, 1 x 64 MiB, 3 samples")
    p.add_argument("--files", type=int, help="small files in the generated tree (100000)")
    p.add_argument("--large-mib", type=int, help="size of each large file in MiB (256)")
    p.add_argument("--large-count", type=int, help="number of large files (3)")
    p.add_argument("--reps", type=int, help="samples per timed measure (3)")
    p.add_argument("--publish-runs", type=int, help="full publishes timed (3; 2 if --quick)")
    p.add_argument("--origin-reps", type=int, help="cold-from-origin samples (2; 1 if --quick)")
    p.add_argument("--skip-python", action="store_true", help="no Python package tree")
    p.add_argument(
        "--only",
        nargs="*",
        choices=[
            "find",
            "read",
            "readers",
            "import",
            "profile",
            "lease",
            "distribution",
            "streaming",
            "site",
            "ops",
            "vm",
        ],
        help="sections",
    )
    p.add_argument("--tag", help="results file name (default: quick or full)")
    p.add_argument(
        "--profile-latency-ms",
        type=float,
        default=10.0,
        help="delay of each origin answer in the start profile section (10)",
    )
    a = p.parse_args(argv)
    quick = a.quick
    a.files = a.files if a.files is not None else (5000 if quick else 100_000)
    a.large_mib = a.large_mib if a.large_mib is not None else (64 if quick else 256)
    a.large_count = a.large_count if a.large_count is not None else (1 if quick else 3)
    a.reps = a.reps if a.reps is not None else 3
    a.publish_runs = a.publish_runs if a.publish_runs is not None else (2 if quick else 3)
    a.origin_reps = a.origin_reps if a.origin_reps is not None else (1 if quick else 2)
    return a


def _swarm_sections(args: argparse.Namespace) -> int:
    """Distribution of one image to N namespaced nodes against http, squid and
    aria2, then boot streaming through the mount (full: N=16, 256 MiB)."""
    import signal

    from bench import distribution, image_streaming
    from bench.distribution_report import markdown

    signal.signal(signal.SIGTERM, distribution._sigterm)  # tear the namespaces down on SIGTERM
    rc = 0
    if not args.only or "distribution" in args.only:
        nodes, size = (4, 32) if args.quick else (16, 256)
        say(f"distribution: {nodes} nodes, {size} MiB, 50 Mbit/s links")
        record = distribution.run_distribution(
            nodes,
            size,
            50.0,
            command=f"python -m bench.distribution --nodes {nodes} --size-mib {size}",
        )
        sys.stdout.write(markdown(record))
        rc |= 1 if any(r["error"] for r in record["systems"]) else 0
    if not args.only or "streaming" in args.only:
        size = 64 if args.quick else 256
        rc |= image_streaming.main(["--size-mib", str(size)])
    return rc


def _site_sections(args: argparse.Namespace) -> int:
    """The site event service (issue 10): the gather's own costs
    (:mod:`bench.site_gather`), then four namespaced nodes with a death and an
    early lease end, as a site job and as node jobs (:mod:`bench.site_service`)."""
    from bench import site_gather, site_service

    if args.only and "site" not in args.only:
        return 0
    seconds = "60" if args.quick else "150"
    say(f"site: the gather's costs, then a site job of ~{seconds} s on 4 nodes")
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    try:
        rc = site_gather.main([])
    except Exception as exc:  # a broker that did not start, a gather that did not finish
        say(f"site gather failed: {exc}")
        rc = 1
    return rc | site_service.main(["--seconds", seconds], command=command)


def _ops_sections(args: argparse.Namespace) -> int:
    """Site operations (issue 13): an idle node's cost, ``/metrics`` during a
    distribution, a Slurm pilot's slot use (:mod:`bench.ops_bench`)."""
    from bench import ops_bench

    if args.only and "ops" not in args.only:
        return 0
    say("ops: idle node, /metrics under a distribution, the Slurm pilot")
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    return ops_bench.main(["--quick"] if args.quick else [], command=command)


def _vm_section(args: argparse.Namespace) -> int:
    """VMs booted from the streamed image, and live migration (issue 11)."""
    from bench import vm_bench

    if args.only and "vm" not in args.only:
        return 0
    pad = "64" if args.quick else "256"
    say(f"vm: a guest image with {pad} MiB unused, 50 Mbit/s links")
    return vm_bench.main(
        ["--pad-mib", pad], command="python -m bench.run " + " ".join(sys.argv[1:])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lease = lease_trace.from_bench_run(args.quick, args.only)  # runner: bench/lease_trace.py
        swarm = _swarm_sections(args)  # the swarm: bench/distribution.py, bench/image_streaming.py
        site = _site_sections(args)  # the site event service: bench/site_service.py
        ops = _ops_sections(args)  # site operations: bench/ops_bench.py
        vms = _vm_section(args)  # VMs and live migration: bench/vm_bench.py
        if args.only and not {"find", "read", "readers", "import", "profile"} & set(args.only):
            return lease or swarm or site or ops or vms
        return run_releases(args) or lease or swarm or site or ops or vms
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
