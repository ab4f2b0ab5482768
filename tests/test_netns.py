"""The network-namespace harness: reachability, isolation, shaping and teardown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from swarm_testing.netns import (
    Host,
    NetnsError,
    Network,
    _b36,
    cleanup_stale,
    list_links,
    list_namespaces,
)

pytestmark = pytest.mark.netns

# A server that prints "ready" once listening, then echoes (or counts) one connection.
ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
c, _ = s.accept()
mode = sys.argv[3]
n = 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    n += len(d)
    if mode == "echo":
        c.sendall(d)
        break
if mode == "count":
    c.sendall(str(n).encode())
c.close()
"""

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
payload = sys.argv[3].encode() if sys.argv[3] != "-" else bytes(int(sys.argv[4]))
s.sendall(payload)
s.shutdown(socket.SHUT_WR) if sys.argv[3] == "-" else None
print(s.recv(1 << 16).decode())
"""


def _serve(host: Host, addr: str, port: int, mode: str) -> subprocess.Popen[str]:
    proc = host.popen(
        [sys.executable, "-c", ECHO_SERVER, addr, str(port), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _connect(host: Host, addr: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(
        [sys.executable, "-c", CLIENT, addr, str(port), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ours(names: list[str], net: Network) -> list[str]:
    mine = set(net.names())
    return [n for n in names if n in mine]


def test_hosts_reach_each_other_and_have_their_own_addresses() -> None:
    with Network(3) as net:
        addrs = [h.addr for h in net.hosts]
        assert len(set(addrs)) == 3
        for h in net.hosts:
            out = h.run(["ip", "-j", "addr", "show", "eth0"], capture_output=True, check=True)
            shown = [a["local"] for a in json.loads(out.stdout)[0]["addr_info"]]
            assert h.addr in shown
            lo = h.run(["ip", "-j", "link", "show", "lo"], capture_output=True, check=True)
            assert "UP" in json.loads(lo.stdout)[0]["flags"]

        server = _serve(net.hosts[0], net.hosts[0].addr, 7001, "echo")
        r = _connect(net.hosts[2], net.hosts[0].addr, 7001, "hello across the bridge")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "hello across the bridge"
        assert server.wait(timeout=10) == 0


def test_loopback_is_private_to_each_namespace() -> None:
    with Network(2) as net:
        _serve(net.hosts[0], "127.0.0.1", 7002, "echo")
        r = _connect(net.hosts[1], "127.0.0.1", 7002, "x")
        assert r.returncode != 0
        assert "ConnectionRefusedError" in r.stderr
        ok = _connect(net.hosts[0], "127.0.0.1", 7002, "inside")
        assert ok.stdout.strip() == "inside"


def test_no_way_out_of_the_namespaces() -> None:
    host_addrs = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True, text=True
    )
    outside = [
        a["local"]
        for link in json.loads(host_addrs.stdout)
        for a in link.get("addr_info", [])
        if not a["local"].startswith("127.")
    ]
    with Network(2) as net:
        bridge = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", net.bridge],
            capture_output=True,
            check=True,
            text=True,
        )
        assert all(not link.get("addr_info") for link in json.loads(bridge.stdout))
        for h in net.hosts:
            routes = h.run(["ip", "-j", "route", "show"], capture_output=True, check=True)
            dests = [r["dst"] for r in json.loads(routes.stdout)]
            assert "default" not in dests
            # TEST-NET-1 stands for "anywhere else": no route, so no packet leaves.
            r = h.run(["ip", "route", "get", "192.0.2.1"], capture_output=True, text=True)
            assert r.returncode != 0
            assert "unreachable" in r.stderr
            for addr in outside:  # the host's own addresses are out of reach too
                c = _connect(h, addr, 9, "x")
                assert "Network is unreachable" in c.stderr


def test_commands_share_the_test_mount_namespace() -> None:
    # A FUSE mount made by a node daemon must be visible to the test.
    mine = os.readlink("/proc/self/ns/mnt")
    with Network(1) as net:
        r = net.hosts[0].run(["readlink", "/proc/self/ns/mnt"], capture_output=True, text=True)
        assert r.stdout.strip() == mine
        n = net.hosts[0].run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True)
        assert n.stdout.strip() != os.readlink("/proc/self/ns/net")


def test_two_networks_at_once_are_isolated() -> None:
    with Network(2) as a, Network(2) as b:
        assert not set(a.names()) & set(b.names())
        assert a.hosts[0].addr == b.hosts[0].addr  # same plan, separate segments
        _serve(a.hosts[0], a.hosts[0].addr, 7003, "echo")
        r = _connect(b.hosts[1], b.hosts[0].addr, 7003, "x")
        assert r.returncode != 0


def _htb_class(host: Host, side: str) -> tuple[str, int]:
    """(rate as tc prints it, bytes sent) of the htb class on one end of ``host``'s link."""
    pre = ["-n", host.name] if side == "upload" else []
    dev = "eth0" if side == "upload" else host.veth
    r = subprocess.run(
        ["tc", *pre, "-s", "class", "show", "dev", dev],
        capture_output=True,
        check=True,
        text=True,
    )
    # this iproute2 prints htb classes as text even with -j
    rate = re.search(r"^class htb \S+ .*?\brate (\S+)", r.stdout, re.M)
    sent = re.search(r"Sent (\d+) bytes", r.stdout)
    assert rate and sent, r.stdout
    return rate.group(1), int(sent.group(1))


def test_shaping_limits_throughput_on_both_ends() -> None:
    rate_mbit = 20.0
    size = 5_000_000
    with Network(2, rate_mbit=rate_mbit) as net:
        receiver, sender = net.hosts
        _serve(receiver, receiver.addr, 7004, "count")
        t0 = time.monotonic()
        r = _connect(sender, receiver.addr, 7004, "-", str(size))
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == size
        # A correctness check of the shaper, not a speed test: the bytes cannot
        # have crossed a 20 Mbit/s link much faster than 20 Mbit/s.
        assert elapsed >= 0.8 * size * 8 / (rate_mbit * 1e6)
        # Both shapers on the path (sender's upload, receiver's download) carried it.
        for host, side in ((sender, "upload"), (receiver, "download")):
            rate, sent = _htb_class(host, side)
            assert rate == "20Mbit"
            assert sent >= size


def test_teardown_removes_everything_even_when_the_body_raises() -> None:
    names: list[str] = []
    tracked: list[subprocess.Popen[bytes]] = []
    strays: list[int] = []
    with pytest.raises(RuntimeError, match="body failed"), Network(3, rate_mbit=10) as net:
        names = net.names()
        assert sorted(_ours(list_namespaces() + list_links(), net)) == sorted(names)
        tracked.append(net.hosts[0].popen(["sleep", "300"]))
        # A daemon that detached from us: found through `ip netns pids` and ended.
        r = net.hosts[1].run(
            ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        )
        strays.append(int(r.stdout))
        raise RuntimeError("body failed")
    present = set(list_namespaces()) | set(list_links())
    assert not [n for n in names if n in present]
    assert tracked[0].poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(strays[0], 0)


def test_failed_setup_removes_what_it_made() -> None:
    net = Network(2, rate_mbit=10)
    # Make the second namespace's name taken, so setup fails half way.
    taken = net.hosts[1].name
    subprocess.run(["ip", "netns", "add", taken], check=True)
    try:
        with pytest.raises(NetnsError, match=taken), net:
            pass
        present = set(list_namespaces()) | set(list_links())
        assert [n for n in net.names() if n in present] == [taken]
    finally:
        subprocess.run(["ip", "netns", "del", taken], check=True)


def test_cleanup_stale_removes_only_dead_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"sgt{_b36(dead.pid)}-0"
    subprocess.run(["ip", "netns", "add", f"{tag}n0"], check=True)
    subprocess.run(["ip", "link", "add", f"{tag}b", "type", "bridge"], check=True)
    try:
        # Another prefix that is a prefix of ours never claims our names.
        assert not {f"{tag}n0", f"{tag}b"} & set(cleanup_stale("sg"))
        with Network(1, prefix="sgt") as live:
            removed = cleanup_stale("sgt")
            assert sorted(removed) == sorted([f"{tag}n0", f"{tag}b"])
            present = set(list_namespaces()) | set(list_links())
            assert set(live.names()) <= present  # a live run is left alone
            assert f"{tag}n0" not in present and f"{tag}b" not in present
    finally:
        subprocess.run(["ip", "netns", "del", f"{tag}n0"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", f"{tag}b"], capture_output=True, check=False)
