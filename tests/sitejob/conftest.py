"""A real NATS server (JetStream, token auth) on 127.0.0.1 for site-job tests."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sitejob.config import SiteConfig
from sitejob.natsd import NatsServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[NatsServer, SiteConfig]]:
    """A started server and a ``SiteConfig`` whose token file holds its token."""
    token = secrets.token_hex(16)
    token_file = tmp_path / "nats.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = NatsServer(tmp_path / "nats", token, port=free_port())
    server.start()
    try:
        yield (
            server,
            SiteConfig(
                servers=(server.url,),
                token_file=token_file,
                credentials=None,
                node_name="tester",
                request_timeout=5.0,
            ),
        )
    finally:
        server.stop()
