"""``swarm site-job`` and ``swarm site-broker`` run for real (subprocesses)
against a real nats-server on 127.0.0.1: answers, one-line errors, and the
exit statuses ``swarm --help`` documents."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sitejob.config import SiteConfig
from swarm.config import render_config
from swarm_testing.broker import free_port
from swarm_testing.waiting import eventually
from tests.sitejob.broker_client import Broker
from tests.sitejob.test_control import spec_text

pytestmark = pytest.mark.nats


def swarm(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_config(tmp: Path, site: dict[str, Any] | None, name: str = "node.toml") -> Path:
    settings: dict[str, object] = {"data_dir": tmp / "data"}
    if site is not None:
        settings["site"] = site
    path = tmp / name
    path.write_text(render_config(settings, {}))
    return path


def site_table(cfg: SiteConfig, **extra: Any) -> dict[str, Any]:
    assert cfg.token_file is not None
    table = {"nats": cfg.servers[0], "token_file": cfg.token_file.name, "node_name": "wn1"}
    return {**table, "request_timeout": 2, **extra}


def one_line_error(r: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swarm"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_submit_status_and_list(broker: Broker, tmp_path: Path) -> None:
    _server, cfg = broker
    conf = node_config(cfg.token_file.parent if cfg.token_file else tmp_path, site_table(cfg))
    spec = tmp_path / "job.toml"
    spec.write_text(spec_text("mc", max_events=95))

    r = swarm("site-job", "submit", spec, "--config", conf)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    r = swarm("site-job", "submit", spec, "--config", conf, "--events", "30", "--json")
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["ranges"] == 3 and second["events"] == 30 and second["id"] > job

    r = swarm("site-job", "status", job, "--config", conf, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["events_planned"] == 95 and st["events_committed"] == 0
    assert st["ranges"] == {"ready": 10, "running": 0, "finished": 0, "retrying": 0, "abandoned": 0}
    assert st["complete"] is False and st["abandoned"] == [] and st["name"] == "mc"

    r = swarm("site-job", "status", job, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert f"site job {job} (mc)" in r.stdout
    assert "0 of 95 committed" in r.stdout and "10 ready, 0 running" in r.stdout

    r = swarm("site-job", "list", "--config", conf, "--json")
    assert r.returncode == 0, r.stderr
    assert [j["id"] for j in json.loads(r.stdout)] == [job, second["id"]]
    r = swarm("site-job", "list", "--config", conf)
    assert r.returncode == 0 and job in r.stdout and "open" in r.stdout


def test_a_big_submit_shows_its_progress_on_stderr(broker: Broker, tmp_path: Path) -> None:
    _server, cfg = broker
    assert cfg.token_file is not None
    conf = node_config(cfg.token_file.parent, site_table(cfg))
    spec = tmp_path / "job.toml"
    spec.write_text(spec_text("big", max_events=1030, per_task=1))
    r = swarm("site-job", "submit", spec, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert "published 1030/1030 ranges" in r.stderr
    job = r.stdout.strip()
    st = json.loads(swarm("site-job", "status", job, "--config", conf, "--json").stdout)
    assert st["ranges"]["ready"] == st["ranges_planned"] == 1030


def test_bad_input_is_one_line_with_its_exit_status(broker: Broker, tmp_path: Path) -> None:
    _server, cfg = broker
    assert cfg.token_file is not None
    base = cfg.token_file.parent
    conf = node_config(base, site_table(cfg))
    good = tmp_path / "job.toml"
    good.write_text(spec_text())
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')

    one_line_error(swarm("site-job", "submit", bad, "--config", conf), 1, "field 'command'")
    one_line_error(swarm("site-job", "submit", tmp_path / "none.toml", "--config", conf), 1, "none")
    r = swarm("site-job", "submit", good, "--config", conf, "--events", "0")
    one_line_error(r, 2, "--events")
    r = swarm("site-job", "submit", good, "--config", conf, "--ack-wait", "0.1")
    one_line_error(r, 2, "--ack-wait")
    no_site = node_config(tmp_path, None, "no-site.toml")
    one_line_error(swarm("site-job", "list", "--config", no_site), 2, "no [site] table")
    typo = node_config(base, {**site_table(cfg), "natz": "x"}, "typo.toml")
    one_line_error(swarm("site-job", "list", "--config", typo), 2, "site.natz")
    unknown = "20250101-000000-000-abcdef"
    one_line_error(swarm("site-job", "status", unknown, "--config", conf), 1, "no site job")
    r = swarm("site-job", "list", "--config", conf, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []  # nothing was submitted


def test_an_unreachable_broker_or_a_wrong_token_is_unavailable_naming_the_url(
    broker: Broker, tmp_path: Path
) -> None:
    _server, cfg = broker
    assert cfg.token_file is not None
    nowhere = f"nats://127.0.0.1:{free_port()}"
    conf = node_config(cfg.token_file.parent, {**site_table(cfg), "nats": nowhere}, "off.toml")
    r = swarm("site-job", "list", "--config", conf, timeout=30)
    one_line_error(r, 6, nowhere)
    (tmp_path / "wrong.token").write_text("not-the-token\n")
    wrong = node_config(tmp_path, {**site_table(cfg), "token_file": "wrong.token"}, "wrong.toml")
    r = swarm("site-job", "list", "--config", wrong, timeout=30)
    one_line_error(r, 6, cfg.servers[0])
    assert "authorization" in r.stderr.lower()


def test_site_broker_runs_until_sigterm_with_a_private_token(tmp_path: Path) -> None:
    port = free_port()
    d = tmp_path / "broker"
    log = open(tmp_path / "broker.out", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "site-broker", "--dir", d, "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def printed() -> str | None:
            assert proc.poll() is None, (tmp_path / "broker.out").read_text()
            text = (tmp_path / "broker.out").read_text()
            return text if "site broker" in text else None

        out = eventually("the broker's URL", printed, 30)
        assert f"nats://127.0.0.1:{port}" in out and str(d / "nats.token") in out
        token = d / "nats.token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) > 30
        conf = node_config(tmp_path, {"nats": f"nats://127.0.0.1:{port}", "token_file": str(token)})
        r = swarm("site-job", "list", "--config", conf)
        assert r.returncode == 0 and "no site jobs" in r.stdout, r.stderr
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
            pass  # the server it started is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    # A token file that exists is used as it is; an empty one is refused.
    (tmp_path / "empty.token").write_text("")
    r = swarm("site-broker", "--dir", d, "--token-file", tmp_path / "empty.token")
    one_line_error(r, 2, "--token-file", "no token")


def test_gather_of_an_unknown_job_is_one_line(broker: Broker, tmp_path: Path) -> None:
    _server, cfg = broker
    assert cfg.token_file is not None
    conf = node_config(cfg.token_file.parent, site_table(cfg))
    r = swarm("site-job", "gather", "20250101-000000-000-abcdef", "--output", tmp_path / "out",
              "--config", conf)  # fmt: skip
    one_line_error(r, 1, "no site job")
