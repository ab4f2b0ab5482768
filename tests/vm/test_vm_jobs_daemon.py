"""VM jobs across a node daemon's crash: the queue's crash rule holds for VM
specs, and the VM a killed daemon left is ended before the spec's pilot
starts it again. No qemu boots: the "VM" the killed node left is a process
in the VM's directory, as the node would have left its qemu."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from swarm.status import VmReport, to_json
from swarm_testing.waiting import eventually
from tests.harness import NodeProcess
from tests.vm.test_vm_daemon import node_config

VM_ID = "20261201-100000-abcdef"
JOB = "20261201-100000.000-abcdef"


def test_a_vm_job_left_running_by_a_killed_node_is_queued_again_after_its_vm_is_ended(
    tmp_path: Path,
) -> None:
    # What a SIGKILLed node leaves: the spec in running/ beside its VM id, and
    # the VM's live record naming a process that still runs in its directory.
    data = tmp_path / "data"
    vm_dir = data / "vms" / VM_ID
    vm_dir.mkdir(parents=True)
    queue = data / "jobs" / "queue"
    (queue / "running").mkdir(parents=True)
    (queue / "running" / f"{JOB}.toml").write_text(
        'name = "vm-job"\n[vm]\nimage = "vm.example.org/guest/1"\n'
    )
    (queue / "running" / f"{JOB}.vm").write_text(f"{VM_ID}\n")
    (queue / "running" / f"{JOB}.started").write_text(f"{time.time()}\n")
    left = subprocess.Popen(["sleep", "120"], cwd=vm_dir)
    try:
        t = time.time()
        record = VmReport(VM_ID, "vm.example.org/guest/1", "running", 1, 128 << 20, t,
                          accelerator="tcg", pid=left.pid, started=t, ends=t + 3600,
                          dir=str(vm_dir), job=JOB)  # fmt: skip
        (vm_dir / "record.json").write_text(json.dumps(to_json(record)))
        cfg = node_config(
            tmp_path,
            runner={"cores": 2, "power_per_core": 10.0, "time_left": 3600},
            vm={"accelerator": "tcg"},
        )
        with NodeProcess(cfg, data, None, tmp_path / "node.log"):
            assert left.wait(timeout=30) == -9  # ended by the node's start
            base = json.loads((data / "node.json").read_text())["api"]

            def job() -> dict[str, object]:
                with urllib.request.urlopen(f"{base}v1/jobs/{JOB}", timeout=10) as r:
                    doc: dict[str, object] = json.loads(r.read())
                    return doc

            # back in the queue, and tried again: this node has no mount to boot from
            refused = eventually("the spec tried again", lambda: job().get("refused"), 30)
            assert job()["state"] == "queued" and job()["kind"] == "vm"
            assert "the node has no mount" in str(refused)
            assert not (queue / "running" / f"{JOB}.vm").exists()
            with urllib.request.urlopen(f"{base}v1/vms/{VM_ID}", timeout=10) as r:
                vm = json.loads(r.read())
            assert vm["state"] == "stopped" and vm["job"] == JOB
            assert vm["outcome"] == (
                f"the node daemon stopped while it ran (its qemu, pid {left.pid}, was killed)"
            )
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
