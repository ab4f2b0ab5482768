"""The VM service in the node daemon's wiring: its [vm] table checked before
anything starts, and nothing else of the node changed by it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from swarm.config import render_config
from tests.harness import NodeProcess


def node_config(tmp_path: Path, **tables: object) -> Path:
    cfg = tmp_path / "node.toml"
    settings: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
        **tables,
    }
    cfg.write_text(render_config(settings, {}))
    return cfg


def test_a_bad_vm_key_stops_the_node_before_it_starts_with_one_line(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, vm={"accelerater": "tcg"})
    r = subprocess.run([sys.executable, "-m", "swarm", "node", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "vm.accelerater: unknown key" in r.stderr
    assert not (tmp_path / "data").exists()


def test_a_node_without_a_job_service_or_a_mount_starts_and_refuses_vms_saying_why(
    tmp_path: Path,
) -> None:
    # [runner] is off and names a job user that does not exist: the node never
    # read that table before VMs; it still starts, and VMs are refused with why.
    cfg = node_config(tmp_path, runner={"enabled": False, "job_user": "no-such-user-x9"})
    data = tmp_path / "data"
    with NodeProcess(cfg, data, None, tmp_path / "node.log"):
        base = json.loads((data / "node.json").read_text())["api"]
        token = (data / "api.token").read_text().strip()
        req = urllib.request.Request(
            base + "v1/vms",
            data=json.dumps({"image": "r.example.org/img/1"}).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("the VM was not refused")
        except urllib.error.HTTPError as exc:
            assert exc.code == 409
            assert "the node has no mount" in json.loads(exc.read())["error"]
        r = subprocess.run(
            [sys.executable, "-m", "swarm", "vm", "list", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0 and r.stdout == "", r.stderr
        with urllib.request.urlopen(base + "openapi.json", timeout=30) as resp:
            paths = json.loads(resp.read())["paths"]
        assert {"/v1/vms", "/v1/vms/{id}", "/v1/vms/{id}/stop", "/v1/vms/incoming"} <= set(paths)
