"""A real NATS server (JetStream, token auth) on 127.0.0.1 for site-job tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sitejob.config import SiteConfig
from sitejob.natsd import NatsServer
from swarm_testing.broker import local_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[NatsServer, SiteConfig]]:
    """A started server and a ``SiteConfig`` whose token file holds its token."""
    with local_broker(tmp_path) as started:
        yield started
