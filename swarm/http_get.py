"""Bounded HTTP GETs to origins and peers: one deadline for the whole transfer.

Every byte a node asks of an origin or a peer over HTTP (objects, TUF
metadata, ``.torrent`` files, the peer exchange) goes through
:class:`HTTPClient`.  It is the one module that opens those sockets, and it
maps their errors (``OSError``, :mod:`http.client`'s) to
:class:`swarm.exceptions.FetchError` and its subclasses at the boundary.

Invariants:

* **One deadline per GET.**  A GET ends, with its body or an error, by the
  ``deadline`` the caller gives (a :func:`time.monotonic` value), for name
  resolution, connect, request, status line, headers and body together.
  Per-operation socket timeouts do not give this (a server sending one byte a
  second never lets a single ``recv`` time out), so the socket the HTTP
  parser reads from sets its timeout to the time *left* before every
  ``recv``, ``send`` and ``connect``, and refuses to start one once the
  deadline has passed: no single call outlasts the deadline, so neither does
  the sum of them.  Name resolution (``getaddrinfo`` cannot be interrupted)
  runs in a helper thread that is waited for only until the deadline.
* **Bounded bodies.**  A body is read to at most ``limit`` bytes; one byte
  more is an error (endless-data defence).  Headers are bounded by
  :mod:`http.client` (100 lines of at most 64 KiB).
* **Keep-alive.**  Connections are reused per (host, port), up to
  ``idle_per_host`` idle ones for each of the ``hosts`` most recently used,
  so a cold start's many small objects do not each pay a connect.  A
  connection goes back to the pool only after its answer was read to the
  end; any error closes it.  A reused connection the server closed while
  idle is detected before use, and a GET that fails on a reused connection
  before any byte of the answer arrived is retried once on a new connection,
  within the same deadline (GET is idempotent).

``https://`` works the same way (the TLS handshake is within the deadline
too); certificates and host names are checked against the system's CAs
unless a context is given.

:class:`Transport` is the seam the fetchers depend on (``get`` only), so a
test can hand them a mock transport instead of a server where a server adds
nothing (``tests/mock_transport.py``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import select
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol

from swarm.exceptions import FetchError, FetchStatus, FetchTimeout, FetchTooLong

_Address = tuple[str, str, int]  # scheme, host, port
_PORTS = {"http": 80, "https": 443}
_AddrInfo = list[tuple[Any, Any, int, str, Any]]

# Failures that mean "the server closed this idle keep-alive connection",
# when they happen before any byte of the answer: worth one retry.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


class _Deadline:
    """Mixed into a socket class: every blocking call ends by ``deadline``.

    The timeout is re-set to the time left before each call, and a call
    started after the deadline fails at once (``TimeoutError``).
    """

    deadline = float("inf")

    def _time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        n: int = super().recv_into(*args, **kwargs)  # type: ignore[misc]
        return n

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        data: bytes = super().recv(*args, **kwargs)  # type: ignore[misc]
        return data

    def send(self, *args: Any, **kwargs: Any) -> int:
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        n: int = super().send(*args, **kwargs)  # type: ignore[misc]
        return n

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        # A plain socket's timeout bounds the whole sendall (Python >= 3.5);
        # a TLS socket's sendall calls send, bounded above.
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        super().sendall(*args, **kwargs)  # type: ignore[misc]

    def connect(self, address: Any) -> None:
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        super().connect(address)  # type: ignore[misc]

    def do_handshake(self, block: bool = False) -> None:
        self.settimeout(self._time_left())  # type: ignore[attr-defined]
        super().do_handshake(block)  # type: ignore[misc]

    def idle_and_open(self) -> bool:
        """True if nothing arrived while idle: no EOF, no reset, no stray bytes."""
        poller = select.poll()  # not select(): descriptors may exceed FD_SETSIZE
        poller.register(self.fileno(), select.POLLIN | select.POLLPRI)  # type: ignore[attr-defined]
        return not poller.poll(0)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineTLSSocket(_Deadline, ssl.SSLSocket):
    pass


class _Connection:
    """One keep-alive connection: its socket and the HTTP/1.1 state on it."""

    def __init__(self, key: _Address, sock: _DeadlineSocket | _DeadlineTLSSocket) -> None:
        scheme, host, port = key
        self.sock = sock
        self.http = (
            http.client.HTTPSConnection(host, port)
            if scheme == "https"
            else http.client.HTTPConnection(host, port)
        )
        self.http.auto_open = 0  # never reconnect behind our back
        self.http.sock = sock

    def close(self) -> None:
        self.http.close()
        self.sock.close()


class Response:
    """An answer being read; :meth:`close` it (or use ``with``).

    ``status`` and ``headers`` are known; the body is read with
    :meth:`chunks` or :meth:`read`, within the GET's deadline and limit.
    """

    def __init__(
        self,
        client: HTTPClient,
        key: _Address,
        conn: _Connection,
        raw: http.client.HTTPResponse,
        url: str,
        deadline: float,
        limit: int,
    ) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self._raw = raw
        self.url = url
        self.status = raw.status
        self.headers = raw.headers
        self._deadline = deadline
        self._limit = limit
        self._got = 0

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes.

        Raises:
            FetchTimeout: the deadline passed.
            FetchTooLong: the body is longer than the limit.
            FetchError: the connection broke or the answer is malformed.
        """
        while True:
            want = min(size, self._limit + 1 - self._got)
            try:
                part = self._raw.read(want)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise _mapped(exc, self.url, self._deadline) from exc
            if not part:
                self._finish()
                return
            self._got += len(part)
            if self._got > self._limit:
                self.close()
                raise FetchTooLong(f"{self.url}: body over {self._limit} bytes")
            yield part

    def read(self) -> bytes:
        """The whole body (see :meth:`chunks` for what it raises)."""
        return b"".join(self.chunks(1 << 20))

    def _finish(self) -> None:
        """The body was read to its end: the connection may serve again."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._raw.close()
        if conn.http.sock is None or self._raw.will_close:
            conn.close()  # the server said Connection: close, or http.client dropped it
        else:
            self._client._release(self._key, conn)

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, not reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._raw.close()
            conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _mapped(exc: BaseException, url: str, deadline: float) -> FetchError:
    if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
        return FetchTimeout(f"{url}: no complete answer within the deadline")
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):
        return FetchError(f"{url}: bad HTTP answer: {type(exc).__name__} {exc}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return FetchError(f"{url}: {reason or type(exc).__name__}")


def _close_idle(idle: OrderedDict[_Address, list[_Connection]]) -> None:
    for conns in idle.values():
        for conn in conns:
            conn.close()
    idle.clear()


class Transport(Protocol):
    """One bounded GET, as :meth:`HTTPClient.get` does it: the body of a
    ``200`` answer, by ``deadline`` (a :func:`time.monotonic` value), at most
    ``limit`` bytes.  Raises :class:`swarm.exceptions.FetchError` or one of
    its subclasses (``FetchStatus``, ``FetchTimeout``, ``FetchTooLong``)."""

    def get(self, url: str, *, deadline: float, limit: int) -> bytes: ...


class HTTPClient:
    """GETs with a deadline and a body limit over pooled keep-alive connections.

    Thread-safe: FUSE threads, the metadata updater and the peer exchange
    share one instance per origin (see the module docstring).
    """

    def __init__(
        self, *, idle_per_host: int = 16, hosts: int = 64, tls: ssl.SSLContext | None = None
    ) -> None:
        self.idle_per_host = idle_per_host
        self._tls = tls  # for https:// (default: the system's CAs, host names checked)
        self.hosts = hosts  # idle connections are kept for this many hosts
        self._idle: OrderedDict[_Address, list[_Connection]] = OrderedDict()
        self._lock = threading.Lock()
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        self.connects = 0  # new connections made (tests and status)
        # A client dropped without close() still closes its idle sockets.
        weakref.finalize(self, _close_idle, self._idle)

    # -- requests ---------------------------------------------------------------

    def get(self, url: str, *, deadline: float, limit: int) -> bytes:
        """The body of a ``200`` answer to ``GET url``, by ``deadline``.

        Raises:
            FetchStatus: the server answered with another status.
            FetchTimeout: no complete answer by the deadline.
            FetchTooLong: the body is longer than ``limit``.
            FetchError: unreachable, connection broken, malformed answer.
        """
        with self.open(url, deadline=deadline, limit=limit) as resp:
            if resp.status != 200:
                raise FetchStatus(url, resp.status)
            return resp.read()

    def open(self, url: str, *, deadline: float, limit: int) -> Response:
        """Send ``GET url`` and read the status line and headers, by ``deadline``.

        The body is read from the returned :class:`Response`, which keeps the
        same deadline and ``limit``.

        Raises:
            FetchTimeout: no status and headers by the deadline.
            FetchError: bad URL, unreachable, connection broken, malformed answer.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise FetchError(f"{url}: not an http:// or https:// URL")
        try:
            key = (parts.scheme, parts.hostname, parts.port or _PORTS[parts.scheme])
        except ValueError as exc:  # a bad port
            raise FetchError(f"{url}: {exc}") from exc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        reused = True
        conn = self._pooled(key)
        if conn is None:
            reused = False
            conn = self._connect(key, url, deadline)
        while True:
            conn.sock.deadline = deadline
            try:
                conn.http.request("GET", target)  # http.client adds Host, identity encoding
                raw = conn.http.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and isinstance(exc, _STALE) and time.monotonic() < deadline:
                    reused = False  # the server dropped an idle connection: once more
                    conn = self._connect(key, url, deadline)
                    continue
                raise _mapped(exc, url, deadline) from exc
            return Response(self, key, conn, raw, url, deadline, limit)

    # -- connections --------------------------------------------------------------

    def _pooled(self, key: _Address) -> _Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if conn.sock.idle_and_open():
                return conn
            conn.close()

    def _release(self, key: _Address, conn: _Connection) -> None:
        conn.sock.deadline = float("inf")
        dropped: list[_Connection] = []
        with self._lock:
            idle = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(idle) < self.idle_per_host:
                idle.append(conn)
            else:
                dropped.append(conn)
            while len(self._idle) > self.hosts:  # the least recently used host's
                dropped += self._idle.popitem(last=False)[1]
        for c in dropped:
            c.close()

    def _connect(self, key: _Address, url: str, deadline: float) -> _Connection:
        errors = []
        for family, type_, proto, _, sockaddr in self._resolve(key, url, deadline):
            sock = _DeadlineSocket(family, type_, proto)
            sock.deadline = deadline
            try:
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                    raise _mapped(exc, url, deadline) from exc
                errors.append(exc)
                continue
            try:
                conn = _Connection(key, self._secured(sock, key[1]) if key[0] == "https" else sock)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise _mapped(exc, url, deadline) from exc
            with self._lock:
                self.connects += 1
            return conn
        raise _mapped(errors[-1], url, deadline) if errors else FetchError(f"{url}: no address")

    def _secured(self, sock: _DeadlineSocket, host: str) -> _DeadlineTLSSocket:
        with self._lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            self._tls.sslsocket_class = _DeadlineTLSSocket
            context = self._tls
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        assert isinstance(tls, _DeadlineTLSSocket)
        tls.deadline = sock.deadline
        try:
            tls.do_handshake()
        except BaseException:
            tls.close()  # sock was detached into tls
            raise
        return tls

    def _resolve(self, key: _Address, url: str, deadline: float) -> _AddrInfo:
        _, host, port = key
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 0, "", (host, port))]
        with self._lock:
            if self._resolver is None:
                self._resolver = concurrent.futures.ThreadPoolExecutor(
                    2, thread_name_prefix="swarm-resolve"
                )
            resolver = self._resolver
        future = resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            found: _AddrInfo = future.result(max(deadline - time.monotonic(), 0))
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise FetchTimeout(f"{url}: cannot resolve {host} within the deadline") from exc
        except OSError as exc:
            raise FetchError(f"{url}: cannot resolve {host}: {exc}") from exc
        return found

    def close(self) -> None:
        """Close the idle connections (answers still being read are unaffected)."""
        with self._lock:
            idle = OrderedDict(self._idle)
            self._idle.clear()
            resolver, self._resolver = self._resolver, None
        _close_idle(idle)
        if resolver is not None:
            resolver.shutdown(wait=False, cancel_futures=True)
