"""N network namespaces on one Linux bridge, links shaped with ``tc``, always removed.

Used by multi-node tests and by the distribution benchmark::

    with Network(4, rate_mbit=50) as net:
        server = net.hosts[0].popen(["nginx", ...])
        net.hosts[1].run(["curl", f"http://{net.hosts[0].addr}/f"], check=True)

Topology: one bridge in the host namespace (no address on it, so the namespaces
reach neither the host nor the outside world: they have no default route either),
and per node a veth pair, ``eth0`` inside namespace ``i`` with address
``subnet[i + 1]`` (``10.231.0.1/24``, ``10.231.0.2/24``, ... by default), the other
end enslaved to the bridge.  Loopback is up inside every namespace.

Shaping, when ``rate_mbit`` is given, is an htb class of that rate on the egress
of *both* ends of each node's veth: egress of ``eth0`` inside the namespace is
the node's upload, egress of the bridge-side end is its download.  ``delay_ms``
adds a netem delay to each of those two directions, so the one-way delay between
two nodes is ``2 * delay_ms`` (each packet leaves one node's upload and enters the
other's download).

Commands run inside a namespace through ``nsenter --net=/var/run/netns/NAME``, never
``ip netns exec``: the latter also unshares the mount namespace, which would hide a
FUSE mount made by a node daemon from the test that wants to read it.

Invariants:

- every name this module creates (namespaces, veths, the bridge) is
  ``PREFIX + base36(pid) + "-" + ...`` (the prefix in lower case, the pid in digits
  and upper case, so that no prefix's names parse as another's), so
  :func:`cleanup_stale` can remove what a crashed run left without touching a
  concurrent run (whose pid is alive) or anything it did not make;
- :meth:`Network.close` (run by ``__exit__`` even when the body raises, also on
  ``KeyboardInterrupt``) terminates the processes started with :meth:`Host.popen`,
  then any other process still inside one of its namespaces, then deletes the
  veths, the namespaces and the bridge; a setup that fails half way removes what it
  had made before re-raising.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NETNS_DIR = Path("/var/run/netns")
DEFAULT_PREFIX = "sg"
DEFAULT_SUBNET = "10.231.0.0/24"
IFNAMSIZ = 15  # longest interface name Linux accepts

_seq = itertools.count()


class NetnsError(Exception):
    """A namespace, link or qdisc could not be made or removed; the message says which."""


def _b36(n: int) -> str:
    """Base 36 in digits and *upper-case* letters, so that a pid never reads as part of
    a (lower-case) prefix: ``sg`` + ``B73`` and ``sgb`` + ``73`` stay distinct."""
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _tc(*args: str) -> None:
    r = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)}: {r.stderr.strip()}")


def _warn(msg: str) -> None:
    sys.stderr.write(f"[netns] {msg}\n")


def _kill_pid(pid: int, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds for it to vanish, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name`` (``ip netns pids``)."""
    r = _ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``/var/run/netns``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def list_links() -> list[str]:
    """Names of the network interfaces of the host namespace."""
    r = _ip("-o", "link", "show")
    names = []
    for line in r.stdout.splitlines():
        # "7: sgab-0h1@if6: <...>" -> "sgab-0h1"
        names.append(line.split(":", 2)[1].strip().split("@", 1)[0])
    return names


def _check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"[a-z]{1,3}", prefix):
        raise ValueError(f"prefix must be 1 to 3 lowercase letters, not {prefix!r}")


def _owner_pid(name: str, prefix: str) -> int | None:
    m = re.match(rf"^{prefix}([0-9A-Z]+)-", name)
    return int(m.group(1), 36) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces and links left by crashed runs of this harness.

    Only names made by this module with ``prefix`` whose creating process is gone
    are touched; processes still inside such a namespace are ended by PID first.
    Returns the names removed.
    """
    _check_prefix(prefix)
    removed: list[str] = []
    for ns in list_namespaces():
        owner = _owner_pid(ns, prefix)
        if owner is None or _alive(owner):
            continue
        for pid in namespace_pids(ns):
            _kill_pid(pid, 2.0)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    # Deleting a namespace deletes the veth ends in it and so their peers;
    # what is left are bridges and veths whose namespace was already gone.
    for link in list_links():
        owner = _owner_pid(link, prefix)
        if owner is None or _alive(owner):
            continue
        if _ip("link", "del", link, check=False).returncode == 0:
            removed.append(link)
    return removed


class Host:
    """One node: a network namespace with ``eth0`` at :attr:`addr`."""

    def __init__(self, net: Network, index: int, name: str, addr: str, veth: str) -> None:
        self.net = net
        self.index = index
        self.name = name
        self.addr = addr
        self.ifname = "eth0"
        self.veth = veth  # the bridge-side end, in the host namespace

    def __repr__(self) -> str:
        return f"Host({self.index}, {self.name!r}, {self.addr})"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.name

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` prefixed so that it runs in this namespace (network only)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *(os.fspath(a) for a in argv)]

    def run(
        self, argv: Sequence[str | os.PathLike[str]], **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside this namespace (same keyword arguments)."""
        return subprocess.run(self.argv(argv), **kw)  # the caller decides on check

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside this namespace; ended by :meth:`Network.close`.

        The child gets its own session (so a terminal's Ctrl-C reaches only us and
        the teardown ends it in order) unless ``start_new_session`` is given.
        """
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.net._procs.append(proc)
        return proc


class Network:
    """``n`` namespaces on one bridge; see the module docstring.

    Raises :class:`NetnsError` when a step of the setup fails (after removing
    what it had made), ``ValueError`` on bad parameters.
    """

    def __init__(
        self,
        n: int,
        *,
        rate_mbit: float | None = None,
        delay_ms: float = 0.0,
        prefix: str = DEFAULT_PREFIX,
        subnet: str = DEFAULT_SUBNET,
    ) -> None:
        _check_prefix(prefix)
        net = ipaddress.IPv4Network(subnet)
        addrs = list(itertools.islice(net.hosts(), n))
        if n < 1 or len(addrs) < n:
            raise ValueError(f"cannot place {n} hosts in {subnet}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, not {rate_mbit}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, not {delay_ms}")
        self.n = n
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.prefix = prefix
        self.prefixlen = net.prefixlen
        tag = f"{prefix}{_b36(os.getpid())}-{_b36(next(_seq))}"
        if len(f"{tag}h{n - 1}") > IFNAMSIZ:
            raise ValueError(f"interface names would exceed {IFNAMSIZ} characters: {tag}h{n - 1}")
        self.bridge = f"{tag}b"
        self.hosts = [Host(self, i, f"{tag}n{i}", str(addrs[i]), f"{tag}h{i}") for i in range(n)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._made_bridge = False
        self._made_ns: list[Host] = []
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Network:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failed teardown must not hide the body's own exception.
        try:
            self.close()
        except NetnsError as err:
            if exc is None:
                raise
            _warn(f"teardown after {exc_type.__name__ if exc_type else 'error'}: {err}")

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            try:
                self.close()
            except NetnsError as err:
                _warn(f"teardown after a failed setup: {err}")
            raise

    def _start(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._made_bridge = True
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            _ip("netns", "add", h.name)
            self._made_ns.append(h)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.name)
            _ip("link", "set", h.veth, "master", self.bridge, "up")
            _ip("-n", h.name, "addr", "add", f"{h.addr}/{self.prefixlen}", "dev", "eth0")
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "link", "set", "eth0", "up")
            if self.rate_mbit is not None or self.delay_ms > 0:
                self._shape(h.veth, None)  # the node's download
                self._shape("eth0", h.name)  # the node's upload

    def _shape(self, dev: str, ns: str | None) -> None:
        pre = ["-n", ns] if ns else []
        if self.rate_mbit is None:
            _tc(*pre, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{self.delay_ms}ms")
            return
        rate_bit = self.rate_mbit * 1e6
        # A burst of ~5 ms of traffic (at least a few full frames) lets htb keep the
        # rate exact despite timer granularity without letting bursts run far ahead.
        burst = max(int(rate_bit / 8 * 0.005), 8 * 1514)
        rate = f"{int(rate_bit)}bit"
        _tc(*pre, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        _tc(
            *pre, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
            "rate", rate, "ceil", rate, "burst", str(burst), "cburst", str(burst),
            "quantum", "65536",  # one class: the DRR quantum only needs to exceed a frame
        )  # fmt: skip
        # The leaf queue holds ~100 ms of traffic (at least a few 64 KiB GSO frames):
        # a real link's buffer, so a sender that overruns it sees drops, not an
        # unbounded queue.  This kernel has no fq_codel or sfq; bfifo is everywhere.
        queue = max(int(rate_bit / 8 * 0.1), 4 * 65536)
        if self.delay_ms > 0:
            delay = f"{self.delay_ms}ms"
            leaf = ["netem", "delay", delay, "limit", str(max(1000, queue // 1000))]
        else:
            leaf = ["bfifo", "limit", str(queue)]
        _tc(*pre, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *leaf)

    def close(self) -> None:
        """Remove everything this network made; idempotent.

        Raises :class:`NetnsError` naming what could not be removed (after trying
        all of it).
        """
        if self._closed:
            return
        self._closed = True
        made = [h.name for h in self._made_ns] + [h.veth for h in self._made_ns]
        if self._made_bridge:
            made.append(self.bridge)
        errors: list[str] = []
        for proc in reversed(self._procs):
            # Our own children: wait() reaps them (a zombie still answers kill(pid, 0)).
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} ({proc.args!r}) did not exit")
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._procs.clear()
        for h in self._made_ns:
            # Anything still in the namespace was started through this harness
            # (nothing else knows the namespace): end it, else the namespace and its
            # veth would outlive ``ip netns del``.
            for pid in namespace_pids(h.name):
                _warn(f"ending PID {pid} left in {h.name}")
                _kill_pid(pid, 3.0)
            _ip("link", "del", h.veth, check=False)
            r = _ip("netns", "del", h.name, check=False)
            if r.returncode != 0:
                errors.append(f"ip netns del {h.name}: {r.stderr.strip()}")
        self._made_ns.clear()
        if self._made_bridge:
            r = _ip("link", "del", self.bridge, check=False)
            if r.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {r.stderr.strip()}")
            self._made_bridge = False
        present = set(list_namespaces()) | set(list_links())
        left = [x for x in made if x in present]
        if left:
            errors.append(f"still present after teardown: {left}")
        if errors:
            raise NetnsError("; ".join(errors))

    # -- introspection -----------------------------------------------------------

    def names(self) -> list[str]:
        """Every namespace and host-side link name this network uses."""
        return [self.bridge, *(h.name for h in self.hosts), *(h.veth for h in self.hosts)]

    def counters(self, host: Host) -> tuple[int, int]:
        """(bytes sent, bytes received) on ``host``'s ``eth0``, from the kernel's counters.

        Read with ``ip -n`` (sysfs would show the host namespace's devices).
        """
        r = _ip("-n", host.name, "-j", "-s", "link", "show", "eth0")
        stats = json.loads(r.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])
