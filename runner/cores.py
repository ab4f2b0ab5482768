"""The node's cores, shared by node jobs (masonry), site ranges (``sitejob.worker``) and VMs.

A node runs two kinds of work on the same lease: node jobs, sized and run
by the masonry thread on several cores each, and site ranges, one core each,
pulled by the site worker on the event loop. :class:`CoreLedger` is the one
account of who holds which cores.

Invariants:

* node jobs' cores + site ranges' cores + VMs' cores <= the lease's cores
  as given at each claim (a lease that shrank meanwhile gives no new claim until enough
  was released);
* while a node job waits for cores no site range is started: site ranges
  are short, so the node job gets its cores within about one range's time;
* a node job takes every core free when it starts (at least one): the site
  worker keeps pulling into cores freed later, so neither kind of work waits
  for the other to finish everything;
* a VM (``vm.manager``) takes the cores it asks for, all of them free now,
  or none, and never waits: a VM the lease cannot hold is refused.

Thread-safe (one condition variable); no call blocks except
:meth:`CoreLedger.claim_node`, which waits with a deadline and rechecks its
stop probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# How often a waiting node job rechecks its stop probe (and the clock).
RECHECK = 0.5


@dataclass(frozen=True)
class CoreUse:
    """The ledger at one moment (the node's status report)."""

    capacity: int  # the lease's cores at the last claim
    node: int  # cores held by node jobs
    site: int  # site ranges running (one core each)
    node_waiting: int  # node jobs waiting for a core (site pulls pause meanwhile)
    peak: int  # the most cores ever held at once
    vm: int = 0  # cores held by VMs


class CoreLedger:
    """Who holds the node's cores; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._capacity = 0
        self._node = 0
        self._site = 0
        self._waiting = 0
        self._peak = 0
        self._vm = 0

    def _held(self) -> None:
        self._peak = max(self._peak, self._node + self._site + self._vm)

    def snapshot(self) -> CoreUse:
        with self._cond:
            return CoreUse(
                self._capacity, self._node, self._site, self._waiting, self._peak, self._vm
            )

    def _busy(self) -> int:
        return self._node + self._site + self._vm

    # --- site ranges (the event loop; never blocks)
    def claim_site(self, capacity: int, limit: int | None = None) -> bool:
        """Take one core for a site range if one is free of ``capacity`` (the
        lease's cores now), fewer than ``limit`` ranges run, and no node job
        waits. False: nothing was taken."""
        with self._cond:
            self._capacity = capacity
            if self._waiting or self._busy() >= capacity:
                return False
            if limit is not None and self._site >= limit:
                return False
            self._site += 1
            self._held()
            return True

    def release_site(self) -> None:
        with self._cond:
            assert self._site > 0
            self._site -= 1
            self._cond.notify_all()

    def site_may_pull(self, capacity: int, limit: int | None = None) -> bool:
        """Whether :meth:`claim_site` would succeed now (nothing is taken)."""
        with self._cond:
            return (
                not self._waiting
                and self._busy() < capacity
                and (limit is None or self._site < limit)
            )

    # --- node jobs (the masonry thread; may wait)
    def claim_node(
        self, capacity: int, *, timeout: float, stop: Callable[[], bool] | None = None
    ) -> int:
        """Take every core free of ``capacity`` (at least one) for a node job.

        With none free, waits (site pulls pause meanwhile) until site ranges
        release one, at most ``timeout`` seconds, rechecking ``stop`` every
        :data:`RECHECK` seconds. Returns the cores taken, 0 if none came free
        in time or ``stop()`` said so (nothing is held then).
        """
        deadline = self._clock() + timeout
        with self._cond:
            self._capacity = capacity
            self._waiting += 1
            try:
                while True:
                    free = capacity - self._busy()
                    if free > 0:
                        self._node += free
                        self._held()
                        return free
                    if stop is not None and stop():
                        return 0
                    left = deadline - self._clock()
                    if left <= 0:
                        return 0
                    self._cond.wait(min(left, RECHECK))
            finally:
                self._waiting -= 1

    def release_node(self, cores: int) -> None:
        with self._cond:
            assert 0 < cores <= self._node
            self._node -= cores
            self._cond.notify_all()

    # --- VMs (the event loop; never blocks)
    def claim_vm(self, capacity: int, cores: int) -> bool:
        """Take ``cores`` for a VM if that many are free of ``capacity`` and no
        node job waits. False: nothing was taken."""
        with self._cond:
            self._capacity = capacity
            if cores < 1 or self._waiting or self._busy() + cores > capacity:
                return False
            self._vm += cores
            self._held()
            return True

    def release_vm(self, cores: int) -> None:
        with self._cond:
            assert 0 < cores <= self._vm
            self._vm -= cores
            self._cond.notify_all()
