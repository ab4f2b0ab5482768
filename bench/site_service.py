"""The site event service end to end (issue 10's benchmark): four nodes, one node
killed, one lease ending early; the same work as a site job and as node jobs.

``python -m bench.site_service [--seconds S] [--seed N]`` (``make bench
BENCH_ARGS="--only site"`` runs it with :mod:`bench.site_gather`) builds a
:class:`swarm_testing.site.SiteNet` (a broker and four node daemons in network
namespaces) twice, one mode after the other, on the same synthetic work:

* **site**: one site job of every event (ranges of ``--range-seconds`` of
  wall time on a node) gathered by ``swarm site-job gather``;
* **node jobs**: each node given its quarter of the events as a node job
  (``POST /v1/jobs`` on its API), nodes working independently.

In both, node ``KILLED`` gets SIGKILL at a random moment (the same one in
both modes, from ``--seed``) and stays dead, and node ``EARLY``'s lease ends
early (``shutdowntime`` in its ``[runner]`` table).

**Fair CPU.** The machine has 2 shared cores and four nodes: each node
daemon (and so every task it starts) is put in a cgroup v1 ``cpu`` group of
its own with a CFS quota of ``--quota`` (0.4) CPU, and is told ``cores = 1``
and ``power_per_core = quota``. A node is then *granted* ``quota`` CPU
seconds per wall second whatever the other nodes do (4 x 0.4 = 1.6 of the 2
cores; the broker and the gather run outside the quotas).
Utilisation = committed event CPU / granted CPU, where committed event CPU =
events in the gathered output, each once, x the CPU of one event (burn.sh
calibrated before the run, unloaded), and granted CPU = sum over nodes of
quota x the wall time the node was available (from the job's submission to
the node's death, its lease end or the end of the work, whichever comes
first).

**Work lost to a death** (or to the early lease end), in seconds of range
time: the bench watches every node's range directories
(``DATA_DIR/site/<ID>/<task>.<seq>/``, made when a range starts, removed
when it was reported) and the gather's journal every ``POLL`` s. Each range
the dead node held at its kill lost ``kill - start`` of range time (the run
thrown away; goal: at most one range + the AckWait). Its *delay* is
``start of the run that was committed (on another node) - start on the dead
node``: the thrown-away run, the AckWait until the broker redelivers it, and
the wait for a free core (reported, not a goal). Idle cores that waited for
such a range at the end of the job show in the utilisation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.lease_trace_modes import BURN, calibrate
from bench.report import machine
from bench.site_service_report import markdown
from bench.util import ROOT, BenchError, say
from swarm_testing.site import SiteNet

WORK = ROOT / "bench" / "work" / "site_service"
RESULTS = ROOT / "bench" / "results"
CGROUP = Path("/sys/fs/cgroup/cpu/swarm-bench-site")
CPUACCT = Path("/sys/fs/cgroup/cpuacct/swarm-bench-site")  # v1: its own hierarchy here
NODES = 4
KILLED = 1  # node index SIGKILLed at a random moment
EARLY = 3  # node index whose lease ends early
POLL = 0.05  # seconds between looks at the range directories and the journal
UTILISATION_GOAL = 0.95
WAIT_SLACK = 300.0  # seconds past the expected duration before a mode is given up


class CpuQuota:
    """One cgroup v1 ``cpu`` group per node with a CFS quota, and a ``cpuacct``
    group to count what the node got; removed on exit."""

    def __init__(self, quota: float, nodes: int) -> None:
        self.quota = quota
        self.groups = [CGROUP / f"node{i}" for i in range(nodes)]
        self.acct = [CPUACCT / f"node{i}" for i in range(nodes)]

    def __enter__(self) -> CpuQuota:
        if not CGROUP.parent.is_dir():
            raise BenchError(f"no cgroup v1 cpu hierarchy at {CGROUP.parent}")
        for g in self.groups:
            g.mkdir(parents=True, exist_ok=True)
            (g / "cpu.cfs_period_us").write_text("100000\n")
            (g / "cpu.cfs_quota_us").write_text(f"{round(self.quota * 100000)}\n")
        for g in self.acct:
            g.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, i: int, pid: int) -> None:
        """Move process ``pid`` (a node daemon; its later children follow) into group ``i``."""
        (self.groups[i] / "cgroup.procs").write_text(f"{pid}\n")
        (self.acct[i] / "cgroup.procs").write_text(f"{pid}\n")

    def used(self) -> list[float]:
        """CPU seconds each node (daemon and tasks) has used so far."""
        return [int((g / "cpuacct.usage").read_text()) / 1e9 for g in self.acct]

    def __exit__(self, *exc: object) -> None:
        for g in [*self.groups, CGROUP, *self.acct, CPUACCT]:
            with contextlib.suppress(OSError):
                g.rmdir()  # empty once every node process is gone


class Watch(threading.Thread):
    """Range starts per node (their directories) and commits (the gather's journal)."""

    def __init__(self, site: SiteNet, job: str, journal: Path) -> None:
        super().__init__(daemon=True)
        self.site, self.job, self.journal = site, job, journal
        self.starts: dict[tuple[int, str], float] = {}  # (node, "task.seq") -> first seen
        self.gone: dict[tuple[int, str], float] = {}  # (node, "task.seq") -> last seen
        self.commits: dict[int, tuple[float, str]] = {}  # task -> (seen, node name)
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        offset = 0
        while not self.done.is_set():
            now = time.time()
            with self.lock:
                for node in self.site.nodes:
                    d = node.data_dir / "site" / self.job
                    names = set(os.listdir(d)) if d.is_dir() else set()
                    for name in names:
                        self.starts.setdefault((node.index, name), now)
                    for (i, name), _ in list(self.starts.items()):
                        if i == node.index and name not in names:
                            self.gone.setdefault((i, name), now)
                with contextlib.suppress(OSError), open(self.journal, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                    end = data.rfind(b"\n") + 1
                    offset += end
                    for line in data[:end].splitlines():
                        rec = json.loads(line)
                        if "task" in rec:
                            self.commits.setdefault(rec["task"], (now, str(rec.get("node"))))
            time.sleep(POLL)

    def held(self, i: int) -> dict[int, float]:
        """Ranges node ``i`` had started and not finished: task -> start."""
        with self.lock:
            return {
                int(name.split(".")[0]): t
                for (n, name), t in self.starts.items()
                if n == i and (n, name) not in self.gone
            }

    def start_of(self, task: int, node_name: str) -> float | None:
        """Start of the last run of ``task`` on the node named ``node_name``."""
        idx = [n.index for n in self.site.nodes if n.name == node_name]
        seen = [
            t
            for (n, name), t in self.starts.items()
            if n in idx and int(name.split(".")[0]) == task
        ]
        return max(seen) if seen else None

    def range_walls(self) -> list[float]:
        return [self.gone[k] - t for k, t in self.starts.items() if k in self.gone]

    def busy(self, i: int, until: float) -> float:
        """Seconds node ``i`` had a range running (its cores: one)."""
        with self.lock:
            return sum(self.gone.get(k, until) - t for k, t in self.starts.items() if k[0] == i)


def _events(path: Path, first: int, count: int) -> dict[str, int]:
    """Events lost (planned, absent) and duplicated (extra copies) in ``path``."""
    seen: collections.Counter[int] = collections.Counter()
    if path.exists():
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "event":
                    seen[int(parts[1])] += 1
    planned = range(first, first + count)
    return {
        "events_in_output": sum(seen.values()),
        "lost": sum(1 for e in planned if seen[e] == 0),
        "duplicated": sum(c - 1 for c in seen.values() if c > 1),
        "outside_plan": sum(c for e, c in seen.items() if e not in planned),
    }


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.quota: float = a.quota
        self.range_cpu = a.range_seconds * a.quota  # CPU s of one range
        self.event_cpu = self.range_cpu / a.events_per_task
        self.events = round(a.seconds * NODES * a.quota / self.event_cpu)
        self.events -= self.events % (NODES * a.events_per_task)  # equal whole-range shares
        self.expected = self.events * self.event_cpu / (NODES * a.quota)
        self.kill_at = self.rng.uniform(0.25, 0.6) * self.expected
        self.early_after = 0.4 * self.expected
        self.burn = WORK / "burn.sh"

    def prepare(self) -> None:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        WORK.chmod(0o755)  # the job user runs burn.sh
        self.burn.write_text(BURN)
        self.burn.chmod(0o755)
        self.turns_per_second = calibrate(self.burn)
        self.turns = max(1, round(self.turns_per_second * self.event_cpu))
        say(
            f"site service: {self.events} events of {self.event_cpu:.3f} CPU s"
            f" ({self.turns} turns), {self.a.events_per_task} per range"
            f" (~{self.a.range_seconds:g} s at {self.quota:g} CPU), ~{self.expected:.0f} s"
            f" on {NODES} nodes; kill node {KILLED} at +{self.kill_at:.1f} s, node {EARLY}'s"
            f" lease ends at +{self.early_after:.1f} s"
        )

    def spec(self, name: str, first: int, events: int) -> str:
        cmd = ["/bin/sh", str(self.burn), "{first}", "{count}", "{output}", str(self.turns)]
        return (
            f'name = "{name}"\n'
            f"command = {json.dumps(cmd)}\n"
            f"cpu_work_per_event = {self.event_cpu!r}\n"
            f"first_event = {first}\n"
            f"max_events = {events}\n"
            f"min_events = 1\n"
            f"events_per_task = {self.a.events_per_task}\n"
        )

    @contextlib.contextmanager
    def site(self, tag: str, work: bool) -> Iterator[tuple[SiteNet, CpuQuota, float, float]]:
        """A started site, each node in its CPU group; yields (site, groups, t0, lease end)."""
        runner = {"cores": 1, "power_per_core": self.quota, "grace": 2}
        site = SiteNet(
            WORK / tag,
            NODES,
            runner=runner,
            site={"work": work},
            start_nodes=False,
            prefix="sb",
            subnet="10.233.0.0/24",
        )
        with CpuQuota(self.quota, NODES) as groups, site:
            for i in range(NODES):
                if i == EARLY:
                    # the lease ends early_after s after the submission (~10 s from here)
                    lease_end = time.time() + 10 + self.early_after
                    site.nodes[i].runner["shutdowntime"] = round(lease_end)
                site.start_node(i)
                proc = site.nodes[i].proc
                assert proc is not None
                groups.add(i, proc.pid)
            t0 = time.time()
            yield site, groups, t0, round(lease_end)

    def run_site(self) -> dict[str, Any]:
        spec = WORK / "site.toml"
        spec.write_text(self.spec("burn", 0, self.events))
        with self.site("site", True) as (site, groups, t0, lease_end):
            ack_wait = self.a.ack_wait
            job = site.submit(spec, "--ack-wait", str(ack_wait))
            t0 = time.time()
            used0 = groups.used()
            out = WORK / "site" / "out"
            gather = site.start_gather(job, out)
            watch = Watch(site, job, out / "journal.jsonl")
            watch.start()
            try:
                time.sleep(max(0.0, t0 + self.kill_at - time.time()))
                held = watch.held(KILLED)
                site.kill_node(KILLED)
                killed = time.time()
                say(f"site: killed node {KILLED} at +{killed - t0:.1f} s holding {sorted(held)}")
                code, report = site.wait_gather(gather, self.expected * 3 + WAIT_SLACK)
                end = time.time()
                used = [b - a for a, b in zip(used0, groups.used(), strict=True)]
                time.sleep(2 * POLL)
            finally:
                watch.done.set()
                watch.join(5)
            status = site.status(job)
        walls = watch.range_walls()
        range_wall = statistics.median(walls) if walls else float("nan")
        death = []
        for task, start in sorted(held.items()):
            commit = watch.commits.get(task)
            redo = watch.start_of(task, commit[1]) if commit else None
            death.append(
                {
                    "task": task,
                    "started": round(start - t0, 2),
                    "thrown_away_seconds": round(killed - start, 2),
                    "wait_seconds": None if redo is None else round(redo - killed, 2),
                    "redone_on": commit[1] if commit else None,
                    "redo_started": None if redo is None else round(redo - t0, 2),
                    "delay_seconds": None if redo is None else round(redo - start, 2),
                }
            )
        early_name = site.nodes[EARLY].name
        early_lost = []
        for (n, name), start in watch.starts.items():
            task = int(name.split(".")[0])
            commit = watch.commits.get(task)
            if n == EARLY and commit and commit[1] != early_name:
                redo = watch.start_of(task, commit[1])
                gone = watch.gone.get((n, name), lease_end)
                early_lost.append(
                    {
                        "task": task,
                        "thrown_away_seconds": round(gone - start, 2),
                        "delay_seconds": None if redo is None else round(redo - start, 2),
                    }
                )
        avail = self._available(t0, killed, lease_end, end)
        events = _events(out / "events.out", 0, self.events)
        return {
            "job": job,
            "gather_exit": code,
            "gather_report": report,
            "status_ranges": status.get("ranges"),
            "nodes_committed": status.get("nodes"),
            "retries": status.get("retries"),
            "duplicates_seen_by_gather": status.get("duplicates"),
            "events": events,
            "wall_seconds": round(end - t0, 2),
            "ack_wait": ack_wait,
            "range_wall_median": round(range_wall, 2),
            "kill_at": round(killed - t0, 2),
            "lease_end_at": round(lease_end - t0, 2),
            "death": death,
            "death_lost_seconds": round(sum(d["thrown_away_seconds"] for d in death), 2),
            "busy_seconds": [
                round(watch.busy(i, killed if i == KILLED else end), 2) for i in range(NODES)
            ],
            "node_cpu_used": [round(x, 2) for x in used],
            "death_goal_seconds": round(range_wall + ack_wait, 2),
            "early_lease_lost": early_lost,
            "available_seconds": avail,
            **self._utilisation(events, avail),
        }

    def _available(self, t0: float, killed: float, lease_end: float, end: float) -> list[float]:
        out = []
        for i in range(NODES):
            stop = end
            if i == KILLED:
                stop = min(stop, killed)
            if i == EARLY:
                stop = min(stop, lease_end)
            out.append(round(max(0.0, stop - t0), 2))
        return out

    def _utilisation(self, events: dict[str, int], avail: list[float]) -> dict[str, Any]:
        committed = (events["events_in_output"] - events["duplicated"]) * self.event_cpu
        granted = self.quota * sum(avail)
        return {
            "committed_event_cpu": round(committed, 2),
            "granted_cpu": round(granted, 2),
            "utilisation": round(committed / granted, 4) if granted else None,
        }

    def run_nodes(self) -> dict[str, Any]:
        share = self.events // NODES
        with self.site("nodes", False) as (site, groups, t0, lease_end):
            ids: dict[int, str] = {}
            for node in site.nodes:
                spec = WORK / f"node{node.index}.toml"
                spec.write_text(self.spec(f"burn{node.index}", node.index * share, share))
                token = (node.data_dir / "api.token").read_text().strip()
                r = node.host.run(
                    ["curl", "-sS", "-H", f"Authorization: Bearer {token}",
                     "--data-binary", f"@{spec}", f"http://{node.host.addr}:7000/v1/jobs"],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                if r.returncode != 0:
                    raise BenchError(f"node {node.index}: job submit failed: {r.stderr.strip()}")
                ids[node.index] = json.loads(r.stdout)["id"]
            t0 = time.time()
            used0 = groups.used()
            time.sleep(max(0.0, t0 + self.kill_at - time.time()))
            site.kill_node(KILLED)
            killed = time.time()
            say(f"node jobs: killed node {KILLED} at +{killed - t0:.1f} s")
            deadline = time.time() + self.expected * 3 + WAIT_SLACK
            reports: dict[int, dict[str, Any]] = {}
            while len(reports) < NODES - 1:
                if time.time() > deadline:
                    raise BenchError(f"node jobs not done in time: {sorted(reports)} finished")
                for node in site.nodes:
                    if node.index == KILLED or node.index in reports:
                        continue
                    # the run's report (a job the lease cut stays queued for a later lease)
                    rep = node.data_dir / "jobs" / "work" / ids[node.index] / "report.json"
                    # runner/node_run.py writes report.json in place: read until whole
                    with contextlib.suppress(OSError, ValueError):
                        reports[node.index] = json.loads(rep.read_text())
                        reports[node.index]["done_at"] = round(time.time() - t0, 2)
                time.sleep(0.2)
            end = time.time()
            used = [b - a for a, b in zip(used0, groups.used(), strict=True)]
            dead_journal = (
                site.nodes[KILLED].data_dir / "jobs" / "work" / ids[KILLED] / "journal.jsonl"
            )
            dead_tasks = (
                max(0, len(dead_journal.read_text().splitlines()) - 1)
                if dead_journal.exists()
                else 0
            )
        per_node = []
        total = {"events_in_output": 0, "lost": 0, "duplicated": 0, "outside_plan": 0}
        for i in range(NODES):
            rep = reports.get(i)
            ev = (
                _events(Path(rep["output"]), i * share, share)
                if rep
                else _events(Path("/nonexistent"), i * share, share)
            )
            for k in total:
                total[k] += ev[k]
            per_node.append(
                {
                    "node": i,
                    "events_planned": share,
                    "events": ev,
                    "stopped": rep.get("stopped") if rep else "killed",
                    "complete": rep.get("complete") if rep else False,
                    "done_at": rep.get("done_at") if rep else None,
                    "busy_seconds": rep.get("wall_seconds") if rep else None,
                    "cpu_seconds_committed": rep.get("cpu_seconds_committed") if rep else None,
                }
            )
        avail = self._available(t0, killed, lease_end, end)
        return {
            "per_node": per_node,
            "events": total,
            "dead_node_tasks_in_journal": dead_tasks,
            "wall_seconds": round(end - t0, 2),
            "kill_at": round(killed - t0, 2),
            "lease_end_at": round(lease_end - t0, 2),
            "available_seconds": avail,
            "node_cpu_used": [round(x, 2) for x in used],
            **self._utilisation(total, avail),
        }


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Both modes, one after the other; the record (see the module docstring).

    Raises:
        BenchError: no cgroup v1 cpu hierarchy, a submission failed, a mode did
            not finish in time.
    """
    if os.geteuid() != 0:
        raise BenchError("the site service bench needs root (namespaces, cgroups)")
    b = Bench(a)
    t = time.time()
    load = os.getloadavg()
    b.prepare()
    site = b.run_site()
    say(f"site: utilisation {site['utilisation']}, events {site['events']}")
    nodes = b.run_nodes()
    say(f"node jobs: utilisation {nodes['utilisation']}, events {nodes['events']}")
    return {
        "params": {
            "nodes": NODES,
            "quota_cpu_per_node": b.quota,
            "events": b.events,
            "events_per_task": a.events_per_task,
            "event_cpu_seconds": round(b.event_cpu, 4),
            "range_seconds_nominal": a.range_seconds,
            "burn_turns_per_event": b.turns,
            "expected_seconds": round(b.expected, 1),
            "seed": a.seed,
            "killed_node": KILLED,
            "early_lease_node": EARLY,
            "ack_wait": a.ack_wait,
        },
        "site": site,
        "node_jobs": nodes,
        "goals": {
            "events_lost": 0,
            "events_duplicated": 0,
            "death_lost_seconds": "<= range + AckWait",
            "utilisation": UTILISATION_GOAL,
        },
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": machine(),
            "loadavg_start": load,
            "runtime_seconds": round(time.time() - t, 1),
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.site_service", description=__doc__)
    p.add_argument("--seconds", type=float, default=90.0, help="nominal job length (90)")
    p.add_argument("--range-seconds", type=float, default=4.0, help="wall s of a range (4)")
    p.add_argument("--events-per-task", type=int, default=10)
    p.add_argument("--quota", type=float, default=0.4, help="CPU granted per node (0.4)")
    p.add_argument("--ack-wait", type=float, default=5.0, help="the job's AckWait (5 s)")
    p.add_argument("--seed", type=int, default=10)
    return p.parse_args(argv)


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    a = parse_args(argv)
    try:
        record = run(a)
    except BenchError as exc:
        print(f"bench.site_service: {exc}", file=sys.stderr)
        return 2
    record["meta"]["command"] = command or "python -m bench.site_service " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "site_service.json").write_text(json.dumps(record, indent=2) + "\n")
    gather_file = RESULTS / "site_gather.json"
    gather = json.loads(gather_file.read_text()) if gather_file.exists() else None
    md = markdown(record, gather)
    (RESULTS / "SITE_SERVICE.md").write_text(md)
    sys.stdout.write(md)
    return 0  # missed goals are reported, not an error (as every section of bench.run)


if __name__ == "__main__":
    sys.exit(main())
