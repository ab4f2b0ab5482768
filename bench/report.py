"""Result rows, the JSON record and the markdown table."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One compared figure.

    ``ratio`` is always ``ours / baseline``; ``goal`` is ``("<=", x)`` or
    ``(">=", x)`` on the ratio, or on ``ours`` itself when ``absolute``.
    """

    name: str
    unit: str
    ours: float | None
    baseline_name: str = ""
    baseline: float | None = None
    goal: tuple[str, float] | None = None
    absolute: bool = False
    others: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.goal is None:
            return None
        value = self.ours if self.absolute else self.ratio
        if value is None:
            return None
        op, x = self.goal
        return value <= x if op == "<=" else value >= x

    def goal_text(self) -> str:
        if self.goal is None:
            return "info"
        op, x = self.goal
        return f"{op} {x:g} {self.unit}" if self.absolute else f"{op} {x:g}x"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["passed"] = self.passed
        d["goal"] = self.goal_text()
        return d


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "MB/s" or unit == "files/s":
        return f"{v:,.0f} {unit}"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    return f"{v:.3g} {unit}"


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# swarm-grid benchmark: signed software releases",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM,"
        f" kernel {m['kernel']}, Python {m['python']}",
        f"- command: `{meta['command']}`",
        f"- dataset: {meta['dataset']}",
        f"- samples: median of the runs listed in the JSON ({meta['json']})",
        "",
        "ratio = ours / baseline.",
        "",
        "| # | measure | ours | baseline | ratio | goal | result | also |",
        "| - | ------- | ---- | -------- | ----- | ---- | ------ | ---- |",
    ]
    for i, r in enumerate(rows, 1):
        base = f"{_fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline_name else "—"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        res = {True: "PASS", False: "**FAIL**", None: "—"}[r.passed]
        others = "; ".join(f"{k} {_fmt(v, r.unit)}" for k, v in r.others.items())
        if r.note:
            others = f"{others}; {r.note}" if others else r.note
        lines.append(
            f"| {i} | {r.name} | {_fmt(r.ours, r.unit)} | {base} | {ratio} | {r.goal_text()}"
            f" | {res} | {others} |"
        )
    if meta.get("errors"):
        lines += ["", "Errors:", ""]
        lines += [f"- {e}" for e in meta["errors"]]
    if meta.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path, tag: str, rows: list[Row], samples: dict[str, Any], meta: dict[str, Any]
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{tag}.json"
    md_path = out_dir / "RESULTS.md"
    meta = {**meta, "json": f"bench/results/{json_path.name}"}
    record = {"meta": meta, "rows": [r.to_json() for r in rows], "samples": samples}
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(rows, meta)
    md_path.write_text(text)  # the last run
    (out_dir / f"RESULTS-{tag}.md").write_text(text)  # the last run of this kind
    return json_path, md_path


def base_meta(dataset: str) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "command": "python -m bench.run " + shlex.join(sys.argv[1:]),
        "dataset": dataset,
        "errors": [],
        "notes": [],
    }
