"""The node's core ledger (runner/cores.py): pure, threads and a fake clock only."""

from __future__ import annotations

import random
import threading

from runner.cores import CoreLedger


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_site_ranges_take_one_core_each_up_to_the_lease_and_the_limit() -> None:
    ledger = CoreLedger()
    assert ledger.claim_site(2)
    assert ledger.claim_site(2)
    assert not ledger.claim_site(2)  # the lease's two cores are held
    ledger.release_site()
    assert not ledger.claim_site(4, limit=1)  # max_ranges
    assert ledger.claim_site(4, limit=2)
    use = ledger.snapshot()
    assert (use.capacity, use.site, use.node, use.peak) == (4, 2, 0, 2)


def test_a_node_job_takes_every_free_core_and_site_ranges_get_the_rest_later() -> None:
    ledger = CoreLedger()
    assert ledger.claim_site(4)
    assert ledger.claim_node(4, timeout=0) == 3
    assert not ledger.claim_site(4)
    ledger.release_site()
    assert ledger.claim_site(4)  # the core freed after the node job started
    ledger.release_node(3)
    assert ledger.snapshot().node == 0


def test_a_waiting_node_job_pauses_site_pulls_and_gets_the_first_core_released() -> None:
    ledger = CoreLedger()
    assert ledger.claim_site(2) and ledger.claim_site(2)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(ledger.claim_node(2, timeout=30)))
    waiter.start()
    try:
        while not ledger.snapshot().node_waiting:
            threading.Event().wait(0.01)
        ledger.release_site()
        # The freed core is the node job's: a site claim racing it must not take it.
        taken_by_site = ledger.claim_site(2)
        waiter.join(10)
        assert got == [1]
        assert not taken_by_site
        use = ledger.snapshot()
        assert (use.node, use.site) == (1, 1)
    finally:
        ledger.release_site()
        waiter.join(10)


def test_a_node_job_that_finds_no_core_in_time_or_is_stopped_holds_nothing() -> None:
    clock = FakeClock()
    ledger = CoreLedger(clock)
    assert ledger.claim_site(1)
    clock.now = 100.0  # the deadline has passed at the first look
    assert ledger.claim_node(1, timeout=-1) == 0
    assert ledger.claim_node(1, timeout=60, stop=lambda: True) == 0
    use = ledger.snapshot()
    assert (use.node, use.node_waiting, use.site) == (0, 0, 1)


def test_many_threads_never_hold_more_cores_than_the_lease() -> None:
    ledger = CoreLedger()
    capacity = 3
    over: list[int] = []
    lock = threading.Lock()
    held = [0]

    def hold(n: int) -> None:
        with lock:
            held[0] += n
            if held[0] > capacity:
                over.append(held[0])

    def drop(n: int) -> None:
        with lock:
            held[0] -= n

    def site(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(300):
            if ledger.claim_site(capacity):
                hold(1)
                threading.Event().wait(rnd.random() / 2000)
                drop(1)
                ledger.release_site()

    def node(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(40):
            n = ledger.claim_node(capacity, timeout=5)
            assert n >= 1
            hold(n)
            threading.Event().wait(rnd.random() / 1000)
            drop(n)
            ledger.release_node(n)

    threads = [threading.Thread(target=site, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=node, args=(10 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not over
    assert ledger.snapshot().peak <= capacity
    use = ledger.snapshot()
    assert (use.node, use.site, use.node_waiting) == (0, 0, 0)
