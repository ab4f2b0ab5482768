"""The bounded HTTP client (swarm/http_get.py) against real servers on
127.0.0.1: one deadline for the whole transfer however the server stalls,
body limits, keep-alive reuse and the one retry of a dropped idle connection,
and the same over TLS."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.exceptions import FetchError, FetchStatus, FetchTimeout, FetchTooLong
from swarm.http_get import HTTPClient
from tests.slow_http import SlowStore

SLACK = 1.5  # scheduling on a loaded 2-core machine; the deadlines are 1 s


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "small").write_bytes(b"s" * 1000)
    (root / "big").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return root


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result: object = fn()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_a_trickling_server_gives_a_timeout_at_the_deadline(files: Path, mode: str) -> None:
    with SlowStore(files, slow={"small"}, mode=mode, interval=0.05) as server:
        client = HTTPClient()
        got, took = timed(
            lambda: client.get(server.url + "small", deadline=time.monotonic() + 1, limit=1000)
        )
        assert isinstance(got, FetchTimeout), got
        assert 1 <= took < 1 + SLACK
        assert server.slow_started == 1  # it did trickle: bytes kept coming all along


def test_a_silent_server_gives_a_timeout_at_the_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        got, took = timed(lambda: HTTPClient().get(url, deadline=time.monotonic() + 1, limit=10))
        assert isinstance(got, FetchTimeout), got
        assert 1 <= took < 1 + SLACK


def test_a_refused_connection_and_a_bad_url_are_fetch_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        client = HTTPClient()
        with pytest.raises(FetchError, match="refused"):
            client.get(f"http://127.0.0.1:{port}/x", deadline=time.monotonic() + 5, limit=10)
    with pytest.raises(FetchError, match="not an http"):
        client.get("ftp://127.0.0.1/x", deadline=time.monotonic() + 5, limit=10)


def test_bodies_are_bounded_and_statuses_reported(files: Path) -> None:
    with SlowStore(files) as server:
        client = HTTPClient()
        deadline = time.monotonic() + 10
        assert (
            client.get(server.url + "big", deadline=deadline, limit=1 << 20)
            == (files / "big").read_bytes()
        )
        with pytest.raises(FetchTooLong, match="over 1000 bytes"):
            client.get(server.url + "big", deadline=deadline, limit=1000)
        with pytest.raises(FetchStatus) as exc:
            client.get(server.url + "absent", deadline=deadline, limit=1000)
        assert exc.value.status == 404


class OneShotServer:
    """Answers each connection with what ``answer(n)`` returns for the n-th
    request on it, then closes it if the answer is ``None``."""

    def __init__(self, answer: Callable[[int], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/"
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError), conn.makefile("rb") as reader:
            conn.settimeout(10)
            n = 0
            while reader.readline():
                while reader.readline() not in (b"\r\n", b""):
                    pass
                n += 1
                answer = self.answer(n)
                if answer is None:
                    return
                conn.sendall(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._accepter.join(10)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)


@contextlib.contextmanager
def one_shot(answer: Callable[[int], bytes | None]) -> Iterator[OneShotServer]:
    server = OneShotServer(answer)
    try:
        yield server
    finally:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_keep_alive_connections_are_reused(files: Path) -> None:
    with SlowStore(files) as server:
        client = HTTPClient()
        for _ in range(5):
            client.get(server.url + "small", deadline=time.monotonic() + 5, limit=1000)
        assert server.connections == client.connects == 1


def test_an_idle_connection_the_server_dropped_is_retried_once() -> None:
    # The server answers the first request on a connection and closes it on
    # the second without a word, as a server whose idle timer fired just as
    # the request went out.
    with one_shot(lambda n: OK if n == 1 else None) as server:
        client = HTTPClient()
        assert client.get(server.url, deadline=time.monotonic() + 5, limit=10) == b"ok"
        assert client.get(server.url, deadline=time.monotonic() + 5, limit=10) == b"ok"
        assert server.connections == 2


def test_a_new_connection_closed_without_an_answer_is_not_retried() -> None:
    with one_shot(lambda n: None) as server:
        with pytest.raises(FetchError, match="closed connection"):
            HTTPClient().get(server.url, deadline=time.monotonic() + 5, limit=10)
        assert server.connections == 1


def test_an_endless_chunked_body_is_cut_at_the_limit() -> None:
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 1024  # 4 MiB
    with one_shot(lambda n: endless) as server, pytest.raises(FetchTooLong):
        HTTPClient().get(server.url, deadline=time.monotonic() + 10, limit=100_000)


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only that server's certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp / "cert.pem"
    key_pem = tmp / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


def test_https_works_and_keeps_its_deadline(files: Path, tmp_path: Path) -> None:
    server_ctx, client_ctx = _self_signed(tmp_path)
    with SlowStore(files, slow={"small"}, tls=server_ctx, interval=0.05) as server:
        client = HTTPClient(tls=client_ctx)
        assert (
            client.get(server.url + "big", deadline=time.monotonic() + 10, limit=1 << 20)
            == (files / "big").read_bytes()
        )
        got, took = timed(
            lambda: client.get(server.url + "small", deadline=time.monotonic() + 1, limit=1000)
        )
        assert isinstance(got, FetchTimeout), got
        assert 1 <= took < 1 + SLACK
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            HTTPClient().get(server.url + "big", deadline=time.monotonic() + 10, limit=1 << 20)
