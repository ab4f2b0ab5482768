"""The systems ``python -m bench.distribution`` compares ours against: http, squid, aria2.

Each ``system_*`` takes a :class:`~bench.distribution_trial.Setup` and a directory of
its own, builds a fresh :class:`swarm_testing.netns.Network` (the source is host 0),
starts its servers and seeds there, starts the clock when the clients start and
returns a checked :class:`~bench.distribution_trial.Outcome`:

- ``http``: nginx on the source, N ``curl`` clients at once;
- ``squid``: the same nginx as origin, one squid site cache (host 1; memory only,
  ``collapsed_forwarding on``, so the origin serves the file once), N ``curl``
  clients through it: the CVMFS model;
- ``aria2``: aria2c seeding on the source, our tracker (:mod:`bench.bittorrent`) in
  the source's namespace, N aria2c clients that keep seeding after they complete.

Every child is started through the network's hosts, so the network ends it (by PID)
when the ``with`` block closes, also on an error.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.bittorrent import TRACKER_PORT, make_v1_torrent, piece_length_for
from bench.distribution_trial import (
    CLEAN_ENV,
    FILE_NAME,
    MIB,
    PREFIX,
    Outcome,
    Setup,
    checked_outcome,
    open_log,
    wait_all,
    wait_port,
)
from bench.util import ROOT, BenchError
from swarm_testing.netns import Host, Network

HTTP_PORT = 80
SQUID_PORT = 3128
BT_PORT = 6881


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {addr}:{port};
        root {root};
    }}
}}
"""


def start_nginx(host: Host, root: Path, run_dir: Path) -> Path:
    """nginx in ``host``'s namespace serving ``root``; returns its access log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=run_dir, addr=host.addr, port=HTTP_PORT, root=root))
    with open_log(run_dir / "stderr.log") as log:
        proc = host.popen(
            ["nginx", "-p", run_dir, "-c", conf, "-e", run_dir / "error.log"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    wait_port(host, host.addr, HTTP_PORT, "nginx", proc)
    return run_dir / "access.log"


def origin_gets(access_log: Path) -> int:
    """Requests for the file the origin answered (GET, any status)."""
    if not access_log.exists():
        return 0
    return sum(1 for line in access_log.read_text().splitlines() if f"GET /{FILE_NAME} " in line)


def run_curls(
    clients: Sequence[Host], url: str, out: Path, setup: Setup, proxy: str | None = None
) -> tuple[list[float], list[Path]]:
    """N curl downloads at once; (seconds each took from the common start, copies)."""
    paths = []
    procs = []
    t0 = time.monotonic()
    for i, c in enumerate(clients):
        d = out / f"c{i}"
        d.mkdir(parents=True, exist_ok=True)
        paths.append(d / FILE_NAME)
        via = ["--proxy", proxy, "--noproxy", ""] if proxy else ["--noproxy", "*"]
        argv: list[str | Path] = ["curl", "-sS", "--fail", *via, "-o", d / FILE_NAME, url]
        with open_log(d / "curl.log") as log:
            procs.append(
                c.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=CLEAN_ENV)
            )

    def done(i: int) -> float | None:
        rc = procs[i].poll()
        if rc is None:
            return None
        if rc != 0:
            tail = (paths[i].parent / "curl.log").read_text()[-500:]
            raise BenchError(f"curl on {clients[i].name} exited with {rc}: {tail}")
        return time.monotonic() - t0

    return wait_all(done, len(clients), setup.deadline, "curl"), paths


def system_http(setup: Setup, out: Path) -> Outcome:
    with Network(setup.nodes + 1, rate_mbit=setup.rate_mbit, prefix=PREFIX) as net:
        source, clients = net.hosts[0], net.hosts[1:]
        access = start_nginx(source, setup.file.parent, out / "nginx")
        url = f"http://{source.addr}:{HTTP_PORT}/{FILE_NAME}"
        sent0 = net.counters(source)[0]
        times, paths = run_curls(clients, url, out, setup)
        sent = net.counters(source)[0] - sent0
    return checked_outcome("http", setup, times, paths, sent, {"origin_gets": origin_gets(access)})


SQUID_CONF = """\
http_port {addr}:{port}
acl benchnet src {subnet}
http_access allow benchnet
http_access deny all
cache_effective_user proxy
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
cache_store_log none
coredump_dir {dir}
visible_hostname squid.bench
# memory only, big enough for the one object; fetch it once for everyone
cache_mem {cache_mb} MB
maximum_object_size_in_memory {object_mb} MB
maximum_object_size {object_mb} MB
memory_cache_shared off
collapsed_forwarding on
read_ahead_gap {object_mb} MB
refresh_pattern . 60 100% 4320
icp_port 0
htcp_port 0
pinger_enable off
netdb_filename none
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
"""


def start_squid(host: Host, run_dir: Path, subnet: str, size: int) -> Path:
    """squid -N in ``host``'s namespace; returns its access log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    object_mb = size // MIB + 16
    conf = run_dir / "squid.conf"
    conf.write_text(
        SQUID_CONF.format(
            addr=host.addr,
            port=SQUID_PORT,
            subnet=subnet,
            dir=run_dir,
            cache_mb=2 * object_mb + 64,
            object_mb=object_mb,
        )
    )
    shutil.chown(run_dir, "proxy", "proxy")  # squid drops to the proxy user
    with open_log(run_dir / "stderr.log") as log:
        proc = host.popen(
            ["squid", "-N", "-f", conf], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    wait_port(host, host.addr, SQUID_PORT, "squid", proc)
    return run_dir / "access.log"


def system_squid(setup: Setup, out: Path) -> Outcome:
    with Network(setup.nodes + 2, rate_mbit=setup.rate_mbit, prefix=PREFIX) as net:
        source, cache, clients = net.hosts[0], net.hosts[1], net.hosts[2:]
        access = start_nginx(source, setup.file.parent, out / "nginx")
        subnet = str(ipaddress.ip_interface(f"{source.addr}/{net.prefixlen}").network)
        squid_log = start_squid(cache, out / "squid", subnet, setup.size)
        url = f"http://{source.addr}:{HTTP_PORT}/{FILE_NAME}"
        sent0 = net.counters(source)[0]
        times, paths = run_curls(
            clients, url, out, setup, proxy=f"http://{cache.addr}:{SQUID_PORT}"
        )
        sent = net.counters(source)[0] - sent0
    codes: dict[str, int] = {}
    if squid_log.exists():
        for line in squid_log.read_text().splitlines():
            parts = line.split()
            if len(parts) > 3 and FILE_NAME in line:
                codes[parts[3]] = codes.get(parts[3], 0) + 1
    extra = {"origin_gets": origin_gets(access), "squid_results": codes}
    return checked_outcome("squid", setup, times, paths, sent, extra)


ARIA2_COMMON = [
    "--no-conf=true",
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=true",
    "--disable-ipv6=true",
    f"--listen-port={BT_PORT}",
    "--seed-ratio=0.0",  # seed until we stop it
    "--bt-max-peers=0",
    "--file-allocation=none",
    "--summary-interval=0",
    "--console-log-level=warn",
    "--bt-save-metadata=false",
    "--auto-save-interval=0",
]

ARIA2_HOOK = """#!/bin/sh
# aria2 --on-bt-download-complete: $3 is the downloaded file
date +%s.%N > "$3.done"
"""


def system_aria2(setup: Setup, out: Path) -> Outcome:
    with Network(setup.nodes + 1, rate_mbit=setup.rate_mbit, prefix=PREFIX) as net:
        source, clients = net.hosts[0], net.hosts[1:]
        announce = f"http://{source.addr}:{TRACKER_PORT}/announce"
        torrent, info_hash = make_v1_torrent(setup.file, announce)
        tpath = out / "dist.torrent"
        tpath.write_bytes(torrent)
        hook = out / "done.sh"
        hook.write_text(ARIA2_HOOK)
        hook.chmod(0o755)
        tracker = source.popen(
            [sys.executable, "-m", "bench.distribution", "--serve-tracker", source.addr],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        wait_port(source, source.addr, TRACKER_PORT, "tracker", tracker)

        def aria2(host: Host, d: Path, *extra: str) -> subprocess.Popen[bytes]:
            d.mkdir(parents=True, exist_ok=True)
            argv: list[str | Path] = [
                "aria2c",
                *ARIA2_COMMON,
                f"--bt-external-ip={host.addr}",
                f"--dir={d}",
                f"--log={d / 'aria2.log'}",
                "--log-level=notice",
                *extra,
                tpath,
            ]
            with open_log(d / "stdout.log") as log:
                return host.popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=CLEAN_ENV
                )

        aria2(
            source,
            setup.file.parent,
            "--check-integrity=true",
            "--bt-seed-unverified=true",
        )

        def seeded() -> bool:
            r = source.run(
                ["curl", "-sS", f"http://{source.addr}:{TRACKER_PORT}/stats"],
                capture_output=True,
                text=True,
            )
            try:
                return int(json.loads(r.stdout).get(info_hash, [0, 0])[1]) >= 1
            except ValueError:
                return False

        deadline = time.monotonic() + 60
        while not seeded():
            if time.monotonic() > deadline:
                raise BenchError("the aria2 seed did not announce itself within 60 s")
            time.sleep(0.1)

        sent0 = net.counters(source)[0]
        t0_wall = time.time()
        dirs = [out / f"c{i}" for i in range(len(clients))]
        procs = [
            aria2(c, d, f"--on-bt-download-complete={hook}")
            for c, d in zip(clients, dirs, strict=True)
        ]

        def done(i: int) -> float | None:
            flag = dirs[i] / f"{FILE_NAME}.done"
            try:
                return float(flag.read_text()) - t0_wall
            except (FileNotFoundError, ValueError):
                # Seeding clients never exit: an exit before the flag is a failure.
                if procs[i].poll() is not None:
                    tail = (dirs[i] / "stdout.log").read_text(errors="replace")[-500:]
                    raise BenchError(
                        f"aria2c on {clients[i].name} exited with {procs[i].returncode}: {tail}"
                    ) from None
                return None

        times = wait_all(done, len(clients), setup.deadline, "aria2")
        sent = net.counters(source)[0] - sent0
    paths = [d / FILE_NAME for d in dirs]
    piece = piece_length_for(setup.size)
    return checked_outcome("aria2", setup, times, paths, sent, {"piece_length": piece})
