"""A site in network namespaces for site-job tests: a broker and N node daemons.

::

    with SiteNet(tmp_path, nodes=3, runner={"cores": 1, "time_left": 600}) as site:
        job = site.submit(spec_file)                  # swarm site-job submit, in a namespace
        gather = site.start_gather(job, tmp_path / "out")
        site.kill_node(1)                            # SIGKILL
        site.start_node(1)
        rc, report = site.wait_gather(gather, 120)

Topology (:class:`swarm_testing.netns.Network`): host 0 is the broker's
namespace, running ``nats-server`` (:class:`sitejob.natsd.NatsServer`: JetStream
with ``sync_interval: always``, token auth) on ``ADDR:4222``; hosts 1..N are
the nodes' namespaces, each running ``swarm node --config`` with no repository
and no mount, its API, listen and peer ports on its own address, a
``[runner]`` table (cores, time left... per node), a ``[site]`` table
(the broker's URL, the token file, the node's name ``wn<i>``, a short
request timeout) and optionally more environment (an MJF directory).
Commands (``swarm site-job ...``) run in any namespace with a node's
configuration or the control configuration (``[site]`` with ``work =
false``, no daemon); :meth:`SiteNet.node_status` reads a node's
``GET /v1/status`` (its worker's ``site`` section) and :meth:`SiteNet.publish`
puts raw bytes into JetStream as a token holder (bad-input tests).

Invariants: every process is started here and ended by its PID (nodes and
gathers SIGTERM then SIGKILL, the broker by :meth:`NatsServer.stop`), also
when the body or the setup fails; the namespaces go with the network
(:meth:`Network.close` ends anything left in them). Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sitejob.natsd import NatsServer
from swarm.config import render_config
from swarm_testing.netns import Host, Network
from swarm_testing.waiting import eventually

PY = sys.executable
BROKER_PORT = 4222
POLL = 0.2  # seconds between checks that start a process in a namespace
NODE_READY = 90.0  # seconds a node daemon may take to start on a loaded machine
COMMAND_TIMEOUT = 60.0  # seconds a one-shot `swarm site-job` command may take


@dataclass
class NodeHandle:
    """Node ``index`` (0-based) in namespace ``host``; ``proc`` while it runs."""

    index: int
    host: Host
    dir: Path
    runner: dict[str, Any]
    site: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)  # added to the daemon's environment
    proc: subprocess.Popen[Any] | None = None
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.site.get("node_name", f"wn{self.index}"))

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "node.log"

    def log(self) -> str:
        for f in self.logs:
            f.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class GatherHandle:
    """A ``swarm site-job gather`` child; its stdout (the JSON report) and stderr go to files."""

    job: str
    output: Path
    on: int | None
    proc: subprocess.Popen[Any]
    stdout: Path
    stderr: Path
    files: list[IO[bytes]]


class SiteNet:
    """A broker and ``nodes`` node daemons in namespaces; see the module docstring.

    ``runner`` is every node's ``[runner]`` table, ``per_node[i]`` adds to node
    ``i``'s (``{"runner": {...}, "site": {...}, "env": {...}}``: ``env`` goes
    into its daemon's environment, e.g. ``MACHINEFEATURES``); ``site`` adds
    keys to every node's ``[site]`` table. ``start_nodes=False`` leaves the daemons to
    :meth:`start_node`.
    """

    def __init__(
        self,
        tmp: Path,
        nodes: int = 3,
        *,
        runner: Mapping[str, Any] | None = None,
        site: Mapping[str, Any] | None = None,
        per_node: Sequence[Mapping[str, Mapping[str, Any]]] = (),
        start_nodes: bool = True,
        prefix: str = "sj",
        subnet: str = "10.232.0.0/24",
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a site needs at least one node, not {nodes}")
        self.tmp = tmp
        self.net = Network(nodes + 1, prefix=prefix, subnet=subnet)
        self.token = secrets.token_urlsafe(24)
        self.token_file = tmp / "nats.token"
        self.broker: NatsServer | None = None
        self._start_nodes = start_nodes
        base_runner = {"cores": 1, "time_left": 3600, "power_per_core": 10.0, **(runner or {})}
        self.nodes: list[NodeHandle] = []
        for i in range(nodes):
            extra = per_node[i] if i < len(per_node) else {}
            self.nodes.append(
                NodeHandle(
                    index=i,
                    host=self.net.hosts[i + 1],
                    dir=tmp / f"node{i}",
                    runner={**base_runner, **extra.get("runner", {})},
                    site={
                        "node_name": f"wn{i}",
                        "request_timeout": 2,
                        **(site or {}),
                        **extra.get("site", {}),
                    },
                    env=dict(extra.get("env", {})),
                )
            )
        self.gathers: list[GatherHandle] = []

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def broker_host(self) -> Host:
        return self.net.hosts[0]

    @property
    def url(self) -> str:
        return f"nats://{self.broker_host.addr}:{BROKER_PORT}"

    @property
    def control_config(self) -> Path:
        """A configuration with only a ``[site]`` table (``work = false``): for
        commands run outside any node (submit, status, gather)."""
        return self.tmp / "control" / "node.toml"

    def __enter__(self) -> SiteNet:
        self.net.start()
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token + "\n")
            self._write_config(
                self.control_config,
                self.tmp / "control" / "data",
                None,
                {},
                {"node_name": "control", "work": False, "request_timeout": 2},
            )
            self.start_broker()
            for node in self.nodes:
                self.write_node_config(node.index)
            if self._start_nodes:
                self.start_nodes()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End every process started here (by PID), then remove the namespaces."""
        try:
            for g in self.gathers:
                _end(g.proc, 10)
                for f in g.files:
                    f.close()
            self.gathers.clear()
            for node in self.nodes:
                if node.proc is not None:
                    _end(node.proc, 30)
                    node.proc = None
                for f in node.logs:
                    f.close()
                node.logs.clear()
            if self.broker is not None:
                self.broker.stop()
        finally:
            self.net.close()

    # -- the broker --------------------------------------------------------------------

    def start_broker(self) -> NatsServer:
        """Start (or restart, on the same store) the broker in namespace 0."""
        self.broker = NatsServer(
            self.tmp / "broker",
            self.token,
            host=self.broker_host.addr,
            port=BROKER_PORT,
            netns=self.broker_host.name,
        )
        self.broker.start(timeout=30)
        return self.broker

    def kill_broker(self) -> None:
        """SIGKILL the broker (its stored streams stay for :meth:`start_broker`)."""
        assert self.broker is not None
        self.broker.kill()

    # -- nodes -------------------------------------------------------------------------

    def _write_config(
        self,
        path: Path,
        data_dir: Path,
        host: Host | None,
        runner: Mapping[str, Any],
        site: Mapping[str, Any],
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        settings: dict[str, object] = {"data_dir": data_dir, "dht": False, "lsd": False}
        if host is not None:
            settings |= {
                "api": f"{host.addr}:7000",
                "listen": f"{host.addr}:6881",
                "peer": f"{host.addr}:6880",
            }
        if runner:
            settings["runner"] = dict(runner)
        settings["site"] = {"nats": self.url, "token_file": str(self.token_file), **site}
        path.write_text(render_config(settings, {}))

    def write_node_config(self, i: int) -> Path:
        """(Re)write node ``i``'s configuration from its ``runner`` and ``site`` tables."""
        node = self.nodes[i]
        self._write_config(node.config, node.data_dir, node.host, node.runner, node.site)
        return node.config

    def start_nodes(self) -> None:
        """Start every node that is not running, then wait for all of them."""
        idle = [n.index for n in self.nodes if n.proc is None]
        for i in idle:
            self._spawn(i)
        for i in idle:
            self._wait_ready(i)

    def start_node(self, i: int) -> NodeHandle:
        """Start node ``i`` (after a kill: the same data directory) and wait until ready."""
        self._spawn(i)
        self._wait_ready(i)
        return self.nodes[i]

    def _spawn(self, i: int) -> None:
        node = self.nodes[i]
        assert node.proc is None or node.proc.poll() is not None, f"node {i} runs already"
        self.write_node_config(i)
        # A node killed with SIGKILL leaves its node.json: wait for the new one.
        (node.data_dir / "node.json").unlink(missing_ok=True)
        log = open(node.log_path, "ab")  # noqa: SIM115 - closed in close()
        node.logs.append(log)
        node.proc = node.host.popen(
            [PY, "-m", "swarm", "node", "--config", node.config],
            env={**os.environ, **node.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )

    def _wait_ready(self, i: int) -> None:
        node = self.nodes[i]

        def ready() -> bool:
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise AssertionError(
                    f"node {i} exited with {node.proc.returncode}:\n{node.log()[-3000:]}"
                )
            return (node.data_dir / "node.json").exists()

        eventually(f"node {i} to be ready", ready, NODE_READY, interval=POLL)

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a crash) to node ``i`` and reap it."""
        node = self.nodes[i]
        assert node.proc is not None, f"node {i} is not running"
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.proc.pid, sig)
        node.proc.wait(timeout=30)
        node.proc = None

    def stop_node(self, i: int) -> int:
        """SIGTERM node ``i`` (SIGKILL after 30 s); its exit status."""
        node = self.nodes[i]
        assert node.proc is not None, f"node {i} is not running"
        code = _end(node.proc, 30)
        node.proc = None
        return code

    # -- commands ----------------------------------------------------------------------

    def _where(self, on: int | None) -> tuple[Host, Path]:
        """The namespace and configuration of node ``on`` (None: the control
        configuration in the broker's namespace)."""
        if on is None:
            return self.broker_host, self.control_config
        return self.nodes[on].host, self.nodes[on].config

    def swarm(
        self, *args: str | Path, on: int | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``swarm ARGS --config CONFIG`` in the namespace of node ``on``
        (None: the broker's, with the control configuration)."""
        host, config = self._where(on)
        return host.run(
            [PY, "-m", "swarm", *map(str, args), "--config", config],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, spec: Path, *options: str, on: int | None = None) -> str:
        """``swarm site-job submit SPEC [OPTIONS] --json``; the job's id.

        Raises:
            AssertionError: the command failed (its stderr says why).
        """
        r = self.swarm("site-job", "submit", spec, *options, "--json", on=on)
        assert r.returncode == 0, f"submit exited {r.returncode}: {r.stderr}"
        job: str = json.loads(r.stdout)["id"]
        return job

    def status(self, job: str, *, on: int | None = None) -> dict[str, Any]:
        """``swarm site-job status JOB --json``.

        Raises:
            AssertionError: the command failed (its stderr says why).
        """
        r = self.swarm("site-job", "status", job, "--json", on=on)
        assert r.returncode == 0, f"status exited {r.returncode}: {r.stderr}"
        st: dict[str, Any] = json.loads(r.stdout)
        return st

    def start_gather(self, job: str, output: Path, *, on: int | None = None) -> GatherHandle:
        """``swarm site-job gather JOB --output OUTPUT --json`` as a child, in
        the namespace of node ``on`` (None: the broker's)."""
        host, config = self._where(on)
        n = len(self.gathers)
        out, err = self.tmp / f"gather{n}.out", self.tmp / f"gather{n}.err"
        files: list[IO[bytes]] = [open(out, "wb"), open(err, "wb")]  # noqa: SIM115 - closed in close()
        proc = host.popen(
            [PY, "-m", "swarm", "site-job", "gather", job, "--output", output, "--json",
             "--config", config],
            stdin=subprocess.DEVNULL,
            stdout=files[0],
            stderr=files[1],
        )  # fmt: skip
        g = GatherHandle(job, output, on, proc, out, err, files)
        self.gathers.append(g)
        return g

    def kill_gather(self, g: GatherHandle) -> None:
        """SIGKILL the gather (a crash) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(g.proc.pid, signal.SIGKILL)
        g.proc.wait(timeout=30)

    def restart_gather(self, g: GatherHandle) -> GatherHandle:
        """SIGKILL ``g`` if it still runs, and start a gather of the same job
        on the same output directory in the same namespace."""
        if g.proc.poll() is None:
            self.kill_gather(g)
        return self.start_gather(g.job, g.output, on=g.on)

    def wait_gather(self, g: GatherHandle, timeout: float) -> tuple[int, dict[str, Any] | None]:
        """The gather's exit status and JSON report (None if it printed none).

        Raises:
            AssertionError: it did not exit within ``timeout`` s (it is killed;
                the message holds its stderr).
        """
        try:
            code = g.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_gather(g)
            raise AssertionError(
                f"the gather did not finish in {timeout:g} s: {g.stderr.read_text()[-3000:]}"
            ) from None
        for f in g.files:
            f.flush()
        text = g.stdout.read_text()
        try:
            report = json.loads(text) if text.strip() else None
        except ValueError:
            report = None
        return code, report

    def node_status(self, i: int) -> dict[str, Any]:
        """Node ``i``'s ``GET /v1/status`` (its ``site`` section says what its
        worker runs), read from inside its namespace.

        Raises:
            AssertionError: no answer within 10 s (the message says what came back).
        """
        node = self.nodes[i]
        r = node.host.run(
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "10",
                f"http://{node.host.addr}:7000/v1/status",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, f"node {i}'s status: curl exited {r.returncode}: {r.stderr}"
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def publish(self, subject: str, data: bytes, *, on: int | None = None) -> int:
        """Publish ``data`` on ``subject`` into JetStream as a token holder (a
        plain nats-py client with the site's token, from the namespace of node
        ``on``; None: the broker's); the stream sequence it was stored at.

        Raises:
            AssertionError: the broker did not store it (the message says why).
        """
        host = self.broker_host if on is None else self.nodes[on].host
        code = (
            "import asyncio, sys, nats\n"
            "async def main():\n"
            "    nc = await nats.connect(sys.argv[1], token=sys.argv[2], allow_reconnect=False,\n"
            "                            connect_timeout=5)\n"
            "    try:\n"
            "        js = nc.jetstream(timeout=5)\n"
            "        ack = await js.publish(sys.argv[3], sys.stdin.buffer.read())\n"
            "        print(ack.seq)\n"
            "    finally:\n"
            "        await nc.close()\n"
            "asyncio.run(main())\n"
        )
        r = host.run(
            [PY, "-c", code, self.url, self.token, subject],
            input=data,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        assert r.returncode == 0, f"publish on {subject}: {r.stderr.decode(errors='replace')}"
        return int(r.stdout)

    def connect_without_token(self, on: int | None = None, token: str | None = None) -> str:
        """Try a plain nats-py client (``token``: None for none) from a
        namespace; what happened: ``"connected"`` or the client's error."""
        host = self.broker_host if on is None else self.nodes[on].host
        code = (
            "import asyncio, sys, nats\n"
            "seen = []\n"
            "async def quiet(exc):\n"
            "    seen.append(exc)\n"
            "async def main():\n"
            "    kw = {} if len(sys.argv) < 3 else {'token': sys.argv[2]}\n"
            "    try:\n"
            "        nc = await nats.connect(sys.argv[1], allow_reconnect=False,\n"
            "                                connect_timeout=5, max_reconnect_attempts=1,\n"
            "                                error_cb=quiet, **kw)\n"
            "    except Exception as exc:\n"
            "        print(f'refused: {(seen or [exc])[0]!r}'); return\n"
            "    await nc.close(); print('connected')\n"
            "asyncio.run(main())\n"
        )
        argv = [PY, "-c", code, self.url] + ([token] if token is not None else [])
        r = host.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        said: str = r.stdout.strip() or r.stderr.strip() or f"exit status {r.returncode}"
        return said.splitlines()[-1]


def _end(proc: subprocess.Popen[Any], grace: float) -> int:
    """SIGTERM ``proc``, SIGKILL after ``grace`` s; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return proc.wait(timeout=10)
