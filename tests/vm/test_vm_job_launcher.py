"""The masonry thread's way into the node's VmService (vm.job.NodeVmLauncher):
a real VmService on its own event loop thread, called from the test's thread
as the pilot calls it. No VM boots here (each start is refused or its qemu
cannot run); a real boot through the same path is in test_vm_node.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.vm_jobs import StartAnswer
from tests.vm.test_vm_service import IMAGE, lease_for, service
from vm.config import ImageName
from vm.contract import Outcome
from vm.job import NodeVmLauncher, VmJobSpec
from vm.manager import VmService


@contextmanager
def on_a_loop(svc: VmService) -> Iterator[asyncio.AbstractEventLoop]:
    """``svc`` started on an event loop running in a thread of its own (as the
    node daemon runs it beside the masonry thread); stopped and closed after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
        yield loop
    finally:
        asyncio.run_coroutine_threadsafe(svc.stop(grace=0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_launcher_turns_the_services_answers_into_what_becomes_of_the_spec(
    tmp_path: Path,
) -> None:
    svc = service(tmp_path, lease_for(3600, cores=2), qemu_img="/nonexistent/qemu-img")
    launcher = NodeVmLauncher(svc, start_deadline=20)
    ended: list[Any] = []

    def start(image: ImageName = IMAGE, cores: int = 1) -> Any:
        job = VmJobSpec("j", image, cores=cores)
        return launcher.start(job, job_id="j1", lifetime=60, capacity=2, on_end=ended.append)

    # Before the daemon's loop runs the service, nothing starts: the spec waits.
    assert start().answer is StartAnswer.WAIT
    with on_a_loop(svc) as loop:
        refused = start(ImageName(IMAGE.repo, "refused", "1"))
        assert refused.answer is StartAnswer.REJECTED
        assert "refused by the site policy: not signed" in refused.reason

        svc.cores.claim_site(2)
        svc.cores.claim_site(2)  # site ranges hold both cores
        busy = start()
        assert busy.answer is StartAnswer.WAIT and "1 cores asked, 0 free" in busy.reason
        svc.cores.release_site()
        svc.cores.release_site()

        broken = start()  # qemu-img cannot run: the node's fault, not the spec's
        assert broken.answer is StartAnswer.NODE_FAULT and "cannot run" in broken.reason
        assert svc.cores.snapshot().vm == 0 and [v.job for v in svc.list()] == ["j1"]

        async def abort() -> None:  # an aborted VM of this type: Vac's back-off
            svc.backoff.record(str(IMAGE), Outcome(None, "fizzled", aborted=True), time.time())

        asyncio.run_coroutine_threadsafe(abort(), loop).result(5)
        backed = start()
        assert backed.answer is StartAnswer.REFUSED and "backed off" in backed.reason

        launcher.stop(["20261201-000000-000000"], 1.0, wait=True)  # an unknown VM: no error
    assert ended == []  # no VM ran, so no outcome to file
