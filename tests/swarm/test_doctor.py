"""``swarm doctor``: one line per check with the fix, exit status 0 / 1 / 2
by the worst result; each condition is made real (a closed port on
127.0.0.1, an expired or unreadable root, a port held by another process or
by this node's daemon, a broker that is not there; qemu missing, failing or
hanging, /dev/kvm absent or unopenable, little space for VM overlays)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w

from swarm.config import render_config
from swarm.doctor import Level, Probe, run_checks
from swarm_testing.broker import free_port
from swarm_testing.waiting import eventually
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
    repository, no mount, the runner and VMs disabled."""
    base: dict[str, object] = {
        "data_dir": tmp / "data",
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
    }
    tables.setdefault("runner", {"enabled": False})
    tables.setdefault("vm", {"enabled": False})
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
    assert line(lines, "vms") == "SKIP vms: VMs are disabled ([vm] enabled = false)"
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


def results(config: Path, **probe: object) -> dict[str, tuple[Level, str, str]]:
    """The doctor's checks run in this process (``probe``: the seams set)."""
    out = run_checks(Probe(config_path=config, **probe))  # type: ignore[arg-type]
    return {r.check: (r.level, r.message, r.fix) for r in out}


@pytest.mark.qemu
def test_configured_vms_check_qemu_qemu_img_kvm_and_overlay_space(tmp_path: Path) -> None:
    status, lines = doctor(write_config(tmp_path, {}, vm={"accelerator": "tcg"}))
    assert line(lines, "qemu").startswith("OK   qemu: QEMU emulator version ")
    assert line(lines, "qemu-img").startswith("OK   qemu-img: qemu-img version ")
    assert line(lines, "kvm") == "SKIP kvm: vm.accelerator = tcg: software emulation, no KVM"
    assert line(lines, "vm disk").startswith("OK   vm disk: ")
    assert status == 0, lines

    # Less free space than the threshold (a real statvfs of data_dir's file system).
    got = results(write_config(tmp_path, {}, vm={"accelerator": "tcg"}), vm_free_minimum=1 << 60)
    level, message, fix = got["vm disk"]
    assert level is Level.WARN and "GiB free on" in message and "overlay" in fix


def test_a_configured_qemu_that_is_missing_fails_and_on_by_default_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = tmp_path / "no-such-qemu"
    status, lines = doctor(write_config(tmp_path, {}, vm={"qemu": str(qemu)}))
    assert status == 2
    assert line(lines, "qemu") == (
        f"FAIL qemu: {qemu} is not found -- fix: apt-get install qemu-system-x86, or set vm.qemu"
    )
    # No [vm] table: VMs are on by default and the node runs without them: a warning.
    config = write_config(tmp_path, {}, vm={})
    config.write_text(config.read_text().replace("[vm]\n", ""))
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without qemu
    got = results(config)
    for check, program in (("qemu", "qemu-system-x86_64"), ("qemu-img", "qemu-img")):
        level, message, fix = got[check]
        assert (level, message) == (Level.WARN, f"{program} is not found")
        assert "[vm] enabled = false" in fix


def test_a_qemu_that_fails_or_hangs_fails_within_the_deadline(tmp_path: Path) -> None:
    broken = tmp_path / "broken-qemu"
    broken.write_text("#!/bin/sh\necho 'qemu: cannot load libfoo' >&2\nexit 3\n")
    broken.chmod(0o755)
    # Not exec'd: the sleep is a child of the shell and holds the output pipe.
    hung = tmp_path / "hung-qemu-img"
    pid_file = tmp_path / "sleep.pid"
    hung.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    hung.chmod(0o755)
    config = write_config(tmp_path, {}, vm={"qemu": str(broken), "qemu_img": str(hung)})
    start = time.monotonic()
    got = results(config, version_deadline=0.5)
    assert time.monotonic() - start < 10  # 0.5 s, generous slack for a loaded machine
    assert got["qemu"][:2] == (
        Level.FAIL,
        f"{broken} --version exited with status 3: qemu: cannot load libfoo",
    )
    assert got["qemu-img"][:2] == (Level.FAIL, f"{hung} --version did not answer within 0.5 s")
    sleeper = int(pid_file.read_text())
    eventually("the hung program's child to be gone", lambda: not _alive(sleeper), 10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kvm_absent_warns_software_emulation_and_fails_where_kvm_is_required(
    tmp_path: Path,
) -> None:
    absent = tmp_path / "kvm"
    auto = results(write_config(tmp_path, {}, vm={"accelerator": "auto"}), kvm_device=absent)
    level, message, fix = auto["kvm"]
    assert (level, message) == (
        Level.WARN,
        f"{absent} is absent: software emulation only (much slower)",
    )
    assert "modprobe kvm_intel" in fix

    required = write_config(tmp_path, {}, vm={"accelerator": "kvm"})
    level, message, fix = results(required, kvm_device=absent)["kvm"]
    assert (level, message) == (
        Level.FAIL,
        f"{absent} is absent, and vm.accelerator = kvm: no VM can start",
    )
    assert 'set vm.accelerator = "auto"' in fix
    absent.mkdir()  # there, but no device that opens read-write (for root too)
    level, message, _ = results(required, kvm_device=absent)["kvm"]
    assert (level, message) == (
        Level.FAIL,
        f"{absent} cannot be opened: Is a directory, and vm.accelerator = kvm: no VM can start",
    )


def test_a_device_that_opens_read_write_is_ok(tmp_path: Path) -> None:
    # The check opens the device read-write, as qemu does (/dev/null stands in
    # for a usable /dev/kvm, which not every test machine has).
    config = write_config(tmp_path, {}, vm={"accelerator": "kvm"})
    level, message, _ = results(config, kvm_device=Path("/dev/null"))["kvm"]
    assert (level, message) == (Level.OK, "/dev/null opens")
    auto = write_config(tmp_path, {}, vm={"accelerator": "auto"})
    level, message, _ = results(auto, kvm_device=Path("/dev/null"))["kvm"]
    assert level is Level.OK and "probed at the first VM" in message


def test_a_bad_vm_table_fails_the_config_through_its_owner(tmp_path: Path) -> None:
    status, lines = doctor(write_config(tmp_path, {}, vm={"accelerator": "xen"}))
    assert status == 2
    assert "[vm]: vm.accelerator: expected one of auto, kvm, tcg" in line(lines, "config")
    assert line(lines, "vms") == "SKIP vms: needs a valid config"
