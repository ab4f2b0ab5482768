"""VM jobs in the masonry queue: the pilot's rules with a fake VM side.

The fake claims and releases cores in a real :class:`runner.cores.CoreLedger`
exactly as ``vm.manager.VmService`` does (all or none, never waiting) and ends
its VMs when the test says; specs are parsed by the real ``vm.job`` parser.
A real qemu runs the same path in ``tests/vm/test_vm_jobs_node.py``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.confine import Confinement
from runner.cores import CoreLedger
from runner.exceptions import JobSpecError
from runner.lease import Lease
from runner.masonry import QueueLock, run_pilot
from runner.service import JobService
from runner.vm_jobs import RunningVms, StartAnswer, VmEnded, VmJob, VmStart
from swarm_testing.waiting import eventually
from tests.runner.test_service import spec_text
from vm.job import VmJobSpec, parse_vm_spec

IMAGE = "vm.example.org/guest/1"


def vm_spec(name: str, cores: Any = 1, *, image: str = IMAGE, **vm: Any) -> str:
    fields = {"image": image, "cores": cores, "min_seconds": 10, **vm}
    return f'name = "{name}"\n[vm]\n' + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in fields.items()
    )


def lease_of(cores: int, time_left: float = 3600.0) -> Callable[[float], Lease]:
    return Lease(cores, 10.0, time_left, None, time.monotonic(), {}).at


@dataclass
class FakeVm:
    job_id: str
    cores: int
    lifetime: float
    on_end: VmEnded
    started: float


class FakeVms:
    """The node's VM side (runner.vm_jobs.VmLauncher) over a real ledger."""

    def __init__(self, ledger: CoreLedger) -> None:
        self.ledger = ledger
        self.refused_images: dict[str, str] = {}  # image name -> the site policy's reason
        self.backed_off: dict[str, str] = {}  # image name -> until when
        self.fault: str | None = None
        self.running: dict[str, FakeVm] = {}
        self.lock = threading.Lock()
        self.most_at_once = 0
        self.starts = 0
        self.stop_calls: list[tuple[list[str], float]] = []

    def parse(self, data: Mapping[str, Any]) -> VmJob:
        return parse_vm_spec(data)

    def start(
        self, job: VmJob, *, job_id: str, lifetime: float, capacity: int, on_end: VmEnded
    ) -> VmStart:
        assert isinstance(job, VmJobSpec)
        self.starts += 1
        if self.fault is not None:
            return VmStart(StartAnswer.NODE_FAULT, reason=self.fault)
        if job.image.name in self.refused_images:
            return VmStart(StartAnswer.REJECTED, reason=self.refused_images[job.image.name])
        if job.image.name in self.backed_off:
            return VmStart(StartAnswer.REFUSED, reason=self.backed_off[job.image.name])
        if not self.ledger.claim_vm(capacity, job.cores):
            return VmStart(StartAnswer.WAIT, reason=f"{job.cores} cores asked, none free")
        with self.lock:
            vm_id = f"vm-{job_id}"
            self.running[vm_id] = FakeVm(job_id, job.cores, lifetime, on_end, time.time())
            self.most_at_once = max(self.most_at_once, len(self.running))
        return VmStart(StartAnswer.STARTED, vm_id=vm_id)

    def end(self, vm_id: str, code: int = 200, text: str = "Success") -> None:
        """The VM is over: cores back, then the outcome from another thread."""
        with self.lock:
            vm = self.running.pop(vm_id)
        self.ledger.release_vm(vm.cores)
        outcome = {"id": vm_id, "code": code, "outcome": text, "started": vm.started,
                   "stopped": time.time(), "outputs": ["result"], "accelerator": "tcg"}  # fmt: skip
        t = threading.Thread(target=vm.on_end, args=(outcome,))
        t.start()
        t.join()

    def stop(self, vm_ids: list[str], grace: float, *, wait: bool) -> None:
        self.stop_calls.append((vm_ids, grace))
        for vm_id in vm_ids:
            if vm_id in self.running:
                self.end(vm_id, 100, "Shutdown as requested by the host")


_OWNERS: dict[Path, QueueLock] = {}


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Path]:
    """A queue this test owns (as a job service does for its life)."""
    q = tmp_path / "queue"
    with QueueLock(q) as lock:
        _OWNERS[q] = lock
        try:
            yield q
        finally:
            del _OWNERS[q]


def drop(queue: Path, name: str, text: str) -> None:
    (queue / f"{name}.toml").write_text(text)


def pilot(queue: Path, vms: FakeVms, lease_at: Callable[[float], Lease], running: RunningVms,
          **kw: Any) -> Any:  # fmt: skip
    return run_pilot(
        queue, queue.parent / "work", lease_at, time.monotonic, cores=vms.ledger, vms=vms,
        running_vms=running, confinement=Confinement(user=None), owner=_OWNERS[queue], **kw,
    )  # fmt: skip


def where(queue: Path, name: str) -> str:
    for state, d in (("done", queue / "done"), ("running", queue / "running"),
                     ("rejected", queue / "rejected"), ("queued", queue)):  # fmt: skip
        if (d / f"{name}.toml").exists():
            return state
    return "gone"


def test_the_pilot_fills_free_cores_with_vms_and_does_not_wait_for_them(queue: Path) -> None:
    vms = FakeVms(CoreLedger())
    running = RunningVms(queue)
    for name, cores in (("a", 1), ("b", 2), ("c", 2), ("d", 1)):
        drop(queue, name, vm_spec(name, cores))
    report = pilot(queue, vms, lease_of(4), running)
    # a (1) + b (2) + d (1) fill the 4 cores at once; c (2) waits for cores
    assert [where(queue, n) for n in "abcd"] == ["running", "running", "queued", "running"]
    assert "waits for 2 free cores (0 free of the lease's 4" in report.refused["c.toml"]
    assert report.stopped == "no queued job fits the lease"
    assert vms.ledger.snapshot().vm == 4 and running.vm_ids() == ["vm-a", "vm-b", "vm-d"]
    assert (queue / "running" / "b.vm").read_text() == "vm-b\n"

    vms.end("vm-b")  # its cores go to the next spec
    assert where(queue, "b") == "done" and not (queue / "running" / "b.vm").exists()
    done = json.loads((queue / "done" / "b.report.json").read_text())
    assert (done["kind"], done["vm"], done["outcome"]["code"]) == ("vm", "vm-b", 200)
    assert done["outcome"]["outputs"] == ["result"] and done["ended_at"] >= done["started_at"]
    pilot(queue, vms, lease_of(4), running)
    assert where(queue, "c") == "running"
    assert vms.ledger.snapshot().peak == 4


def test_a_vm_spec_needing_more_than_the_lease_left_stays_queued_and_lifetimes_end_before_it(
    queue: Path,
) -> None:
    vms = FakeVms(CoreLedger())
    running = RunningVms(queue)
    drop(queue, "long", vm_spec("long", min_seconds=5000))
    drop(queue, "capped", vm_spec("capped", lifetime=86400))
    drop(queue, "short", vm_spec("short", lifetime=100))
    report = pilot(queue, vms, lease_of(4, time_left=1000.0), running)
    assert where(queue, "long") == "queued"
    assert "needs min_seconds 5000 s; the lease has 990 s left" in report.refused["long.toml"]
    # lifetime = min(the spec's, the lease's time left less the end reserve)
    assert vms.running["vm-capped"].lifetime == pytest.approx(990.0, abs=1.0)
    assert vms.running["vm-short"].lifetime == 100
    # a node with a longer lease takes it
    pilot(queue, vms, lease_of(4, time_left=9000.0), running)
    assert where(queue, "long") == "running"


def test_a_vm_refused_by_the_site_policy_is_rejected_a_backed_off_one_waits_saying_why(
    queue: Path,
) -> None:
    vms = FakeVms(CoreLedger())
    running = RunningVms(queue)
    vms.refused_images["evil"] = "image vm.example.org/evil/1 is refused by the site policy: x"
    vms.backed_off["guest"] = "VM type vm.example.org/guest/1 backed off for 600 s more"
    drop(queue, "bad", vm_spec("bad", image="vm.example.org/evil/1"))
    drop(queue, "later", vm_spec("later"))
    report = pilot(queue, vms, lease_of(2), running)
    assert where(queue, "bad") == "rejected"
    assert (queue / "rejected" / "bad.reason").read_text().strip() == vms.refused_images["evil"]
    assert where(queue, "later") == "queued"
    assert report.refused["later.toml"] == vms.backed_off["guest"]
    assert vms.ledger.snapshot().vm == 0
    del vms.backed_off["guest"]  # the back-off ended
    pilot(queue, vms, lease_of(2), running)
    assert where(queue, "later") == "running"


def test_a_node_that_cannot_start_vms_keeps_every_vm_spec_queued_and_tries_once(
    queue: Path,
) -> None:
    vms = FakeVms(CoreLedger())
    vms.fault = "cannot run /nonexistent/qemu: No such file or directory"
    for name in ("x", "y"):
        drop(queue, name, vm_spec(name))
    report = pilot(queue, vms, lease_of(2), RunningVms(queue))
    assert [where(queue, n) for n in "xy"] == ["queued", "queued"]
    assert report.refused == {"x.toml": vms.fault, "y.toml": vms.fault}
    assert vms.starts == 1 and vms.ledger.snapshot().vm == 0


def test_bad_vm_specs_are_refused_in_one_line_naming_the_field(queue: Path, tmp_path: Path) -> None:
    cases = [
        ('name = "v"\n[vm]\ncores = 1\n', "'vm.image': is required"),
        ('name = "v"\n[vm]\nimage = "a/b"\n', "'vm.image': expected REPO/NAME/VERSION"),
        (vm_spec("v", cores=0), "'vm.cores': expected a whole number from 1"),
        (vm_spec("v", memory="lots"), "'vm.memory': expected a positive size"),
        (vm_spec("v", memory="1M"), "'vm.memory': '1M' is less than the 16M"),
        (vm_spec("v", min_seconds=-5), "'vm.min_seconds':"),
        (vm_spec("v", lifetime=5, min_seconds=10), "'vm.lifetime': (5 s) is shorter"),
        (vm_spec("v", user_data=5), "'vm.user_data': expected the text of a script"),
        (vm_spec("v", cpus=2), "'vm.cpus': is not a known field"),
        (vm_spec("v") + 'command = ["x"]\n', "[vm]"),  # a key after [vm] is the table's
        ('name = "v"\ncommand = ["x"]\n[vm]\nimage = "r.org/n/1"\n', "'command': is not a known"),
        ('name = "../v"\n[vm]\nimage = "r.org/n/1"\n', "'name': must be 1-64 characters"),
        ('name = "v"\nvm = 5\n', "'vm': must be a table"),
    ]
    import tomllib

    for text, message in cases:
        with pytest.raises(JobSpecError) as info:
            parse_vm_spec(tomllib.loads(text))
        assert message in str(info.value) or message == "[vm]", (text, str(info.value))
        assert "\n" not in str(info.value)
    ok = parse_vm_spec(tomllib.loads(vm_spec("v", memory="256M", user_data="#!/bin/sh\n")))
    assert (ok.cores, ok.memory, ok.min_seconds, ok.user_data) == (
        1,
        256 << 20,
        10.0,
        b"#!/bin/sh\n",
    )

    # A hand-dropped bad spec goes to rejected/ with the reason, like elastic ones.
    vms = FakeVms(CoreLedger())
    drop(queue, "bad", vm_spec("bad", cores="two"))
    report = pilot(queue, vms, lease_of(2), RunningVms(queue))
    assert where(queue, "bad") == "rejected" and "vm.cores" in report.rejected["bad.toml"]
    assert vms.starts == 0


def test_a_vm_spec_left_in_running_by_a_dead_owner_is_queued_again(tmp_path: Path) -> None:
    q = tmp_path / "queue"
    (q / "running").mkdir(parents=True)
    (q / "running" / "j.toml").write_text(vm_spec("j"))
    (q / "running" / "j.vm").write_text("20261201-110000-abcdef\n")
    (q / "running" / "j.started").write_text("1.0\n")
    with QueueLock(q) as lock:
        assert lock.held
    assert (q / "j.toml").exists() and not any((q / "running").iterdir())


@pytest.fixture
def vm_service(tmp_path: Path) -> Iterator[tuple[JobService, FakeVms]]:
    ledger = CoreLedger()
    vms = FakeVms(ledger)
    s = JobService(
        tmp_path / "queue", tmp_path / "work", lease_of(3), confinement=Confinement(user=None),
        recheck=5.0, cores=ledger, vms=vms,
    )  # fmt: skip
    try:
        yield s, vms
    finally:
        s.close()


def test_cores_are_never_overcommitted_across_many_vm_and_elastic_specs(
    vm_service: tuple[JobService, FakeVms],
) -> None:
    service, vms = vm_service
    rng = random.Random(11)
    ids = []
    for i in range(24):
        if i % 6 == 5:
            ids.append(service.submit(spec_text(f"e{i}", max_events=4)))
        else:
            ids.append(service.submit(vm_spec(f"v{i}", cores=rng.choice([1, 1, 2, 3]))))
    service.start()
    over: list[str] = []
    ender_done = threading.Event()

    def ender() -> None:  # VMs end at random while the service starts more
        while not ender_done.is_set():
            use = vms.ledger.snapshot()
            if use.node + use.site + use.vm > 3:
                over.append(repr(use))
            with vms.lock:
                live = sorted(vms.running)
            if live:
                vms.end(rng.choice(live))
            time.sleep(0.01)

    t = threading.Thread(target=ender)
    t.start()
    try:
        eventually(
            "every job done",
            lambda: all(j["state"] == "done" for j in service.jobs()) or None,
            60,
        )
    finally:
        ender_done.set()
        t.join()
    assert over == [] and vms.ledger.snapshot().peak <= 3
    assert vms.most_at_once >= 2  # several VMs at once, as Vac fills a machine
    kinds = {j["name"]: j["kind"] for j in service.jobs()}
    assert kinds["e5"] == "elastic" and kinds["v0"] == "vm"
    assert service.job(ids[0])["report"]["outcome"]["code"] == 200
    assert service.job(ids[5])["report"]["complete"] is True


def test_the_service_shows_vm_jobs_and_its_stop_stops_their_vms_within_the_grace(
    vm_service: tuple[JobService, FakeVms],
) -> None:
    service, vms = vm_service
    a = service.submit(vm_spec("a", cores=2))
    b = service.submit(vm_spec("b", cores=2))
    service.start()
    # running/ first, its VM id once the VM runs (None meanwhile)
    eventually("a's VM running", lambda: service.job(a).get("vm"), 10)
    job = service.job(a)
    assert (job["kind"], job["vm"], job["name"]) == ("vm", f"vm-{a}", "a")
    eventually("b refused", lambda: service.job(b).get("refused"), 10)
    assert "waits for 2 free cores (1 free" in service.job(b)["refused"]
    assert service.status()["vms_running"] == 1
    service.stop(grace=7.0)
    assert vms.stop_calls == [([f"vm-{a}"], 7.0)]
    done = service.job(a)
    assert done["state"] == "done" and done["report"]["outcome"]["code"] == 100
    assert service.job(b)["state"] == "queued" and vms.ledger.snapshot().vm == 0


def test_a_node_without_vms_refuses_a_vm_spec_at_submission_in_one_line(tmp_path: Path) -> None:
    s = JobService(tmp_path / "q", tmp_path / "w", lease_of(2), confinement=Confinement(user=None))
    try:
        with pytest.raises(JobSpecError, match=r"'vm': this node starts no VMs"):
            s.submit(vm_spec("v"))
        # dropped by hand, it waits for a pilot that starts VMs
        (s.queue / "x.toml").write_text(vm_spec("x"))
        report = run_pilot(s.queue, s.workroot, s.lease_at, time.monotonic, owner=s._owner)
        assert "this pilot starts no VMs" in report.refused["x.toml"]
        assert (s.queue / "x.toml").exists()
    finally:
        s.close()
