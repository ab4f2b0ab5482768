"""A real NATS broker (JetStream, token auth) on 127.0.0.1, and a site config for it.

:func:`local_broker` writes a fresh token to a file of mode 0600, starts a
:class:`sitejob.natsd.NatsServer` on a free loopback port and yields it with
a :class:`sitejob.config.SiteConfig` whose token file holds that token; the
server is stopped after the block, also when it fails.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from sitejob.config import SiteConfig
from sitejob.natsd import NatsServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_broker(
    tmp: Path, node_name: str = "tester", request_timeout: float = 5.0
) -> Iterator[tuple[NatsServer, SiteConfig]]:
    """A started server (its files in ``tmp/nats``) and a ``SiteConfig`` for it.

    Raises:
        sitejob.exceptions.BrokerError: no nats-server, or it did not start.
    """
    token = secrets.token_hex(16)
    token_file = tmp / "nats.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = NatsServer(tmp / "nats", token, port=free_port())
    server.start()
    try:
        yield (
            server,
            SiteConfig(
                servers=(server.url,),
                token_file=token_file,
                credentials=None,
                node_name=node_name,
                request_timeout=request_timeout,
            ),
        )
    finally:
        server.stop()
