"""A synthetic event command that logs when it ran, for core-sharing tests.

    timed_events.py FIRST COUNT OUTPUT LOG SECONDS

Writes ``event <n>`` per event to OUTPUT, taking SECONDS in all, then appends
``<start> <end>`` (CLOCK_MONOTONIC, the same for every process) to LOG in one
write (O_APPEND: lines of concurrent tasks never interleave).
"""

import os
import sys
import time


def main() -> int:
    first, count, output, log, seconds = sys.argv[1:6]
    start = time.monotonic()
    time.sleep(float(seconds))
    with open(output, "w") as out:
        for n in range(int(first), int(first) + int(count)):
            out.write(f"event {n}\n")
    end = time.monotonic()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{start:.6f} {end:.6f}\n".encode())
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
