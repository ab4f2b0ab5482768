"""A synthetic event command for the site end-to-end tests: it logs each run.

    site_events.py FIRST COUNT OUTPUT LOG SECONDS_PER_EVENT

Writes ``event <n>`` per event to OUTPUT, sleeping SECONDS_PER_EVENT before
each, and appends to LOG ``start <first> <t> <output>`` when it starts and
``end <first> <t> <output>`` when its output is complete (``t``:
CLOCK_MONOTONIC, the same for every process and namespace; each line one
``write`` to an O_APPEND file, so concurrent runs never interleave). OUTPUT
names the node that ran it (its data directory), so a test can tell which
node's runs were lost.
"""

import os
import sys
import time


def note(log: str, what: str, first: str, output: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{what} {first} {time.monotonic():.6f} {output}\n".encode())
    finally:
        os.close(fd)


def main() -> int:
    first, count, output, log, per_event = sys.argv[1:6]
    note(log, "start", first, output)
    with open(output, "w") as out:
        for n in range(int(first), int(first) + int(count)):
            time.sleep(float(per_event))
            out.write(f"event {n}\n")
    note(log, "end", first, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
