"""A mock :class:`swarm.http_get.Transport` (as httpx's ``MockTransport``):
answers from a table, for tests of the fetchers where a server adds nothing.

Each URL maps to bytes (a 200 answer), an int (that HTTP status), or an
exception instance (raised as the transport would: ``FetchTimeout`` for a
silent server, ``FetchError`` for an unreachable one).  A URL not in the
table answers 404.  ``limit`` is enforced as :class:`HTTPClient` does
(``FetchTooLong``), and every request is recorded in ``requests``.
"""

from __future__ import annotations

import threading

from swarm.exceptions import FetchError, FetchStatus, FetchTooLong

Answer = bytes | int | FetchError


class MockTransport:
    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers: dict[str, Answer] = dict(answers or {})
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def get(self, url: str, *, deadline: float, limit: int) -> bytes:
        with self._lock:
            self.requests.append(url)
        answer = self.answers.get(url, 404)
        if isinstance(answer, FetchError):
            raise answer
        if isinstance(answer, int):
            raise FetchStatus(url, answer)
        if len(answer) > limit:
            raise FetchTooLong(f"{url}: body over {limit} bytes")
        return answer
