"""The markdown report of ``python -m bench.lease_trace`` (``LEASE_TRACE.md``).

:func:`markdown` renders the JSON record ``bench.lease_trace.main`` writes to
``lease_trace.json``: the figures of both modes against the goals, the dispatch
microbenchmark, one row per lease.  It reads the record only, so an old record
renders again the same way.
"""

from __future__ import annotations

from typing import Any


def markdown(record: dict[str, Any]) -> str:
    m, p = record["meta"], record["params"]
    e, b = record["elastic"], record["baseline"]
    d, dp = record["dispatch"], record["dispatch_polling"]
    goals = record["goals"]

    def ok(flag: bool) -> str:
        return "PASS" if flag else "**FAIL**"

    mach = m["machine"]
    lines = [
        "# swarm-grid benchmark: elastic jobs and masonry over a lease trace",
        "",
        f"- date: {m['date']}",
        f"- machine: {mach['nproc']} cores ({mach['cpu']}), kernel {mach['kernel']},"
        f" Python {mach['python']}; load average at start {m['loadavg_start']}",
        f"- command: `{m['command']}` ({m['runtime_seconds']:.0f} s)",
        f"- trace: {p['leases']} leases from {p['min_hours'] * 60:.0f} min to"
        f" {p['max_hours']:g} h ({sum(r['hours'] for r in record['leases']):.0f} lease-hours),"
        f" {p['cores']} cores each; 1 lease-hour = {p['hour']} s wall;"
        f" an event = 1 core-minute = {p['event_seconds'] * 1e3:.2f} ms CPU"
        f" ({record['burn_turns']} loop turns of burn.sh), {p['events_per_task']} events per task",
        f"- tasks run as {m['job_user']}; memory: {m['memory_limit']}",
        f"- baseline: fixed jobs of {p['baseline_hours']:g} h of the whole node"
        f" ({round(p['baseline_hours'] * 60 * p['cores'])} events), back to back",
        "",
        "| measure | elastic + masonry | fixed-length baseline | goal | result |",
        "| ------- | ----------------- | --------------------- | ---- | ------ |",
        f"| utilisation: committed-task CPU / (cores x lease) | {e['utilisation']:.2%}"
        f" | {b['utilisation']:.2%} | >= 97 % | {ok(goals['utilisation'])} |",
        f"| machine capacity: CPU time {p['cores']} busy loops get / ({p['cores']} x wall),"
        f" probed before each lease (min-max)"
        f" | {e['capacity']:.1%} ({e['capacity_min']:.0%}-{e['capacity_max']:.0%})"
        f" | {b['capacity']:.1%} ({b['capacity_min']:.0%}-{b['capacity_max']:.0%}) | info | |",
        f"| utilisation of that capacity: committed-task CPU / (capacity x cores x lease)"
        f" | {e['utilisation_of_capacity']:.2%} | {b['utilisation_of_capacity']:.2%}"
        f" | >= 97 % | {ok(goals['utilisation_of_capacity'])} |",
        f"| jobs killed by the lease | {e['jobs_killed_by_lease']} of {e['jobs']}"
        f" | {b['jobs_killed_by_lease']} of {b['jobs']} | 0 | {ok(goals['no_job_killed'])} |",
        f"| scatter overhead per task: gather CPU from a task's exit to the next"
        f" dispatch, command start excluded | {e['dispatch_cpu_ms_per_task']:.3f} ms"
        f" | {b['dispatch_cpu_ms_per_task']:.3f} ms | < 1 ms | {ok(goals['overhead'])} |",
        f"| same, wall time (also counts the gather being preempted)"
        f" | {e['dispatch_ms_per_task']:.3f} ms | {b['dispatch_ms_per_task']:.3f} ms"
        " | info | |",
        f"| command start in the gather per task (Popen: vfork, exec of the launcher)"
        f" | {e['spawn_ms_per_task']:.3f} ms | {b['spawn_ms_per_task']:.3f} ms | info | |",
        f"| commit per task (fsyncs, after the dispatch: off the critical path)"
        f" | {e['commit_ms_per_task']:.3f} ms | {b['commit_ms_per_task']:.3f} ms | info | |",
        f"| gather thread CPU per task (all of the above)"
        f" | {e['gather_cpu_ms_per_task']:.3f} ms | {b['gather_cpu_ms_per_task']:.3f} ms"
        " | info | |",
        f"| events committed | {e['events']:,} | {b['events']:,} | info | |",
        f"| CPU wasted (killed jobs, failed or cut runs) | {e['wasted_cpu_seconds']:.1f} s"
        f" | {b['wasted_cpu_seconds']:.1f} s | info | |",
        f"| jobs: complete / stopped themselves at the lease end / total | {e['jobs_complete']}"
        f" / {e['jobs_stopped_at_lease_end']} / {e['jobs']} | {b['jobs_complete']} /"
        f" {b['jobs_stopped_at_lease_end']} / {b['jobs']} | info | |",
        f"| CPU of other processes during the leases (machine busy - ours)"
        f" | {e['others_cpu_seconds_in_leases']:.1f} s of {e['lease_core_seconds']:.0f}"
        f" | {b['others_cpu_seconds_in_leases']:.1f} s of {b['lease_core_seconds']:.0f}"
        " | info | |",
        "",
        f"Dispatch microbenchmark ({d['tasks']} instant tasks per loop, `sh -c 'echo > out'`,"
        f" {p['cores']} workers, same confinement; 4 alternating runs per loop):",
        "",
        "| loop | scatter overhead per task (wall / CPU) | command start per task"
        " | commit per task | gather CPU per task | wall per task | tasks/s |",
        "| ---- | ------------------------------------- | ----------------------"
        " | --------------- | ------------------- | ------------- | ------- |",
    ]
    for name, r in (("event driven (pidfd + eventfd)", d), ("polling every 5 ms", dp)):
        lines.append(
            f"| {name} | {r['dispatch_ms_per_task']:.3f} / {r['dispatch_cpu_ms_per_task']:.3f} ms"
            f" | {r['spawn_ms_per_task']:.3f} ms"
            f" | {r['commit_ms_per_task']:.3f} ms | {r['gather_cpu_ms_per_task']:.3f} ms"
            f" | {r['wall_ms_per_task']:.3f} ms | {r['tasks_per_second']:.0f} |"
        )
    lines += [
        "",
        "Per lease (utilisation = committed-task CPU / cores x lease):",
        "",
        "| # | lease | wall | elastic jobs | elastic events | elastic util."
        " | pilot stopped because | baseline jobs done / killed | baseline util. |",
        "| - | ----- | ---- | ------------ | -------------- | ------------- |"
        " --------------------- | --------------------------- | -------------- |",
    ]
    for i, r in enumerate(record["leases"], 1):
        el, bl = r["elastic"], r["baseline"]
        h = r["hours"]
        length = f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"
        lines.append(
            f"| {i} | {length} | {el['wall']:.2f} s | {el['jobs']} | {el['events']:,}"
            f" | {el['utilisation']:.1%} | {el['pilot_stopped']} |"
            f" {bl['jobs_complete']} / {bl['jobs_killed']} | {bl['utilisation']:.1%} |"
        )
    if m.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in m["notes"]]
    return "\n".join(lines) + "\n"
