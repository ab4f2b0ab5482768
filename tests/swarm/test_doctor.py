"""``swarm doctor``: one line per check with the fix, exit status 0 / 1 / 2
by the worst result; each condition is made real (a closed port on
127.0.0.1, an expired or unreadable root, a port held by another process or
by this node's daemon, a broker that is not there)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w

from swarm.config import render_config
from swarm.doctor import Level, Probe, run_checks
from swarm_testing.broker import free_port
from tests.harness import NodeProcess, OriginServer, publish_hello
from trust.keys import Expiry, init_keys

REPO = "sw.example.org"


def write_config(
    tmp: Path,
    settings: dict[str, object],
    repositories: Mapping[str, Mapping[str, object]] | None = None,
    **tables: Mapping[str, object],
) -> Path:
    """A node config whose defaults make every check pass or skip: ports 0, no
    repository, no mount, the runner disabled."""
    base: dict[str, object] = {
        "data_dir": tmp / "data",
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
    }
    tables.setdefault("runner", {"enabled": False})
    extra = tomli_w.dumps({k: dict(v) for k, v in tables.items()})
    text = render_config(base | settings, repositories or {}) + "\n" + extra
    path = tmp / "node.toml"
    path.write_text(text)
    return path


def doctor(config: Path, *options: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "swarm", "doctor", "--config", str(config), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines()


def line(lines: list[str], check: str) -> str:
    found = [x for x in lines if x[5:].startswith(f"{check}:")]
    assert len(found) == 1, f"no single line for {check!r} in {lines}"
    return found[0]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return init_keys(tmp_path / "keys", REPO)


def test_all_ok_or_skipped_exits_0(tmp_path: Path) -> None:
    status, lines = doctor(write_config(tmp_path, {}))
    assert status == 0, lines
    assert line(lines, "config").startswith("OK   config: ")
    assert line(lines, "vms") == "SKIP vms: no VMs configured"
    assert all(x.split()[0] in ("OK", "SKIP") for x in lines)


def test_invalid_config_fails_its_line_and_skips_the_rest(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"fetch_timeout": "soon"})
    status, lines = doctor(config)
    assert status == 2
    assert line(lines, "config").startswith("FAIL config: fetch_timeout: expected")
    assert f"fix: correct {config}" in line(lines, "config")
    assert line(lines, "ports") == "SKIP ports: needs a valid config"


def test_invalid_runner_table_fails_through_its_owner(tmp_path: Path) -> None:
    status, lines = doctor(write_config(tmp_path, {}, runner={"grace": "x", "colour": 1}))
    assert status == 2
    assert "runner.colour: unknown key" in line(lines, "config")


def test_unreachable_origin_fails_with_exit_2(tmp_path: Path, keys: Path) -> None:
    port = free_port()  # nothing listens there
    repos = {REPO: {"trust": keys, "origin": f"http://127.0.0.1:{port}/"}}
    status, lines = doctor(write_config(tmp_path, {}, repositories=repos))
    assert status == 2
    origin = line(lines, f"origin {REPO}")
    assert origin.startswith(f"FAIL origin {REPO}: http://127.0.0.1:{port}/{REPO}/metadata/")
    assert "refused" in origin and "fix: check repositories" in origin
    assert line(lines, f"trust {REPO}").startswith(f"OK   trust {REPO}: root version 1")


def test_expired_root_fails_with_exit_2(tmp_path: Path) -> None:
    root = init_keys(tmp_path / "keys", REPO, expiry=Expiry(root=timedelta(days=-1)))
    status, lines = doctor(write_config(tmp_path, {}, repositories={REPO: {"trust": root}}))
    assert status == 2
    trust = line(lines, f"trust {REPO}")
    assert trust.startswith(f"FAIL trust {REPO}: root version 1 expired at ")
    assert f"install {REPO}'s current root.json" in trust


def test_root_expiring_soon_is_a_warning_exit_1(tmp_path: Path) -> None:
    root = init_keys(tmp_path / "keys", REPO, expiry=Expiry(root=timedelta(days=3)))
    status, lines = doctor(write_config(tmp_path, {}, repositories={REPO: {"trust": root}}))
    assert status == 1, lines
    assert line(lines, f"trust {REPO}").startswith(f"WARN trust {REPO}: root version 1 expires")


def test_unreadable_root_fails_with_exit_2(tmp_path: Path) -> None:
    not_a_file = tmp_path / "root.json"
    not_a_file.mkdir()  # unreadable for root too (file modes are not)
    repos = {REPO: {"trust": not_a_file}}
    status, lines = doctor(write_config(tmp_path, {}, repositories=repos))
    assert status == 2
    assert line(lines, f"trust {REPO}").startswith(
        f"FAIL trust {REPO}: cannot read {not_a_file}: Is a directory"
    )


def test_port_held_by_another_process_fails_with_exit_2(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        status, lines = doctor(write_config(tmp_path, {"api": f"127.0.0.1:{port}"}))
    assert status == 2
    api = line(lines, "port api")
    assert api.startswith(f"FAIL port api: 127.0.0.1:{port} is in use by another process")
    assert "or change api" in api


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[tuple[Path, int, NodeProcess]]:
    api = free_port()
    config = write_config(tmp_path, {"api": f"127.0.0.1:{api}"})
    node = NodeProcess(config, tmp_path / "data", None, tmp_path / "node.log")
    try:
        yield config, api, node
    finally:
        node.close()


def test_port_held_by_this_node_is_ok(running_node: tuple[Path, int, NodeProcess]) -> None:
    config, api, node = running_node
    status, lines = doctor(config)
    assert line(lines, "port api") == (
        f"OK   port api: 127.0.0.1:{api} is held by this node (pid {node.proc.pid})"
    )
    assert status == 0, lines


def test_unreachable_bootstrap_peer_is_a_warning_exit_1(tmp_path: Path) -> None:
    port = free_port()
    status, lines = doctor(write_config(tmp_path, {"bootstrap": [f"127.0.0.1:{port}"]}))
    assert status == 1
    peer = line(lines, f"peer 127.0.0.1:{port}")
    assert peer.startswith(f"WARN peer 127.0.0.1:{port}: unreachable: Connection refused")


def test_unreachable_site_broker_fails_with_exit_2(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    port = free_port()
    site = {"nats": f"nats://127.0.0.1:{port}", "token_file": str(token)}
    status, lines = doctor(write_config(tmp_path, {}, site=site))
    assert status == 2
    broker = line(lines, "site broker")
    assert broker.startswith(f"FAIL site broker: cannot connect to nats://127.0.0.1:{port}")


def test_json_output_carries_every_line_and_the_status(tmp_path: Path) -> None:
    port = free_port()
    status, lines = doctor(write_config(tmp_path, {"bootstrap": [f"127.0.0.1:{port}"]}), "--json")
    report = json.loads("\n".join(lines))
    assert status == report["status"] == 1
    levels = {c["check"]: c["level"] for c in report["checks"]}
    assert levels[f"peer 127.0.0.1:{port}"] == "WARN" and levels["config"] == "OK"


@pytest.fixture
def origin(tmp_path: Path, keys: Path) -> Iterator[OriginServer]:
    publish_hello(tmp_path, REPO, keys.parent)
    server = OriginServer(tmp_path / "store").start()
    try:
        yield server
    finally:
        server.close()


def test_clock_ahead_of_the_origins_timestamp_fails(
    tmp_path: Path, keys: Path, origin: OriginServer
) -> None:
    """A real origin's timestamp (valid 7 days), read by a clock 8 days ahead."""
    repos = {REPO: {"trust": keys, "origin": origin.url}}
    config = write_config(tmp_path, {}, repositories=repos)
    status, lines = doctor(config)
    assert line(lines, f"origin {REPO}") == f"OK   origin {REPO}: {origin.url} answers"
    assert line(lines, f"clock {REPO}").startswith(f"OK   clock {REPO}: the origin's timestamp")
    assert status == 0, lines

    ahead = Probe(config_path=config, now=lambda: datetime.now(UTC) + timedelta(days=8))
    results = run_checks(ahead)
    clock = [r for r in results if r.check == f"clock {REPO}"]
    assert [r.level for r in clock] == [Level.FAIL]
    assert "expired at" in clock[0].message and "timedatectl" in clock[0].fix
