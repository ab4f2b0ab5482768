"""A deliberately slow HTTP server on 127.0.0.1 for deadline tests.

:class:`SlowStore` serves the files of a directory (an origin store) over
HTTP/1.1 with keep-alive (HTTPS with ``tls``, a server context).  Files
whose name is in ``slow`` are sent slowly: ``mode="body"`` sends the headers
at once and then one byte of the body every ``interval`` seconds;
``mode="headers"`` sends even the status line and the headers that way.
Everything else is answered at once, so a mount starts normally and only the
chosen objects trickle.

The server records what the tests wait for and assert on: how many slow
answers are being sent right now (``trickling``; ``peak``: the most at
once), when the first one ended (the client gave up or the server stopped),
and how many connections it accepted.  ``close`` stops every thread and
closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType


class SlowStore:
    def __init__(
        self,
        root: Path,
        *,
        slow: set[str] | None = None,
        mode: str = "body",
        interval: float = 0.1,
        keep_alive: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        assert mode in ("body", "headers")
        self.root = root
        self.slow = set(slow or ())
        self.mode = mode
        self.interval = interval
        self.keep_alive = keep_alive
        self.tls = tls
        self.connections = 0
        self.trickling = 0
        self.peak = 0  # the most slow answers sent at once
        self.slow_started = 0
        self.first_slow_end: float | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/"

    def wait_trickling(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` slow answers are being sent at once."""
        with self._cond:
            return self._cond.wait_for(lambda: self.trickling >= n, timeout)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self.connections += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.ExitStack() as stack, contextlib.suppress(OSError):
            stack.enter_context(conn)
            if self.tls is not None:
                conn.settimeout(10)
                conn = stack.enter_context(self.tls.wrap_socket(conn, server_side=True))
                conn.settimeout(None)
                with self._cond:
                    self._conns.append(conn)  # the plain one was detached
            reader = stack.enter_context(conn.makefile("rb"))
            while not self._stop.is_set():
                line = reader.readline(65536)
                if not line:
                    return
                while reader.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass  # request headers: not needed
                path = line.split()[1].decode().lstrip("/")
                if not self._answer(conn, path):
                    return

    def _answer(self, conn: socket.socket, path: str) -> bool:
        file = (self.root / path).resolve()
        inside = file.is_relative_to(self.root.resolve())
        body = file.read_bytes() if inside and file.is_file() else None
        close = "keep-alive" if self.keep_alive else "close"
        if body is None:
            not_found = f"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: {close}\r\n"
            conn.sendall(not_found.encode() + b"\r\n")
            return self.keep_alive
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {close}\r\n\r\n".encode()
        )
        if file.name not in self.slow:
            conn.sendall(head + body)
            return self.keep_alive
        fast, slow = (head, body) if self.mode == "body" else (b"", head + body)
        conn.sendall(fast)
        with self._cond:
            self.trickling += 1
            self.peak = max(self.peak, self.trickling)
            self.slow_started += 1
            self._cond.notify_all()
        try:
            for i in range(len(slow)):
                if self._stop.wait(self.interval):
                    return False
                conn.sendall(slow[i : i + 1])  # raises once the client gave up
        finally:
            with self._cond:
                self.trickling -= 1
                if self.first_slow_end is None:
                    self.first_slow_end = time.monotonic()
                self._cond.notify_all()
        return self.keep_alive

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._accepter.join(10)
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> SlowStore:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
