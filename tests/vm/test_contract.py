"""The Vacuum contract's host-side rules, without qemu (vm/contract.py)."""

from __future__ import annotations

import pytest

from vm.contract import (
    MAX_OUTPUT_BYTES,
    MAX_OUTPUT_FILES,
    BackOff,
    Ending,
    NodeShare,
    OutputLimits,
    State,
    VmShare,
    changed_features,
    heartbeat_stale,
    judge,
    machine_job_features,
    next_state,
    parse_shutdown_message,
    vm_end,
)
from vm.exceptions import GuestDataError

T0 = 1_800_000_000.0


def shares(lifetime: float = 3600, lease_end: float = T0 + 7200) -> tuple[VmShare, NodeShare]:
    vm = VmShare("vm-1", cores=2, memory=128 << 20, started=T0, lifetime=lifetime, grace=30)
    node = NodeShare(
        lease_cores=8, power_per_core=12.5, lease_end=lease_end, phys_cores=4, log_cores=8
    )
    return vm, node


def test_mjf_values_come_from_the_lease_and_the_vms_share() -> None:
    vm, node = shares()
    f = machine_job_features(vm, node)
    assert f["machinefeatures/hs06"] == b"100"  # 12.5 HS06 x 8 cores
    assert f["machinefeatures/total_cpu"] == b"8"
    assert f["machinefeatures/phys_cores"] == b"4"
    assert f["machinefeatures/log_cores"] == b"8"
    assert f["machinefeatures/shutdowntime"] == str(int(T0 + 7200)).encode()
    assert f["jobfeatures/allocated_cpu"] == b"2"
    assert f["jobfeatures/hs06_job"] == b"25"
    assert f["jobfeatures/jobstart_secs"] == str(int(T0)).encode()
    assert f["jobfeatures/wall_limit_secs"] == b"3600"
    assert f["jobfeatures/cpu_limit_secs"] == b"7200"
    assert f["jobfeatures/shutdowntime_job"] == str(int(T0 + 3600)).encode()
    assert f["jobfeatures/max_rss_bytes"] == str(128 << 20).encode()
    assert f["jobfeatures/job_id"] == b"vm-1"


def test_a_vm_never_ends_after_the_lease_and_a_moved_shutdowntime_changes_only_its_keys() -> None:
    vm, node = shares(lifetime=3600, lease_end=T0 + 7200)
    before = machine_job_features(vm, node)
    shorter = NodeShare(8, 12.5, T0 + 600, 4, 8)
    assert vm_end(vm, shorter) == T0 + 600
    after = machine_job_features(vm, shorter)
    assert changed_features(before, after) == {
        "machinefeatures/shutdowntime": str(int(T0 + 600)).encode(),
        "jobfeatures/shutdowntime_job": str(int(T0 + 600)).encode(),
    }


@pytest.mark.parametrize(
    ("data", "code", "text"),
    [
        (b"200 Success\n", 200, "Success"),
        (b"100 Shutdown as requested by the host", 100, "Shutdown as requested by the host"),
        (b"700", 700, ""),
        (b"300 no more work\n", 300, "no more work"),
    ],
)
def test_a_well_formed_shutdown_message_is_parsed(data: bytes, code: int, text: str) -> None:
    msg = parse_shutdown_message(data)
    assert (msg.code, msg.text) == (code, text)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"250 not a vacuum code",
        b"800 nope",
        b"200\tSuccess",
        b"200 two\nlines\n",
        b" 200 Success",
        b"200Success",
        b"200 caf\xc3\xa9",
        b"2000 x",
        b"200 " + b"x" * 2000,
        b"200 Success\n\n",
    ],
)
def test_a_malformed_shutdown_message_is_refused_naming_it(data: bytes) -> None:
    with pytest.raises(GuestDataError, match="shutdown_message"):
        parse_shutdown_message(data)


def test_the_guests_code_is_the_outcome_and_from_300_on_it_is_an_abort() -> None:
    ok = judge(started=T0, stopped=T0 + 5, ending=Ending.GUEST, message=b"200 done",
               fizzle_seconds=600)  # fmt: skip
    assert (ok.code, ok.text, ok.aborted, ok.fizzled) == (200, "done", False, False)
    bad = judge(started=T0, stopped=T0 + 900, ending=Ending.GUEST, message=b"500 no cvmfs",
                fizzle_seconds=600)  # fmt: skip
    assert (bad.code, bad.aborted) == (500, True)


def test_a_vm_that_stops_within_fizzle_seconds_without_a_code_is_an_abort() -> None:
    out = judge(started=T0, stopped=T0 + 10, ending=Ending.GUEST, message=None,
                fizzle_seconds=60)  # fmt: skip
    assert out.code is None and out.aborted and out.fizzled
    assert "fizzle" in out.text and "no shutdown_message" in out.text
    late = judge(started=T0, stopped=T0 + 61, ending=Ending.GUEST, message=None,
                 fizzle_seconds=60)  # fmt: skip
    assert not late.aborted and not late.fizzled


def test_a_vm_the_host_stopped_without_a_code_is_no_abort() -> None:
    out = judge(started=T0, stopped=T0 + 3, ending=Ending.HOST_STOP, message=None,
                fizzle_seconds=60)  # fmt: skip
    assert (out.code, out.aborted, out.fizzled) == (None, False, False)
    assert out.text == "the host stopped it after 3 s with no shutdown_message"


def test_a_malformed_message_is_recorded_as_such_and_judged_as_no_code() -> None:
    out = judge(started=T0, stopped=T0 + 10, ending=Ending.GUEST, message=b"2OO ok",
                fizzle_seconds=60)  # fmt: skip
    assert out.code is None and out.fizzled
    assert out.message_problem is not None and "2OO ok" in out.message_problem
    assert "malformed shutdown_message" in out.text


def test_a_stale_heartbeat_is_700_heartbeat_whatever_the_guest_wrote() -> None:
    out = judge(started=T0, stopped=T0 + 999, ending=Ending.HEARTBEAT, message=b"200 fine",
                fizzle_seconds=60)  # fmt: skip
    assert (out.code, out.text, out.aborted) == (700, "heartbeat", True)


def stale(now: float, hello: float | None, beat: float | None) -> bool:
    return heartbeat_stale(now=T0 + now, started=T0, hello=None if hello is None else T0 + hello,
                           last_heartbeat=None if beat is None else T0 + beat,
                           heartbeat_seconds=10, boot_seconds=100)  # fmt: skip


def test_heartbeat_staleness_counts_from_the_agents_hello_until_the_first_beat() -> None:
    assert not stale(99, hello=None, beat=None)  # still booting
    assert stale(101, hello=None, beat=None)  # no agent within boot_seconds
    assert not stale(59, hello=50, beat=None)
    assert stale(61, hello=50, beat=None)
    assert not stale(69, hello=50, beat=60)
    assert stale(71, hello=50, beat=60)
    off = heartbeat_stale(now=T0 + 1e6, started=T0, hello=T0, last_heartbeat=None,
                          heartbeat_seconds=0, boot_seconds=100)  # fmt: skip
    assert not off


def test_an_abort_backs_off_the_vm_type_and_a_good_end_clears_it() -> None:
    b = BackOff(seconds=100)
    fizzle = judge(started=T0, stopped=T0 + 1, ending=Ending.GUEST, message=None,
                   fizzle_seconds=60)  # fmt: skip
    b.record("r/img/1", fizzle, now=T0 + 1)
    why = b.refusal("r/img/1", now=T0 + 50)
    assert why is not None and "backed off" in why and "1 abort" in why
    assert b.refusal("r/other/1", now=T0 + 50) is None
    assert b.refusal("r/img/1", now=T0 + 101) is None
    b.record("r/img/1", fizzle, now=T0 + 200)
    good = judge(started=T0, stopped=T0 + 1, ending=Ending.GUEST, message=b"200 ok",
                 fizzle_seconds=60)  # fmt: skip
    b.record("r/img/1", good, now=T0 + 201)
    assert b.refusal("r/img/1", now=T0 + 202) is None


def test_outputs_are_bounded_in_name_size_and_count() -> None:
    lim = OutputLimits()
    assert lim.check("vm-heartbeat", 10) is None
    assert "not [A-Za-z0-9._-]" in (lim.check("../etc", 1) or "")
    assert "bytes" in (lim.check("big", MAX_OUTPUT_BYTES + 1) or "")
    for i in range(MAX_OUTPUT_FILES - 1):
        assert lim.check(f"f{i}", 1) is None
    assert "more than" in (lim.check("one-too-many", 1) or "")
    assert lim.check("vm-heartbeat", 20) is None  # a known name may change
    assert len(lim.refused) == 3


def test_states_follow_the_table() -> None:
    assert next_state(State.STARTING, State.RUNNING) is State.RUNNING
    with pytest.raises(ValueError, match="stopped to running"):
        next_state(State.STOPPED, State.RUNNING)
