"""The record and the report of ``python -m bench.distribution``.

:func:`make_record` turns the outcomes into the JSON record (per system, its ratio
to the Kumar-Ross bound and what the source sent in copies of the file; swarm's
speed-ups over the others), :func:`markdown` renders it, and :func:`write` stores
both as ``distribution.json`` and ``DISTRIBUTION.md``.  The formats are read by
people comparing runs: keys and columns only ever get added.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.distribution_trial import MIB, Outcome, Setup
from bench.report import machine


def describe(o: Outcome, setup: Setup) -> str:
    """One line for the progress log: the time and its ratio to the bound, or why none."""
    if o.seconds is None:
        return o.error or o.note or "no figure"
    return f"{o.seconds:.1f} s, {o.seconds / setup.bound:.2f}x the bound"


def make_record(setup: Setup, outcomes: Sequence[Outcome], command: str) -> dict[str, Any]:
    by = {o.system: o for o in outcomes}
    rows = []
    for o in outcomes:
        row = asdict(o)
        row["ratio_to_bound"] = o.seconds / setup.bound if o.seconds else None
        row["median_client_seconds"] = (
            o.client_seconds[len(o.client_seconds) // 2] if o.client_seconds else None
        )
        row["source_sent_copies"] = (
            o.source_sent_bytes / setup.size if o.source_sent_bytes is not None else None
        )
        rows.append(row)
    swarm = by.get("swarm")
    comparisons: dict[str, Any] = {}
    if swarm is not None and swarm.seconds:
        for other in ("http", "squid", "aria2"):
            base = by.get(other)
            if base is not None and base.seconds:
                comparisons[f"swarm_speedup_vs_{other}"] = base.seconds / swarm.seconds
        comparisons["swarm_ratio_to_bound"] = swarm.seconds / setup.bound
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine(),
            "command": command,
        },
        "params": {
            "nodes": setup.nodes,
            "size_bytes": setup.size,
            "size_mib": setup.size / MIB,
            "rate_mbit": setup.rate_mbit,
            "kumar_ross_bound_s": setup.bound,
        },
        "systems": rows,
        "comparisons": comparisons,
        "goals": {
            "swarm_ratio_to_bound": "<= 1.10",
            "swarm_speedup_vs_http": ">= 10 (at N=16)",
            "swarm_speedup_vs_aria2": "> 1",
        },
    }


def markdown(record: dict[str, Any]) -> str:
    p = record["params"]
    m = record["meta"]["machine"]
    lines = [
        "# Distribution of one file to N nodes",
        "",
        f"- date: {record['meta']['date']}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), kernel {m['kernel']}",
        f"- command: `{record['meta']['command']}`",
        f"- {p['size_mib']:g} MiB from one source to {p['nodes']} clients, every link"
        f" shaped to {p['rate_mbit']:g} Mbit/s each way (tc htb, network namespaces)",
        f"- Kumar-Ross lower bound: **{p['kumar_ross_bound_s']:.1f} s**"
        " = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) at the nominal rate",
        "",
        "| system | all clients done | × bound | median client | copies verified"
        " | source sent (× F) | notes |",
        "| ------ | ---------------- | ------- | ------------- | --------------- |"
        " ----------------- | ----- |",
    ]
    for r in record["systems"]:
        secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "—"
        ratio = f"{r['ratio_to_bound']:.2f}x" if r["ratio_to_bound"] is not None else "—"
        med = r["median_client_seconds"]
        med_s = f"{med:.1f} s" if med is not None else "—"
        copies = r["source_sent_copies"]
        copies_s = f"{copies:.2f}" if copies is not None else "—"
        notes = [r["note"]] if r["note"] else []
        if r["error"]:
            notes.append(f"**failed**: {r['error']}")
        for k, v in r["extra"].items():
            notes.append(f"{k} {v}")
        verified = f"{r['verified']}/{p['nodes']}" if r["seconds"] or r["error"] else "—"
        lines.append(
            f"| {r['system']} | {secs} | {ratio} | {med_s} | {verified} | {copies_s}"
            f" | {'; '.join(str(n) for n in notes)} |"
        )
    c = record["comparisons"]
    lines += ["", "Goals for `swarm`: ≤ 1.10x the bound; ≥ 10x faster than http at N=16;"]
    lines += ["faster than aria2."]
    if c:
        lines += [""]
        for k, v in c.items():
            lines.append(f"- {k.replace('_', ' ')}: {v:.2f}x")
    lines += [
        "",
        "The clock starts when the clients start (servers, caches and seeds are up)",
        "and stops when the last client holds the whole file; every copy's SHA-256 is",
        "checked afterwards. “source sent” is the source's eth0 transmit counter in",
        "copies of the file (headers included).",
    ]
    return "\n".join(lines) + "\n"


def write(record: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "distribution.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "DISTRIBUTION.md").write_text(markdown(record))
