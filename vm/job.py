"""VM jobs: a queued spec with a ``[vm]`` table, started by the pilot through the VmService.

The spec (the one owner of its format; ``docs/RUNNER.md``)::

    name = "lhcb-vm"
    [vm]
    image = "vm.example.org/guest/1"   # REPO/NAME/VERSION, as `swarm vm start` takes it
    cores = 1                          # default 1
    memory = "512M"                    # a size (runner/sizes.py); default: the [vm] table's
    min_seconds = 600                  # lease time left it needs to be worth starting
    lifetime = 86400                   # optional cap (also capped by the lease)
    user_data = '''#!/bin/sh ...'''    # optional: the script the guest runs

:class:`NodeVmLauncher` is the masonry thread's way into the asyncio
:class:`vm.manager.VmService` (:class:`runner.vm_jobs.VmLauncher`): every
call crosses to the service's loop with ``run_coroutine_threadsafe`` and a
deadline, so the pilot never waits on a VM without bound, and the service's
own rules decide (the site policy, the back-off after aborts, the cores
claimed in the ledger, all or none). The service's refusals map to what
becomes of the spec (:class:`runner.vm_jobs.StartAnswer`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runner.exceptions import JobSpecError
from runner.spec import job_name
from runner.vm_jobs import VM_TABLE, StartAnswer, VmEnded, VmJob, VmStart
from swarm.status import to_json
from vm.config import (
    MAX_LIFETIME,
    ImageName,
    VmRequest,
    _cores,
    _memory,
    _seconds,
    _user_data,
    parse_image_name,
)
from vm.exceptions import (
    BackedOff,
    ImageRefused,
    NoFreeCores,
    UnknownVm,
    VmConfigError,
    VmError,
    VmRefused,
)

if TYPE_CHECKING:
    from vm.manager import VmService

log = logging.getLogger("vm.job")

DEFAULT_MIN_SECONDS = 60.0
SPEC_KEYS = ("name", VM_TABLE)
VM_KEYS = ("image", "cores", "memory", "min_seconds", "lifetime", "user_data")
STOP_SLACK = 30.0  # s beyond the grace for stopped VMs to be gone


@dataclass(frozen=True)
class VmJobSpec:
    """A checked VM spec (satisfies :class:`runner.vm_jobs.VmJob`)."""

    name: str
    image: ImageName
    cores: int = 1
    memory: int | None = None  # None: the node's [vm] memory
    min_seconds: float = DEFAULT_MIN_SECONDS
    lifetime: float | None = None
    user_data: bytes | None = None


def parse_vm_spec(data: Mapping[str, Any]) -> VmJobSpec:
    """A decoded spec with a ``[vm]`` table, every field checked.

    Raises:
        JobSpecError: a missing, unknown or bad field (named ``vm.KEY``).
    """
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise JobSpecError(unknown[0][:64], "is not a known field of a VM job (name, [vm])")
    name = job_name(data)
    table = data[VM_TABLE]
    if not isinstance(table, dict):
        raise JobSpecError(VM_TABLE, "must be a table")
    unknown = sorted(set(table) - set(VM_KEYS))
    if unknown:
        raise JobSpecError(f"vm.{unknown[0][:64]}", f"is not a known field ({', '.join(VM_KEYS)})")
    if "image" not in table:
        raise JobSpecError("vm.image", "is required (REPO/NAME/VERSION)")

    def check(key: str, parse: Callable[[str, Any], Any], default: Any = None) -> Any:
        if key not in table:
            return default
        try:
            return parse(key, table[key])
        except VmConfigError as exc:
            raise JobSpecError(f"vm.{key}", str(exc).partition(": ")[2] or str(exc)) from None

    def seconds(key: str, value: Any) -> float:
        return _seconds(key, value, minimum=1.0, maximum=MAX_LIFETIME)

    image: ImageName = check("image", lambda _k, v: parse_image_name(v))
    cores: int = check("cores", _cores, 1)
    memory: int | None = check("memory", _memory)
    min_seconds: float = check("min_seconds", seconds, DEFAULT_MIN_SECONDS)
    lifetime: float | None = check("lifetime", seconds)
    if lifetime is not None and lifetime < min_seconds:
        raise JobSpecError(
            "vm.lifetime", f"({lifetime:g} s) is shorter than min_seconds ({min_seconds:g} s)"
        )
    user_data: bytes | None = check("user_data", lambda _k, v: _user_data(v))
    return VmJobSpec(name, image, cores, memory, min_seconds, lifetime, user_data)


def outcome_of(report: Any) -> dict[str, Any]:
    """A VM's report as a job's outcome (JSON)."""
    doc: dict[str, Any] = to_json(report)
    return doc


class NodeVmLauncher:
    """:class:`runner.vm_jobs.VmLauncher` over a :class:`vm.manager.VmService`
    (see the module docstring). Call it from any thread but the service's loop."""

    def __init__(self, service: VmService, *, start_deadline: float | None = None) -> None:
        self.service = service
        s = service.settings
        # qemu-img and QMP each have start_timeout; a KVM trial adds probe_seconds.
        self.start_deadline = start_deadline or 3 * s.start_timeout + s.probe_seconds + 10.0
        self._tasks: set[asyncio.Task[None]] = set()

    def parse(self, data: Mapping[str, Any]) -> VmJob:
        return parse_vm_spec(data)

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        loop = self.service.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return None
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                return None  # never block the loop on itself
        return loop

    def start(
        self, job: VmJob, *, job_id: str, lifetime: float, capacity: int, on_end: VmEnded
    ) -> VmStart:
        assert isinstance(job, VmJobSpec)
        loop = self._loop()
        if loop is None:
            return VmStart(StartAnswer.WAIT, reason="the node's VM service is not running")
        request = VmRequest(
            image=job.image,
            cores=job.cores,
            memory=job.memory,
            lifetime=lifetime,
            user_data=job.user_data,
            job=job_id,
        )
        future = asyncio.run_coroutine_threadsafe(self._start(request, on_end), loop)
        try:
            return future.result(self.start_deadline)
        except TimeoutError:
            # Cancelled, the service records the VM as failed and frees its cores.
            if not future.cancel() and not future.cancelled():
                return future.result(0)  # it finished meanwhile: keep what it says
            return VmStart(
                StartAnswer.NODE_FAULT,
                reason=f"the VM did not start within {self.start_deadline:g} s",
            )
        except concurrent.futures.CancelledError:
            return VmStart(StartAnswer.WAIT, reason="the node's VM service is shutting down")

    async def _start(self, request: VmRequest, on_end: VmEnded) -> VmStart:
        try:
            report = await self.service.start_vm(request)
        except ImageRefused as exc:
            return VmStart(StartAnswer.REJECTED, reason=str(exc))
        except NoFreeCores as exc:
            return VmStart(StartAnswer.WAIT, reason=str(exc))
        except BackedOff as exc:
            return VmStart(StartAnswer.REFUSED, reason=str(exc))
        except VmRefused as exc:
            return VmStart(StartAnswer.REFUSED, reason=str(exc))
        except VmError as exc:  # qemu or its overlay: the node, not the spec
            return VmStart(StartAnswer.NODE_FAULT, reason=str(exc))
        task = asyncio.create_task(self._follow(report.id, on_end))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return VmStart(StartAnswer.STARTED, vm_id=report.id)

    async def _follow(self, vm_id: str, on_end: VmEnded) -> None:
        try:
            report = await self.service.wait_vm(vm_id)
        except UnknownVm:
            return
        outcome = outcome_of(report)
        try:
            await asyncio.to_thread(on_end, outcome)  # files and moves: off the loop
        except Exception:
            log.exception("VM job of vm %s: filing its outcome failed", vm_id)

    def stop(self, vm_ids: list[str], grace: float, *, wait: bool) -> None:
        loop = self.service.loop
        if loop is None or loop.is_closed() or not vm_ids:
            return
        future = asyncio.run_coroutine_threadsafe(self._stop(vm_ids, grace), loop)
        if wait and self._loop() is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(grace + STOP_SLACK)

    async def _stop(self, vm_ids: list[str], grace: float) -> None:
        async def one(vm_id: str) -> None:
            with contextlib.suppress(UnknownVm):
                await self.service.stop_vm(vm_id, grace)

        await asyncio.gather(*(one(v) for v in vm_ids), return_exceptions=True)
