"""systemd integration: ``READY=1`` reaches ``$NOTIFY_SOCKET`` only once the
service answers (``swarm serve``, ``swarm node``), and the unit files in
``contrib/systemd`` pass ``systemd-analyze verify``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.config import render_config
from swarm.http_get import HTTPClient
from swarm_testing.broker import free_port

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
READY_WITHIN = 60.0  # a generous bound: two shared cores, other suites running


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        yield sock, path
    finally:
        sock.close()


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes]) -> str:
    """The first datagram that says READY=1 (the child must stay alive)."""
    deadline = time.monotonic() + READY_WITHIN
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no READY=1 within the deadline"
        assert proc.poll() is None, f"the service exited with {proc.returncode}"
        sock.settimeout(min(left, 0.5))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return message


def _run(argv: list[str], notify: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "swarm", *argv],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_notifies_ready_once_it_answers(
    tmp_path: Path, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    (tmp_path / "store").mkdir()
    port = free_port()
    proc = _run(
        ["serve", str(tmp_path / "store"), "--listen", f"127.0.0.1:{port}"], path, tmp_path / "log"
    )
    try:
        message = _wait_ready(sock, proc)
        assert f"MAINPID={proc.pid}" in message.splitlines()
        # READY=1 came after the port listens: the origin answers now, no retry
        body = HTTPClient().get(
            f"http://127.0.0.1:{port}/", deadline=time.monotonic() + 5, limit=1 << 20
        )
        assert b"repositories" in body
    finally:
        _stop(proc)


def test_node_notifies_ready_once_its_api_answers(
    tmp_path: Path, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    api = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        render_config(
            {
                "data_dir": tmp_path / "data",
                "api": f"127.0.0.1:{api}",
                "listen": "127.0.0.1:0",
                "peer": "127.0.0.1:0",
                "dht": False,
            },
            {},
        )
    )
    proc = _run(["node", "--config", str(config)], path, tmp_path / "log")
    try:
        message = _wait_ready(sock, proc)
        assert f"MAINPID={proc.pid}" in message.splitlines()
        body = HTTPClient().get(
            f"http://127.0.0.1:{api}/v1/status", deadline=time.monotonic() + 5, limit=1 << 20
        )
        assert body.startswith(b"{")
    finally:
        _stop(proc)


@pytest.mark.systemd_analyze
def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``make install-units`` writes units that systemd accepts without a word.
    systemd-analyze exits 0 even for a misspelt setting (it only warns), so
    its output must be empty too."""
    root = UNITS.parents[1]
    swarm = str(Path(sys.executable).parent / "swarm")  # this checkout's, not one on PATH
    unit_dir = tmp_path / "units"
    done = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(root),
            "install-units",
            f"UNIT_DIR={unit_dir}",
            f"SWARM_BIN={swarm}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    units = sorted(unit_dir.glob("*.service"))
    assert [u.name for u in units] == ["swarm-node.service", "swarm-serve.service"]
    for unit in units:
        text = unit.read_text()
        assert f"ExecStart={swarm} " in text and "/usr/local/bin/swarm" not in text
        assert "Type=notify" in text and "Restart=on-failure" in text
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), (
            f"{unit.name}: {verified.stdout}{verified.stderr}"
        )
