"""Fixtures of the site event service's tests: a real NATS server on 127.0.0.1."""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from sitejob.config import SiteConfig
from sitejob.natsd import NatsServer


class Broker(NamedTuple):
    server: NatsServer
    site: SiteConfig  # token_file is the server's token; node_name "test-node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A started ``nats-server`` (JetStream, token auth) and a ``[site]`` config
    for it; the server is stopped whatever the test did."""
    token = secrets.token_hex(16)
    token_file = tmp_path / "nats.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = NatsServer(tmp_path / "nats", token, port=free_port())
    server.start()
    try:
        yield Broker(
            server,
            SiteConfig(
                servers=(server.url,),
                token_file=token_file,
                credentials=None,
                node_name="test-node",
                request_timeout=2.0,
            ),
        )
    finally:
        server.stop()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (a root node's job user works below it)."""
    d = Path(tempfile.mkdtemp(prefix="swarm-site-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
