"""Site jobs end to end: a nats-server and three node daemons in network
namespaces (swarm_testing/site.py), a real job submitted and gathered with the
``swarm site-job`` commands, and the crashes the design must survive.

Every range runs ``site_events.py`` (one line per event, 0.1 s per event,
ranges of 5 or 10 events) as the job user, and logs its start and end; the
gathered ``events.out`` is compared byte for byte with every planned event in
order, and the journal must hold each range once. Waits are for events (a
node's status, the gather's journal, the gather's exit), each with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sitejob.protocol import (
    RangeMsg,
    ResultMsg,
    encode,
    encode_inline,
    range_subject,
    result_subject,
)
from swarm_testing.site import PY, GatherHandle, SiteNet
from swarm_testing.waiting import eventually

pytestmark = [pytest.mark.netns, pytest.mark.nats, pytest.mark.timeout(150)]

EVENTS_PY = Path(__file__).resolve().parent / "site_events.py"
FIRST = 1000  # the spec's first_event: offsets must come out right
PER_EVENT = 0.1  # seconds the command takes per event
ACK_WAIT = 3.0  # the jobs' AckWait (seconds): heartbeats every second
GATHER_TIMEOUT = 90.0  # a job of a few seconds of work, on a loaded machine
SLACK = 10.0  # on top of AckWait for a redelivery on a loaded machine (2 shared cores)
RUNNER = {"cores": 1, "time_left": 3600, "power_per_core": 10.0, "grace": 1}


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory the job user (``nobody`` on a root node) can reach, with
    ``runs/`` where the command logs its runs."""
    d = Path(tempfile.mkdtemp(prefix="swarm-site-e2e-"))
    try:
        d.chmod(0o755)
        (d / "runs").mkdir(mode=0o777)
        (d / "runs").chmod(0o777)  # the mode without the umask: nobody writes there
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def job_spec(place: Path, name: str, per_range: int = 5) -> Path:
    command = [PY, str(EVENTS_PY), "{first}", "{count}", "{output}", str(runs_log(place))]
    command.append(str(PER_EVENT))
    spec = place / f"{name}.toml"
    spec.write_text(
        f'name = "{name}"\ncommand = {json.dumps(command)}\n'
        f"cpu_work_per_event = 1.0\nfirst_event = {FIRST}\n"
        f"max_events = 1000000\nevents_per_task = {per_range}\n"
    )
    return spec


def runs_log(place: Path) -> Path:
    return place / "runs" / "runs.log"


def submit(site: SiteNet, spec: Path, events: int) -> str:
    return site.submit(spec, "--events", str(events), "--ack-wait", f"{ACK_WAIT:g}", on=0)


@dataclass
class Run:
    """One run of the command: on node ``node``, events from ``first``."""

    first: int
    node: int
    start: float
    end: float | None


def read_runs(place: Path) -> list[Run]:
    runs: dict[str, Run] = {}
    log = runs_log(place)
    for line in log.read_text().splitlines() if log.exists() else []:
        what, first, t, output = line.split(" ", 3)
        if what == "start":
            node = re.search(r"/node(\d+)/data/", output)
            assert node is not None, line
            runs[output] = Run(int(first), int(node.group(1)), float(t), None)
        else:
            runs[output].end = float(t)
    return list(runs.values())


def task_of(run: Run, per_range: int) -> int:
    return (run.first - FIRST) // per_range


def committed(out: Path) -> int:
    """Ranges in the gather's journal (the header is the first line)."""
    journal = out / "journal.jsonl"
    if not journal.exists():
        return 0
    return max(0, len(journal.read_text().splitlines()) - 1)


def gathered(site: SiteNet, g: GatherHandle) -> dict[str, Any]:
    """Wait for the gather; its report, which must say the job is complete."""
    code, report = site.wait_gather(g, GATHER_TIMEOUT)
    assert code == 0 and report is not None and report["complete"], (
        code,
        report,
        g.stderr.read_text()[-3000:],
    )
    return report


def assert_exactly_once(out: Path, events: int, per_range: int) -> dict[int, str]:
    """``events.out`` holds every planned event once, in event order; the
    journal commits each range once. The node that committed each range."""
    want = "".join(f"event {n}\n" for n in range(FIRST, FIRST + events))
    assert (out / "events.out").read_text() == want
    lines = (out / "journal.jsonl").read_text().splitlines()[1:]
    by_task = {}
    for line in lines:
        doc = json.loads(line)
        assert doc["task"] not in by_task, f"range {doc['task']} committed twice"
        by_task[doc["task"]] = doc["node"]
    assert sorted(by_task) == list(range(-(-events // per_range)))
    return by_task


def site_of(site: SiteNet, i: int) -> dict[str, Any]:
    section: dict[str, Any] = site.node_status(i)["site"]
    return section


def workers_ready(site: SiteNet) -> None:
    """Wait until every node's worker is connected and waiting for a job (a
    daemon is ready before its worker has connected): a job submitted then
    finds every node pulling."""

    def waiting() -> bool:
        return all(
            site_of(site, i)["not_pulling"] == "no site job to pull from"
            for i in range(len(site.nodes))
        )

    eventually("every node's worker to wait for a job", waiting, 60, 0.1)


def test_a_jobs_events_are_spread_over_all_nodes(place: Path) -> None:
    events = 90  # 18 ranges of 5 events, about 0.6 s each
    spec = job_spec(place, "spread")
    with SiteNet(place / "site", nodes=3, runner=RUNNER) as site:
        workers_ready(site)
        job = submit(site, spec, events)
        report = gathered(site, site.start_gather(job, place / "out"))
        st = site.status(job, on=2)
    by_task = assert_exactly_once(place / "out", events, 5)
    nodes = Counter(by_task.values())
    assert sorted(nodes) == ["wn0", "wn1", "wn2"], nodes  # every node took part
    assert st["complete"] and st["events_committed"] == events
    assert st["ranges"]["finished"] == 18 and st["ranges"]["abandoned"] == 0
    assert st["nodes"] == dict(nodes) == report["nodes"]


def test_a_node_killed_mid_range_has_its_range_redone_elsewhere_and_loses_one_range(
    place: Path,
) -> None:
    events, per_range = 120, 10  # 12 ranges of about 1 s
    spec = job_spec(place, "killed", per_range)

    def runs_a_range() -> dict[str, Any] | None:
        """A range node 1 runs whose command has started (it logged its start)
        and has not ended: about a second of it is left when the kill lands."""
        held: dict[str, Any]
        for held in site_of(site, 1)["running"]:
            mine = [r for r in read_runs(place) if r.node == 1]
            if any(task_of(r, per_range) == held["task"] and r.end is None for r in mine):
                return held
        return None

    with SiteNet(place / "site", nodes=3, runner=RUNNER) as site:
        workers_ready(site)
        job = submit(site, spec, events)
        g = site.start_gather(job, place / "out")
        held = eventually("node 1 to run a range", runs_a_range, 30, interval=0.02)
        killed_at = time.monotonic()
        site.kill_node(1)
        report = gathered(site, g)
    by_task = assert_exactly_once(place / "out", events, per_range)
    assert by_task[held["task"]] != "wn1"  # redone elsewhere
    runs = read_runs(place)
    lost = [r for r in runs if r.node == 1 and by_task[task_of(r, per_range)] != "wn1"]
    assert [task_of(r, per_range) for r in lost] == [held["task"]]  # the work lost: that range
    assert lost[0].end is None  # its command died with the node (PR_SET_PDEATHSIG)
    redone = [r for r in runs if task_of(r, per_range) == held["task"] and r.node != 1]
    assert len(redone) == 1 and redone[0].end is not None
    # ... redelivered once its AckWait passed without a heartbeat.
    assert killed_at < redone[0].start <= killed_at + ACK_WAIT + SLACK
    assert report["ranges"]["abandoned"] == 0 and report["retries"] == 0


def test_a_gather_killed_mid_job_and_restarted_commits_every_event_once(place: Path) -> None:
    events = 90  # 18 ranges
    spec = job_spec(place, "regather")
    out = place / "out"
    with SiteNet(place / "site", nodes=3, runner=RUNNER) as site:
        workers_ready(site)
        job = submit(site, spec, events)
        first = site.start_gather(job, out)
        eventually("the gather to commit a few ranges", lambda: committed(out) >= 3, 60, 0.02)
        site.kill_gather(first)
        assert first.proc.returncode == -9
        at_kill = committed(out)
        assert at_kill < 18  # mid-job
        report = gathered(site, site.restart_gather(first))
        st = site.status(job)
    assert_exactly_once(out, events, 5)
    assert report["events_committed"] == events and st["complete"]
    assert st["events_committed"] == events and st["ranges"]["finished"] == 18


def test_a_broker_killed_mid_job_and_restarted_loses_nothing_and_the_job_completes(
    place: Path,
) -> None:
    events = 90
    spec = job_spec(place, "broker")
    out = place / "out"
    with SiteNet(place / "site", nodes=3, runner=RUNNER) as site:
        workers_ready(site)
        job = submit(site, spec, events)
        g = site.start_gather(job, out)

        def mid_job() -> bool:
            return committed(out) >= 2 and bool(site_of(site, 0)["running"])

        eventually("a few ranges committed and node 0 running one", mid_job, 60, 0.05)
        site.kill_broker()
        eventually(
            "every node to see the broker gone",
            lambda: not any(site_of(site, i)["connected"] for i in range(3)),
            30,
        )
        assert committed(out) < 18  # mid-job
        site.start_broker()
        report = gathered(site, g)
        st = site.status(job)
    assert_exactly_once(out, events, 5)
    assert report["events_committed"] == events and report["ranges"]["abandoned"] == 0
    assert st["complete"] and st["events_committed"] == events


def test_a_node_whose_lease_ends_stops_pulling_and_loses_nothing(place: Path) -> None:
    """Node 2's lease comes from MJF (``$MACHINEFEATURES/shutdowntime``, read
    every time the worker reads its lease); it is moved to now while the node
    runs a range, as a site draining the machine does. (A ``time_left`` in
    ``[runner]`` counts from each reading: it never ends.)"""
    events, per_range = 180, 10  # 18 ranges of about 1 s: the job outlasts node 2's lease
    spec = job_spec(place, "lease", per_range)
    mjf = place / "mjf"
    mjf.mkdir()
    (mjf / "shutdowntime").write_text(f"{int(time.time()) + 3600}\n")
    per_node = [{}, {}, {"env": {"MACHINEFEATURES": str(mjf)}}]
    with SiteNet(place / "site", nodes=3, runner=RUNNER, per_node=per_node) as site:
        workers_ready(site)
        job = submit(site, spec, events)
        g = site.start_gather(job, place / "out")
        eventually("node 2 to run a range", lambda: site_of(site, 2)["running"], 30, 0.05)
        tmp = mjf / "shutdowntime.tmp"
        tmp.write_text(f"{int(time.time())}\n")
        tmp.replace(mjf / "shutdowntime")  # the lease ends now

        def stopped() -> dict[str, Any] | None:
            s = site_of(site, 2)
            lease_over = "no range fits the lease" in (s["not_pulling"] or "")
            return s if lease_over and not s["running"] else None

        ended = eventually("node 2 to stop pulling", stopped, 30, 0.1)
        ended_at = time.monotonic()
        report = gathered(site, g)
        after = site_of(site, 2)
        assert site.nodes[2].proc is not None and site.nodes[2].proc.poll() is None
    by_task = assert_exactly_once(place / "out", events, per_range)
    assert report["ranges"]["abandoned"] == 0
    assert after["ranges_run"] == ended["ranges_run"] >= 1  # nothing taken once it ended
    assert after["ranges_failed"] == 0
    runs = [r for r in read_runs(place) if r.node == 2]
    # (A range cut before its command started left no run.)
    assert len(runs) <= after["ranges_run"] and all(r.start < ended_at for r in runs)
    # What it held was finished (and committed) or handed back (and run elsewhere).
    handed_back = [r for r in runs if by_task[task_of(r, per_range)] != "wn2"]
    assert len(handed_back) <= after["ranges_handed_back"]


def test_bad_range_and_result_messages_are_refused_counted_and_never_committed(
    place: Path,
) -> None:
    """A token holder publishes into the job a malformed range, a range beyond
    the plan, a malformed result and a forged result (its output does not
    have the SHA-256 it claims) before any node works."""
    events = 60  # 12 ranges
    spec = job_spec(place, "forged")
    with SiteNet(place / "site", nodes=3, runner=RUNNER, start_nodes=False) as site:
        job = submit(site, spec, events)
        site.publish(range_subject(job, 0), b'{"job": "' + job.encode() + b'", "task": ')
        beyond = RangeMsg(job=job, task=12, first=FIRST + events, count=5, generation=0)
        site.publish(range_subject(job, 12), encode(beyond))
        site.publish(result_subject(job), b"\xff not json", on=1)
        forged_output = b"".join(b"event %d\n" % n for n in range(FIRST + 5, FIRST + 10))
        forged = ResultMsg(
            job=job,
            task=1,
            first=FIRST + 5,
            count=5,
            generation=0,
            node="forger",
            ok=True,
            size=len(forged_output),
            sha256=hashlib.sha256(b"something else").hexdigest(),
            inline=encode_inline(forged_output.replace(b"event", b"EVENT")),
        )
        site.publish(result_subject(job), encode(forged), on=1)
        site.start_nodes()

        def refused_by_nodes() -> int:
            return sum(sum(site_of(site, i)["refused"].values()) for i in range(3))

        # The bad ranges are behind the job's in the queue: pulled last.
        eventually("the nodes to refuse both bad ranges", lambda: refused_by_nodes() == 2, 60)
        report = gathered(site, site.start_gather(job, place / "out"))
        st = site.status(job)
        reasons = [k for i in range(3) for k in site_of(site, i)["refused"]]
    by_task = assert_exactly_once(place / "out", events, 5)
    assert "forger" not in by_task.values() and "forger" not in st["nodes"]
    assert st["refused"] == report["refused"] == {"malformed": 1, "sha256 mismatch": 1}
    assert st["complete"] and st["events_committed"] == events
    assert st["retries"] == 1  # the forged result cost range 1 a re-run, nothing more
    assert len(reasons) == 2, reasons
    assert any(r.startswith("malformed range message") for r in reasons), reasons
    assert any("task 12 is beyond the job's 12 ranges" in r for r in reasons), reasons
