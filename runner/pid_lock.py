"""A lock file that names its holder: one owner for a directory.

:func:`take_pid_lock` takes an exclusive, non-blocking ``flock`` on a file
and writes the holder's pid into it. The kernel drops the lock when its
descriptor is closed or its holder dies, so a crashed owner never leaves a
stale lock; the pid is only there to name the owner in the refusal. Used by
the job queue (``runner/masonry.py``: ``QueueLock``) and the site-job gather
(``sitejob/gather_dir.py``: ``DirLock``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def take_pid_lock(path: Path, busy: Callable[[str], Exception]) -> int:
    """Lock ``path`` (created mode 0644) for this process and write its pid in it.

    Returns the descriptor that holds the lock (close it to release).

    Raises:
        busy(pid): another live process holds the lock; ``pid`` is what it wrote.
        OSError: ``path`` cannot be opened or written.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise busy(holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
