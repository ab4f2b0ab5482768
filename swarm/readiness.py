"""Telling systemd that a service is ready (``Type=notify``), without libsystemd.

systemd passes ``$NOTIFY_SOCKET``, the path of a datagram socket (or, when it
starts with ``@``, a name in the abstract namespace); the service sends it
``READY=1`` once it serves.  Outside systemd the variable is unset and
:func:`notify_ready` does nothing, so the daemons call it unconditionally.
A notification that cannot be delivered is logged, never fatal: the service
works, only its manager waits (and, after ``TimeoutStartSec``, restarts it).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
_SEND_TIMEOUT = 2.0  # a full socket buffer at the manager must not hang startup


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns whether a manager was told (False when there is none to tell).
    Never raises: a failure is logged as a warning.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s (%s): %s", path, state, exc)
        return False
    return True


def notify_ready() -> bool:
    """``READY=1`` (and the main PID) to ``$NOTIFY_SOCKET``; see :func:`notify`."""
    return notify(f"READY=1\nMAINPID={os.getpid()}")
