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

Only processes started here (through the network's hosts, by PID) are ended; the
namespaces, veths and bridge go with the network even on an error or Ctrl-C
(SIGTERM is turned into the same orderly exit).  Results go to
``bench/results/distribution.json`` and ``bench/results/DISTRIBUTION.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from bench.report import machine
from bench.util import ROOT, BenchError, say
from swarm_testing.bencode import bencode
from swarm_testing.netns import Host, Network, cleanup_stale

MIB = 1 << 20
SYSTEMS = ("http", "squid", "aria2", "swarm")
PREFIX = "sgb"  # namespace/link names of this bench (the tests use "sg")
WORK = ROOT / "bench" / "work" / "distribution"
RESULTS = ROOT / "bench" / "results"
FILE_NAME = "image.bin"
HTTP_PORT = 80
SQUID_PORT = 3128
TRACKER_PORT = 6969
BT_PORT = 6881
# Children never see a proxy from our environment: they talk only to the namespaces.
CLEAN_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


@dataclass
class Outcome:
    """How one system did; ``seconds`` is None when it failed or is unavailable."""

    system: str
    seconds: float | None = None
    client_seconds: list[float] = field(default_factory=list)
    verified: int = 0
    source_sent_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    note: str = ""


@dataclass
class Setup:
    """What every system is given."""

    nodes: int
    size: int  # bytes
    rate_mbit: float
    file: Path
    sha256: str
    work: Path

    @property
    def bound(self) -> float:
        return kumar_ross_bound(self.size, self.nodes, self.rate_mbit)

    @property
    def deadline(self) -> float:
        """Seconds after which a system is given up: 3x a single origin serving everyone."""
        return 3 * self.nodes * self.size * 8 / (self.rate_mbit * 1e6) + 120


def kumar_ross_bound(size: int, nodes: int, rate_mbit: float) -> float:
    """Seconds to deliver ``size`` bytes from one seed to ``nodes`` peers, every link
    ``rate_mbit`` each way: ``max(F/u_s, F/d_min, N*F/(u_s + sum u_i))``."""
    f = size * 8
    u = rate_mbit * 1e6
    return max(f / u, f / u, nodes * f / (u + nodes * u))


# -- bencode, v1 torrent, tracker --------------------------------------------------


def piece_length_for(size: int) -> int:
    """A power of two near ``size / 1024``, between 32 KiB and 1 MiB."""
    p = 32 * 1024
    while p < 1 << 20 and p * 1024 < size:
        p *= 2
    return p


def make_v1_torrent(path: Path, announce: str) -> tuple[bytes, str]:
    """(the .torrent bytes, the hex v1 info-hash) of one file, SHA-1 pieces (BEP 3)."""
    size = path.stat().st_size
    plen = piece_length_for(size)
    pieces = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(plen):
            pieces += hashlib.sha1(chunk).digest()
    info = {"name": path.name, "length": size, "piece length": plen, "pieces": bytes(pieces)}
    meta = {"announce": announce, "created by": "swarm-grid bench", "info": info}
    return bencode(meta), hashlib.sha1(bencode(info)).hexdigest()


class _TrackerState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # info_hash -> (ip, port) -> bytes left
        self.swarms: dict[bytes, dict[tuple[str, int], int]] = {}


def serve_tracker(addr: str, port: int) -> None:
    """A minimal HTTP tracker (BEP 3 with compact peers, BEP 23), run inside the
    source namespace; ``GET /stats`` gives {info_hash_hex: [peers, seeds]}."""
    state = _TrackerState()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/stats":
                with state.lock:
                    stats = {
                        ih.hex(): [len(ps), sum(1 for left in ps.values() if left == 0)]
                        for ih, ps in state.swarms.items()
                    }
                self._reply(json.dumps(stats).encode(), "application/json")
                return
            if url.path != "/announce":
                self.send_error(404)
                return
            q = urllib.parse.parse_qs(url.query, encoding="latin-1")
            try:
                info_hash = q["info_hash"][0].encode("latin-1")
                peer = (self.client_address[0], int(q["port"][0]))
                left = int(q.get("left", ["1"])[0])
            except (KeyError, ValueError):
                self._reply(bencode({"failure reason": "bad announce"}))
                return
            event = q.get("event", [""])[0]
            with state.lock:
                peers = state.swarms.setdefault(info_hash, {})
                if event == "stopped":
                    peers.pop(peer, None)
                else:
                    peers[peer] = left
                others = [p for p in peers if p != peer]
                seeds = sum(1 for x in peers.values() if x == 0)
            compact = b"".join(socket.inet_aton(ip) + pt.to_bytes(2, "big") for ip, pt in others)
            body = {
                "interval": 5,
                "min interval": 1,
                "complete": seeds,
                "incomplete": len(peers) - seeds,
                "peers": compact,
            }
            self._reply(bencode(body))

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


# -- helpers -----------------------------------------------------------------------


def make_source_file(work: Path, size: int) -> tuple[Path, str]:
    """``size`` random bytes (incompressible, no dedup to flatter anyone); (path, sha256)."""
    src = work / "source"
    src.mkdir(parents=True, exist_ok=True)
    path = src / FILE_NAME
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MIB))
            h.update(block)
            f.write(block)
            left -= len(block)
    # Old enough for squid's heuristic freshness (and any cache) to call it fresh.
    old = time.time() - 7 * 86400
    os.utime(path, (old, old))
    return path, h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def verify_copies(paths: Sequence[Path], expected: str) -> int:
    """How many of ``paths`` exist with SHA-256 ``expected`` (hashed two at a time)."""

    def ok(p: Path) -> bool:
        return p.is_file() and sha256_file(p) == expected

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(ok, paths))


def wait_port(host: Host, addr: str, port: int, what: str, proc: subprocess.Popen[Any]) -> None:
    """Until a TCP connect from ``host`` to ``addr:port`` succeeds; fail if ``proc`` died."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        r = host.run(["bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}"], capture_output=True)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not listening on {addr}:{port} after 30 s")
        time.sleep(0.1)


def wait_all(
    done: Callable[[int], float | None], n: int, deadline: float, what: str
) -> list[float]:
    """Poll ``done(i)`` (seconds since start, or None) for i < n until all are set."""
    times: list[float | None] = [None] * n
    t_end = time.monotonic() + deadline
    while any(t is None for t in times):
        for i in range(n):
            if times[i] is None:
                times[i] = done(i)
        if time.monotonic() > t_end:
            left = sum(1 for t in times if t is None)
            raise BenchError(f"{what}: {left} of {n} clients not done after {deadline:.0f} s")
        time.sleep(0.02)
    return [t for t in times if t is not None]


def _log(path: Path) -> BinaryIO:
    """A log file for a child's output (the child gets its own copy of the descriptor)."""
    return open(path, "ab")


# -- the systems -------------------------------------------------------------------


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
    with _log(run_dir / "stderr.log") as log:
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
        with _log(d / "curl.log") as log:
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
    return _outcome("http", setup, times, paths, sent, {"origin_gets": origin_gets(access)})


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
    with _log(run_dir / "stderr.log") as log:
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
    return _outcome("squid", setup, times, paths, sent, extra)


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
            with _log(d / "stdout.log") as log:
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
    return _outcome("aria2", setup, times, paths, sent, {"piece_length": piece})


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
        o = _outcome("swarm", setup, [], files, sent, {"call_seconds": elapsed})
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


def _outcome(
    system: str,
    setup: Setup,
    times: list[float],
    paths: Sequence[Path],
    sent: int,
    extra: dict[str, Any],
) -> Outcome:
    verified = verify_copies(paths, setup.sha256)
    o = Outcome(system, max(times) if times else None, sorted(times), verified, sent, extra)
    if verified != setup.nodes:
        o.error = f"only {verified} of {setup.nodes} copies have the right SHA-256"
        o.seconds = None
    return o


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
            say(f"{name}: {_describe(o, setup)}")
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


def _describe(o: Outcome, setup: Setup) -> str:
    if o.seconds is None:
        return o.error or o.note or "no figure"
    return f"{o.seconds:.1f} s, {o.seconds / setup.bound:.2f}x the bound"


def make_record(setup: Setup, outcomes: Sequence[Outcome], command: str) -> dict[str, Any]:
    by = {o.system: o for o in outcomes}
    rows = []
    for o in outcomes:
        row = asdict(o)
        row["ratio_to_bound"] = o.seconds / setup.bound if o.seconds else None
        row["median_client_seconds"] = (
            o.client_seconds[len(o.client_seconds) // 2] if o.client_seconds else None
        )
        row["source_sent_copies"] = (
            o.source_sent_bytes / setup.size if o.source_sent_bytes is not None else None
        )
        rows.append(row)
    swarm = by.get("swarm")
    comparisons: dict[str, Any] = {}
    if swarm is not None and swarm.seconds:
        for other in ("http", "squid", "aria2"):
            base = by.get(other)
            if base is not None and base.seconds:
                comparisons[f"swarm_speedup_vs_{other}"] = base.seconds / swarm.seconds
        comparisons["swarm_ratio_to_bound"] = swarm.seconds / setup.bound
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine(),
            "command": command,
        },
        "params": {
            "nodes": setup.nodes,
            "size_bytes": setup.size,
            "size_mib": setup.size / MIB,
            "rate_mbit": setup.rate_mbit,
            "kumar_ross_bound_s": setup.bound,
        },
        "systems": rows,
        "comparisons": comparisons,
        "goals": {
            "swarm_ratio_to_bound": "<= 1.10",
            "swarm_speedup_vs_http": ">= 10 (at N=16)",
            "swarm_speedup_vs_aria2": "> 1",
        },
    }


def markdown(record: dict[str, Any]) -> str:
    p = record["params"]
    m = record["meta"]["machine"]
    lines = [
        "# Distribution of one file to N nodes",
        "",
        f"- date: {record['meta']['date']}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), kernel {m['kernel']}",
        f"- command: `{record['meta']['command']}`",
        f"- {p['size_mib']:g} MiB from one source to {p['nodes']} clients, every link"
        f" shaped to {p['rate_mbit']:g} Mbit/s each way (tc htb, network namespaces)",
        f"- Kumar-Ross lower bound: **{p['kumar_ross_bound_s']:.1f} s**"
        " = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) at the nominal rate",
        "",
        "| system | all clients done | × bound | median client | copies verified"
        " | source sent (× F) | notes |",
        "| ------ | ---------------- | ------- | ------------- | --------------- |"
        " ----------------- | ----- |",
    ]
    for r in record["systems"]:
        secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "—"
        ratio = f"{r['ratio_to_bound']:.2f}x" if r["ratio_to_bound"] is not None else "—"
        med = r["median_client_seconds"]
        med_s = f"{med:.1f} s" if med is not None else "—"
        copies = r["source_sent_copies"]
        copies_s = f"{copies:.2f}" if copies is not None else "—"
        notes = [r["note"]] if r["note"] else []
        if r["error"]:
            notes.append(f"**failed**: {r['error']}")
        for k, v in r["extra"].items():
            notes.append(f"{k} {v}")
        verified = f"{r['verified']}/{p['nodes']}" if r["seconds"] or r["error"] else "—"
        lines.append(
            f"| {r['system']} | {secs} | {ratio} | {med_s} | {verified} | {copies_s}"
            f" | {'; '.join(str(n) for n in notes)} |"
        )
    c = record["comparisons"]
    lines += ["", "Goals for `swarm`: ≤ 1.10x the bound; ≥ 10x faster than http at N=16;"]
    lines += ["faster than aria2."]
    if c:
        lines += [""]
        for k, v in c.items():
            lines.append(f"- {k.replace('_', ' ')}: {v:.2f}x")
    lines += [
        "",
        "The clock starts when the clients start (servers, caches and seeds are up)",
        "and stops when the last client holds the whole file; every copy's SHA-256 is",
        "checked afterwards. “source sent” is the source's eth0 transmit counter in",
        "copies of the file (headers included).",
    ]
    return "\n".join(lines) + "\n"


def write(record: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "distribution.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "DISTRIBUTION.md").write_text(markdown(record))


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
