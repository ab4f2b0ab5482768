"""Site operations (issue 13's benchmark): an idle node's cost, ``/metrics`` under
load, and a Slurm pilot's use of its slot.

``python -m bench.ops_bench [--quick] [--only idle scrape slurm]`` (``make bench
BENCH_ARGS="--only ops"`` runs it too) writes ``results/ops.json`` and
``results/OPS.md``. Three measures, each on its own and each reported even when
another failed:

* **idle**: one ``swarm node`` following two repositories (each published
  with a torrent, from a ``swarm serve`` origin on loopback) with its FUSE
  mount.  Once both revisions are shown and a file of each has been read
  through the mount, the daemon settles for ``--settle`` s, then its RSS (the
  daemon and any child, from ``/proc``) is sampled every second and its CPU
  (``utime + stime`` of the daemon and its children) taken over a window of
  ``--window`` s.  Goals: RSS < 150 MB, CPU < 1 % of a core.
* **scrape**: the distribution bench's set-up (:mod:`bench.swarm_distribution`:
  a source node and ``--nodes`` client daemons, each in its own network
  namespace on 50 Mbit/s links), while one ``--size-mib`` image is being
  distributed a client's ``GET /metrics`` is timed with curl from inside its
  namespace (``time_total``) back to back.  Only scrapes whose own answer shows
  the image transfer under way (its ``swarm_transfer_progress_ratio`` below 1)
  count.  Goal: median < 50 ms (p95 and max reported).
* **slurm**: a single-host Slurm (:mod:`swarm_testing.slurm`), one whole-node
  job (``sbatch --exclusive --time=M``) running ``swarm pilot`` on a queue of
  elastic jobs whose events take a fixed wall time (``sleep``): the figure is
  how well the pilot fills the slot in time, independent of what CPU the
  shared machine gives.  Utilisation = committed events x event seconds /
  (cores x the slot's limit); the slot's limit runs from Slurm's StartTime.
  Goals: >= 95 %, the job ``COMPLETED`` (not killed at its limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import machine
from bench.util import ROOT, BenchError, free_port, fuse_unmount, rm_tree, say
from swarm.config import render_config

WORK = ROOT / "bench" / "work" / "ops"
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SWARM = str(Path(PY).with_name("swarm"))

RSS_GOAL = 150e6  # bytes
CPU_GOAL = 0.01  # share of one core
SCRAPE_GOAL = 0.050  # seconds, median
UTILISATION_GOAL = 0.95


# -- the process tree's cost, from /proc --------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def rss_bytes(pid: int) -> int:
    """Resident set of ``pid`` and its live descendants (VmRSS summed)."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its live descendants and the
    children they have reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


# -- idle -----------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 5.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait(
    what: str, check: Callable[[], object], timeout: float, proc: subprocess.Popen[Any]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        if proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def _publish_repo(work: Path, store: Path, repo: str) -> Path:
    """A small tree published with a torrent; the repository's root.json."""
    from trust.keys import init_keys

    keys = work / f"keys-{repo}"
    root_json = init_keys(keys, repo)
    tree = work / f"tree-{repo}"
    for d in range(4):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(50):
            (tree / f"d{d}" / f"f{i}.txt").write_bytes(os.urandom(2000 + 97 * i))
    (tree / "hello").write_text(f"hello from {repo}\n")
    argv = [PY, "-m", "swarm", "publish", str(tree), "--repo", repo, "--keys", str(keys)]
    subprocess.run([*argv, "--store", str(store), "--quiet"], check=True, timeout=300)
    return root_json


@contextlib.contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def measure_idle(settle: float, window: float) -> dict[str, Any]:
    """One node, two repositories, one mount; see the module docstring."""
    work = WORK / "idle"
    rm_tree(work)
    work.mkdir(parents=True)
    store = work / "store"
    repos = ["one.example.org", "two.example.org"]
    roots = {r: _publish_repo(work, store, r) for r in repos}
    oport = free_port()
    mount = work / "mnt"
    data = work / "data"
    cfg = work / "node.toml"
    settings = {
        "data_dir": data,
        "listen": f"127.0.0.1:{free_port()}",
        "peer": f"127.0.0.1:{free_port()}",
        "api": "127.0.0.1:0",
        "mount": mount,
    }
    origin = f"http://127.0.0.1:{oport}/"
    cfg.write_text(
        render_config(settings, {r: {"trust": roots[r], "origin": origin} for r in repos})
    )
    serve = [PY, "-m", "swarm", "serve", str(store), "--listen", f"127.0.0.1:{oport}"]
    try:
        with (
            _process(serve, work / "origin.log") as origin_proc,
            _process([PY, "-m", "swarm", "node", "--config", str(cfg)], work / "node.log") as node,
        ):
            _wait("the origin", lambda: _get_json(origin), 60, origin_proc)
            _wait("node.json", (data / "node.json").exists, 120, node)
            base = json.loads((data / "node.json").read_text())["api"].rstrip("/")

            def ready() -> bool:
                st = _get_json(f"{base}/v1/status")
                return bool(st["mounted"]) and all(
                    st["repositories"][r]["revision"] is not None for r in repos
                )

            _wait("both repositories mounted", ready, 120, node)
            for r in repos:
                text = (mount / r / "hello").read_text()
                if r not in text:
                    raise BenchError(f"read {text!r} from {mount / r / 'hello'}")
            say(f"idle: node up (pid {node.pid}); settling {settle:g} s, then {window:g} s window")
            time.sleep(settle)
            rss: list[int] = []
            cpu0, t0 = cpu_seconds(node.pid), time.monotonic()
            while time.monotonic() - t0 < window:
                rss.append(rss_bytes(node.pid))
                time.sleep(1.0)
            cpu = (cpu_seconds(node.pid) - cpu0) / (time.monotonic() - t0)
            if node.poll() is not None:
                raise BenchError(f"the node exited with {node.returncode} during the window")
            pids = len(tree_pids(node.pid))
    finally:
        fuse_unmount(mount)
    return {
        "repositories": len(repos),
        "mount": True,
        "settle_seconds": settle,
        "window_seconds": window,
        "processes": pids,
        "rss_bytes_median": statistics.median(rss),
        "rss_bytes_max": max(rss),
        "cpu_share_of_core": cpu,
        "passed": max(rss) < RSS_GOAL and cpu < CPU_GOAL,
    }


# -- /metrics under a distribution ------------------------------------------------------


def _image_progress(text: str) -> float | None:
    """The lowest image transfer progress in a /metrics answer (None: no image yet)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("swarm_transfer_progress_ratio{") and 'what="image' in line
    ]
    return min(values) if values else None


class Scraper(threading.Thread):
    """Times ``GET /metrics`` of one namespaced node with curl, back to back."""

    def __init__(self, host: Any) -> None:
        super().__init__(daemon=True)
        self.host = host
        self.during: list[float] = []  # seconds, scrapes with the image under way
        self.other: list[float] = []
        self.failed = 0
        self.done = threading.Event()

    def run(self) -> None:
        argv = ["curl", "-s", "-m", "10", "-w", "\n%{http_code} %{time_total}"]
        argv.append("http://127.0.0.1:7000/metrics")
        while not self.done.is_set():
            r = self.host.run(argv, capture_output=True, text=True)
            body, _, tail = r.stdout.rpartition("\n")
            code, _, took = tail.partition(" ")
            if r.returncode != 0 or code != "200":
                self.failed += r.returncode == 0  # refused before the daemon is up: not counted
                time.sleep(0.2)
                continue
            progress = _image_progress(body)
            (self.during if progress is not None and progress < 1.0 else self.other).append(
                float(took)
            )
            time.sleep(0.05)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure_scrape(nodes: int, size_mib: int, rate_mbit: float) -> dict[str, Any]:
    """/metrics of a client during a distribution; see the module docstring."""
    from bench.distribution_trial import make_source_file
    from bench.swarm_distribution import run_swarm
    from swarm_testing.netns import Network, cleanup_stale

    cleanup_stale("so")
    work = WORK / "scrape"
    rm_tree(work)
    work.mkdir(parents=True)
    file, _ = make_source_file(work, size_mib << 20)
    with Network(nodes + 1, rate_mbit=rate_mbit, prefix="so") as net:
        scraper = Scraper(net.hosts[1])
        scraper.start()
        try:
            got = run_swarm(net, net.hosts[0], net.hosts[1:], file)
        finally:
            scraper.done.set()
            scraper.join(20)
    xs = scraper.during
    if not xs:
        raise BenchError("no scrape saw the image under way")
    return {
        "nodes": nodes + 1,
        "size_mib": size_mib,
        "rate_mbit": rate_mbit,
        "distribution_seconds": got["seconds"],
        "scrapes_during": len(xs),
        "scrapes_other": len(scraper.other),
        "scrapes_failed": scraper.failed,
        "median_seconds": statistics.median(xs),
        "p95_seconds": _quantile(xs, 0.95),
        "max_seconds": max(xs),
        "other_median_seconds": statistics.median(scraper.other) if scraper.other else None,
        "passed": statistics.median(xs) < SCRAPE_GOAL,
    }


# -- the Slurm pilot --------------------------------------------------------------------

EVENTS = """\
#!/bin/sh
# events.sh FIRST COUNT OUTPUT SECONDS: COUNT events of SECONDS of wall time each
n=$1
end=$(($1 + $2))
exec > "$3"
while [ "$n" -lt "$end" ]; do
    sleep "$4"
    echo "event $n"
    n=$((n + 1))
done
"""


def measure_slurm(minutes: int, event_seconds: float) -> dict[str, Any]:
    """``swarm pilot`` in a whole-node Slurm job; see the module docstring."""
    from swarm_testing.slurm import missing, single_host_slurm, slurm_epoch

    why = missing()
    if why:
        raise BenchError(why)
    work = Path(tempfile.mkdtemp(prefix="swarm-ops-slurm-"))
    work.chmod(0o755)
    try:
        events = work / "events.sh"
        events.write_text(EVENTS)
        events.chmod(0o755)
        queue = work / "queue"
        queue.mkdir()
        power = 10.0
        command = json.dumps([str(events), "{first}", "{count}", "{output}", str(event_seconds)])
        for name in ("a", "b", "c", "d"):  # more work than the slot holds
            (queue / f"{name}.toml").write_text(
                f'name = "ev"\ncommand = {command}\ncpu_work_per_event = {event_seconds * power}\n'
                "max_events = 1000000\nmin_events = 2\nevents_per_task = 4\nsafety = 0.95\n"
            )
        script = work / "pilot.sbatch"
        script.write_text(
            f"#!/bin/sh\n{SWARM} pilot {queue} --power {power:g} --job-user root --no-cgroup"
            f" > {work}/pilot.json\necho $? > {work}/exit\n"
        )
        with single_host_slurm() as slurm:
            env = {**slurm.env, "SWARM_RUNNER_STATE": str(work / "state")}
            job = slurm.sbatch(
                script, "--exclusive", f"--time={minutes}", f"--output={work}/slurm.out", env=env
            )
            say(f"slurm: job {job}, a {minutes}-minute whole-node slot")
            deadline = time.monotonic() + minutes * 60 + 120
            state = ""
            while time.monotonic() < deadline:
                state = slurm.job(job).get("JobState", "")
                if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                    break
                time.sleep(1.0)
            info = slurm.job(job)
        start, end = slurm_epoch(info["StartTime"]), slurm_epoch(info["EndTime"])
        if not (work / "pilot.json").exists() or not (work / "pilot.json").read_text():
            raise BenchError(f"no pilot report; job {state}: {(work / 'slurm.out').read_text()}")
        report = json.loads((work / "pilot.json").read_text())
        cores = os.cpu_count() or 1
        slot = minutes * 60.0
        done = report["events_done"]
        util = done * event_seconds / (cores * slot)
        jobs = [
            {k: j.get(k) for k in ("spec", "events_planned", "events_done", "complete", "stopped")}
            | {"started": j["started_at"] - start, "ended": j["ended_at"] - start}
            for j in report["jobs_run"]
        ]
        last_end = max((j["ended"] for j in jobs), default=0.0)
        return {
            "slot_minutes": minutes,
            "cores": cores,
            "event_seconds": event_seconds,
            "job_state": info["JobState"],
            "exit": (work / "exit").read_text().strip() if (work / "exit").exists() else None,
            "events_done": done,
            "utilisation": util,
            "job_ran_seconds": end - start,
            "first_job_started": jobs[0]["started"] if jobs else None,
            "last_job_ended": last_end,
            "unused_end_seconds": slot - last_end,
            "pilot_stopped": report["stopped"],
            "jobs": jobs,
            "passed": util >= UTILISATION_GOAL and info["JobState"] == "COMPLETED",
        }
    finally:
        rm_tree(work)


# -- the report -------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 1e6:.0f} MB"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def markdown(rec: dict[str, Any]) -> str:
    m = rec["meta"]
    mach = m["machine"]
    lines = [
        "# swarm-grid benchmark: site operations (issue 13)",
        "",
        f"- date: {m['date']}; command: `{m['command']}`",
        f"- machine: {mach['nproc']} cores ({mach['cpu']}), shared with other sessions;"
        f" load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}",
        "",
        "| measure | result | goal | |",
        "| --- | --- | --- | --- |",
    ]
    ok = {True: "PASS", False: "**FAIL**"}
    idle = rec.get("idle")
    if idle:
        lines += [
            f"| idle node RSS (2 repositories, 1 mount; {idle['processes']} process(es)),"
            f" max / median over {idle['window_seconds']:g} s | {_mb(idle['rss_bytes_max'])} /"
            f" {_mb(idle['rss_bytes_median'])} | < 150 MB |"
            f" {ok[idle['rss_bytes_max'] < RSS_GOAL]} |",
            f"| idle node CPU, after {idle['settle_seconds']:g} s settling |"
            f" {100 * idle['cpu_share_of_core']:.2f} % of a core | < 1 % |"
            f" {ok[idle['cpu_share_of_core'] < CPU_GOAL]} |",
        ]
    sc = rec.get("scrape")
    if sc:
        lines.append(
            f"| `GET /metrics` of a client while {sc['size_mib']} MiB reach {sc['nodes'] - 1}"
            f" clients ({sc['nodes']} daemons, {sc['rate_mbit']:g} Mbit/s links):"
            f" median / p95 / max of {sc['scrapes_during']} | {_ms(sc['median_seconds'])} /"
            f" {_ms(sc['p95_seconds'])} / {_ms(sc['max_seconds'])} | median < 50 ms |"
            f" {ok[sc['median_seconds'] < SCRAPE_GOAL]} |"
        )
    sl = rec.get("slurm")
    if sl:
        lines += [
            f"| Slurm slot use: {sl['events_done']} events x {sl['event_seconds']:g} s /"
            f" ({sl['cores']} cores x {sl['slot_minutes']} min) | {100 * sl['utilisation']:.1f} % |"
            f" >= 95 % | {ok[sl['utilisation'] >= UTILISATION_GOAL]} |",
            f"| Slurm job state at its end | {sl['job_state']} (pilot exit {sl['exit']}) |"
            f" COMPLETED, 0 killed | {ok[sl['job_state'] == 'COMPLETED']} |",
        ]
    for name, err in rec.get("errors", {}).items():
        lines.append(f"| {name} | failed: {err} | | **FAIL** |")
    lines += [
        "",
        "Each measure's run (a measure not run by the last command keeps its result):",
        "",
    ]
    lines += [
        f"- {name}: {rec[name]['date']}, `{rec[name]['command']}`"
        + (
            f", load average at its start {rec[name]['loadavg_start'][0]:.1f}"
            if "loadavg_start" in rec[name]
            else ""
        )
        for name in ("idle", "scrape", "slurm")
        if name in rec and "date" in rec[name]
    ]
    if sl:
        lines += ["", "Slurm pilot's jobs (seconds from the slot's start):", ""]
        lines += ["| spec | events planned | done | complete | started | ended | stopped |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
        for j in sl["jobs"]:
            lines.append(
                f"| {j['spec']} | {j['events_planned']} | {j['events_done']} | {j['complete']} |"
                f" {j['started']:.1f} | {j['ended']:.1f} | {j['stopped'] or ''} |"
            )
        lines += [
            "",
            f"The pilot started its first job at +{sl['first_job_started']:.1f} s and ended its"
            f" last at +{sl['last_job_ended']:.1f} s; {sl['unused_end_seconds']:.1f} s of the"
            f" slot were left unused at its end; the pilot stopped: {sl['pilot_stopped']}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, command: str = "") -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ops_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter windows, 32 MiB, 2-minute slot")
    p.add_argument("--only", nargs="*", choices=["idle", "scrape", "slurm"])
    p.add_argument("--settle", type=float, help="seconds the idle node settles (30)")
    p.add_argument("--window", type=float, help="seconds of the idle window (60)")
    p.add_argument("--nodes", type=int, default=15, help="clients besides the source (15)")
    p.add_argument("--size-mib", type=int, help="image distributed while scraping (128)")
    p.add_argument("--slot-minutes", type=int, help="Slurm time limit (3)")
    p.add_argument("--event-seconds", type=float, default=0.5)
    a = p.parse_args(argv)
    settle = a.settle if a.settle is not None else (10.0 if a.quick else 30.0)
    window = a.window if a.window is not None else (20.0 if a.quick else 60.0)
    size = a.size_mib if a.size_mib is not None else (32 if a.quick else 128)
    minutes = a.slot_minutes if a.slot_minutes is not None else (2 if a.quick else 3)
    rec: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": command or "python -m bench.ops_bench " + shlex.join(argv or sys.argv[1:]),
            "machine": machine(),
            "loadavg_start": list(os.getloadavg()),
        },
        "errors": {},
    }
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("idle", lambda: measure_idle(settle, window)),
        ("scrape", lambda: measure_scrape(a.nodes, size, 50.0)),
        ("slurm", lambda: measure_slurm(minutes, a.event_seconds)),
    ]
    earlier: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        earlier = json.loads((RESULTS / "ops.json").read_text())
    for name, fn in sections:
        if a.only and name not in a.only:
            if name in earlier:  # a measure not run now keeps its last result, dated
                rec[name] = earlier[name]
            continue
        try:
            load = list(os.getloadavg())
            rec[name] = fn() | {
                "date": rec["meta"]["date"],
                "command": rec["meta"]["command"],
                "loadavg_start": load,
            }
            say(f"ops {name}: {json.dumps({k: v for k, v in rec[name].items() if k != 'jobs'})}")
        except Exception as exc:  # recorded; the other measures still run
            say(traceback.format_exc().rstrip())
            rec["errors"][name] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ops.json").write_text(json.dumps(rec, indent=1) + "\n")
    md = markdown(rec)
    (RESULTS / "OPS.md").write_text(md)
    sys.stdout.write(md)
    return 1 if rec["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
