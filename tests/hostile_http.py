"""A small HTTP server that plays a hostile peer or a slow origin in tests.

Each path gets a :class:`Answer`: the bytes to send, and how: at once, with
the headers trickled, or with the body trickled a few bytes at a time.  A
trickling answer goes on until the client hangs up or the server closes, so
a client without a real deadline waits as long as the test lets it.
Listens on one loopback address; :meth:`HostileServer.close` stops every
connection thread it started.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Answer:
    body: bytes
    status: int = 200
    trickle_headers: bool = False  # send the header block one byte at a time
    trickle_body: bool = False  # send the body one byte at a time
    interval: float = 0.2  # seconds between trickled bytes


class HostileServer:
    def __init__(self, answers: dict[str, Answer], host: str = "127.0.0.1", port: int = 0):
        self.answers = answers
        self.requests: list[str] = []
        self._closed = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1].decode()
                self.requests.append(path)
                answer = self.answers.get(path, Answer(b"not here\n", status=404))
                head = (
                    f"HTTP/1.1 {answer.status} X\r\nContent-Length: {len(answer.body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                self._send(conn, head, answer.trickle_headers, answer.interval)
                self._send(conn, answer.body, answer.trickle_body, answer.interval)
            except OSError:
                return

    def _send(self, conn: socket.socket, data: bytes, trickle: bool, interval: float) -> None:
        if not trickle:
            conn.sendall(data)
            return
        for i in range(len(data)):
            if self._closed.wait(interval):
                return
            conn.sendall(data[i : i + 1])

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
