"""A synthetic event-processing command for runner tests.

    synth_events.py FIRST COUNT OUTPUT [--sleep S] [--runs LOG]
                    [--crash-once DIR] [--hang-once DIR] [--burn N]

Writes one line ``event <n>`` per event to OUTPUT. ``--runs`` appends
``<first> <count> <worker>`` to LOG when it starts. ``--crash-once DIR``:
the first time a task (per FIRST) runs, write half its events and SIGKILL
itself. ``--hang-once DIR``: the first time, sleep for an hour.
"""

import argparse
import os
import signal
import sys
import time


def _first_time(directory: str, first: int) -> bool:
    try:
        fd = os.open(os.path.join(directory, f"once-{first}"), os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("first", type=int)
    p.add_argument("count", type=int)
    p.add_argument("output")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--burn", type=int, default=0)
    p.add_argument("--runs")
    p.add_argument("--crash-once")
    p.add_argument("--hang-once")
    p.add_argument("--crash-first", type=int, default=-1)
    args = p.parse_args()
    if args.runs:
        with open(args.runs, "a") as f:
            f.write(f"{args.first} {args.count} {os.environ.get('SWARM_RUNNER_WORKER')}\n")
    crash = (
        args.crash_once
        and args.first == args.crash_first
        and _first_time(args.crash_once, args.first)
    )
    targeted = args.first == args.crash_first
    if args.hang_once and targeted and _first_time(args.hang_once, args.first):
        time.sleep(3600)
    with open(args.output, "w") as out:
        for n in range(args.first, args.first + args.count):
            if crash and n == args.first + args.count // 2:
                out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            x = 0
            for i in range(args.burn):
                x += i * i
            if args.sleep:
                time.sleep(args.sleep)
            out.write(f"event {n}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
