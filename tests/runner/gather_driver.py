"""Runs one job as its own process, so tests can SIGKILL or SIGTERM the gather.

gather_driver.py WORKDIR EVENTS CORES GRACE [synth_events options...]
"""

import json
import sys
from pathlib import Path

from runner.node_run import run_job
from runner.spec import parse_spec
from runner.stop import StopRequest, stop_on_sigterm

SYNTH = str(Path(__file__).with_name("synth_events.py"))


def main() -> int:
    workdir, events, cores, grace, *extra = sys.argv[1:]
    spec = parse_spec(
        {
            "name": "synth",
            "command": [sys.executable, SYNTH, "{first}", "{count}", "{output}", *extra],
            "cpu_work_per_event": 1.0,
            "max_events": 10**6,
            "events_per_task": 2,
        }
    )
    with stop_on_sigterm(StopRequest()) as stop:
        report = run_job(
            spec, int(events), workdir, cores=int(cores), stop=stop, grace=float(grace)
        )
    print(json.dumps(report.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
