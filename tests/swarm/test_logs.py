"""``--log-format json``: a long-running command's stderr is one JSON object
per line (time, level, logger, message, and the fields a log call names)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.logs import JsonFormatter
from swarm_testing.broker import free_port
from swarm_testing.waiting import eventually
from tests.harness import MountProcess, OriginServer, publish_hello
from trust.keys import init_keys


def test_serve_log_format_json_writes_one_json_object_per_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    err = tmp_path / "stderr"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarm",
                "serve",
                str(store),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
        try:

            def serving() -> bool:
                assert proc.poll() is None, f"swarm serve exited with {proc.returncode}"
                return "origin serving" in err.read_text()

            eventually("the origin's first log line", serving, 20)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    lines = err.read_text().splitlines()
    assert lines, "swarm serve logged nothing"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert {"time", "level", "logger", "message"} <= r.keys()
    origin = [r for r in records if r["logger"] == "swarm.origin"]
    assert origin and f"127.0.0.1:{port}" in origin[0]["message"]
    assert origin[0]["level"] == "INFO"


def test_json_formatter_carries_the_fields_a_log_call_names() -> None:
    record = logging.LogRecord(
        "swarm.node",
        logging.WARNING,
        __file__,
        1,
        "object %s failed\nverification",
        ("ab",),
        None,
    )
    record.repository = "sw.example.org"
    record.object = "ab" * 32
    record.peer = "127.0.0.1:6881"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    r = json.loads(line)
    assert r["message"] == "object ab failed\nverification"
    assert (r["repository"], r["object"], r["peer"]) == (
        "sw.example.org",
        "ab" * 32,
        "127.0.0.1:6881",
    )
    assert r["level"] == "WARNING" and r["logger"] == "swarm.node"
    assert "job" not in r


@pytest.mark.fuse
def test_mount_log_format_json_names_the_repository_and_revision(tmp_path: Path) -> None:
    """A real mount's JSON log carries the repository and revision as fields."""
    repo = "sw.example.org"
    keys = init_keys(tmp_path / "keys", repo).parent
    publish_hello(tmp_path, repo, keys)
    with OriginServer(tmp_path / "store") as origin:
        mount = MountProcess(
            repo,
            tmp_path / "mnt",
            origin.url,
            keys / "root.json",
            tmp_path / "cache",
            "--log-format",
            "json",
        )
        try:
            assert (tmp_path / "mnt" / "hello").read_text() == "hello\n"
        finally:
            mount.close()
    records = [json.loads(x) for x in mount.log_path.read_text().splitlines()]
    revision = [r for r in records if r.get("revision") == 1]
    assert revision and revision[0]["repository"] == repo
    assert revision[0]["logger"] == "swarm.mount_service"
