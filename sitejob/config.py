"""The ``[site]`` table of a node's configuration, and the connection to the broker.

::

    [site]
    nats = "nats://10.0.0.1:4222"          # or a list: the servers of a NATS cluster
    token_file = "/etc/swarm/nats.token"   # the site's token (mode 0600) ...
    # credentials = "/etc/swarm/node.creds" # ... or a NATS credentials file (nkeys/JWT)
    node_name = "wn042"                     # default: the host name
    work = true                             # pull site ranges (false: submit/status/gather only)
    max_ranges = 4                          # ranges run at once (default: the lease's cores)
    request_timeout = "5s"                  # every request to the broker has this deadline

Exactly one of ``token_file`` and ``credentials``: nothing reaches the broker
unauthenticated. Errors name ``site.KEY`` and what it accepts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sitejob.exceptions import BrokerError
from sitejob.protocol import node_name_problem
from swarm.exceptions import ConfigError
from swarm.options import ValueRangeError, parse_count, parse_seconds

KEYS = (
    "nats",
    "token_file",
    "credentials",
    "node_name",
    "work",
    "max_ranges",
    "request_timeout",
)


@dataclass(frozen=True)
class SiteConfig:
    servers: tuple[str, ...]
    token_file: Path | None
    credentials: Path | None
    node_name: str
    work: bool = True
    max_ranges: int | None = None
    request_timeout: float = 5.0

    def token(self) -> str | None:
        """The token from ``token_file`` (None with credentials).

        Raises:
            ConfigError: the file cannot be read or is empty.
        """
        if self.token_file is None:
            return None
        try:
            text = self.token_file.read_text().strip()
        except OSError as exc:
            why = f"cannot read {self.token_file}: {exc.strerror}"
            raise ConfigError(f"site.token_file: {why}") from None
        if not text:
            raise ConfigError(f"site.token_file: {self.token_file} is empty")
        return text


def _server(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"site.nats: expected a nats:// URL, got {value!r}")
    u = urlsplit(value)
    if u.scheme not in ("nats", "tls") or not u.hostname or u.username or u.password:
        raise ConfigError(
            f"site.nats: expected nats://HOST:PORT (credentials go in token_file or "
            f"credentials), got {value!r}"
        )
    try:
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ConfigError(f"site.nats: bad port in {value!r}") from None
    return value


def _path(table: Mapping[str, Any], key: str, base: Path) -> Path | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"site.{key}: expected a file path, got {value!r}")
    return base / value


def site_config(table: Mapping[str, Any], *, base: Path = Path("/")) -> SiteConfig:
    """Validate the ``[site]`` table (relative paths are relative to ``base``).

    Raises:
        ConfigError: one line naming ``site.KEY``.
    """
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"site.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    if "nats" not in table:
        raise ConfigError("site.nats: missing (required): the site's NATS server, nats://HOST:PORT")
    raw = table["nats"]
    servers = tuple(_server(v) for v in (raw if isinstance(raw, list) else [raw]))
    if not servers:
        raise ConfigError("site.nats: the list of servers is empty")
    token_file = _path(table, "token_file", base)
    credentials = _path(table, "credentials", base)
    if (token_file is None) == (credentials is None):
        raise ConfigError(
            "site: exactly one of token_file and credentials is required "
            "(the broker accepts no unauthenticated client)"
        )
    name = table.get("node_name", socket.gethostname().split(".")[0] or "node")
    problem = node_name_problem(name) if isinstance(name, str) else f"{name!r} is not a string"
    if problem:
        raise ConfigError(f"site.node_name: {problem}")
    work = table.get("work", True)
    if not isinstance(work, bool):
        raise ConfigError(f"site.work: expected true or false, got {work!r}")
    try:
        max_ranges = (
            None
            if "max_ranges" not in table
            else parse_count(table["max_ranges"], minimum=1, maximum=4096)
        )
    except ValueRangeError as exc:
        raise ConfigError(f"site.max_ranges: {exc}") from None
    try:
        timeout = parse_seconds(table.get("request_timeout", 5.0))
    except ValueRangeError as exc:
        raise ConfigError(f"site.request_timeout: {exc}") from None
    return SiteConfig(
        servers=servers,
        token_file=token_file,
        credentials=credentials,
        node_name=name,
        work=work,
        max_ranges=max_ranges,
        request_timeout=timeout,
    )


async def connect(cfg: SiteConfig, *, name: str | None = None, reconnect: bool = True) -> Any:
    """A NATS client connected to the site's broker.

    With ``reconnect`` (a daemon, a gather) the client reconnects forever
    after a broker restart, every half second; without (a one-shot command) a
    lost connection is an error. The first connection has ``request_timeout``
    per server.

    Raises:
        ConfigError: the token or credentials cannot be read.
        sitejob.exceptions.BrokerError: no server could be reached or authentication failed.
    """
    from nats.aio.client import Client

    kwargs: dict[str, Any] = {}
    token = cfg.token()
    if token is not None:
        kwargs["token"] = token
    if cfg.credentials is not None:
        if not os.access(cfg.credentials, os.R_OK):
            raise ConfigError(f"site.credentials: cannot read {cfg.credentials}")
        kwargs["user_credentials"] = str(cfg.credentials)

    seen: list[Exception] = []

    async def quiet(exc: Exception) -> None:  # nats-py logs every error by default
        if not seen:
            seen.append(exc)  # the first one says why (a refused token, a closed port)

    try:
        # The first connection tries each server once: with endless reconnects
        # from the start, nats-py would wait forever for an unreachable broker.
        nc = Client()
        kwargs["connect_timeout"] = cfg.request_timeout  # typed int, used as a float
        kwargs["reconnect_time_wait"] = 0.5
        await nc.connect(
            servers=list(cfg.servers),
            name=name or cfg.node_name,
            allow_reconnect=reconnect,
            max_reconnect_attempts=1,  # 0 would mean no limit
            error_cb=quiet,
            **kwargs,
        )
    except Exception as exc:  # nats-py raises several unrelated types here
        why = str(seen[0] if seen else exc) or type(exc).__name__
        raise BrokerError(f"cannot connect to {', '.join(cfg.servers)}: {why}") from None
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1  # from now on: a broker restart is waited for
    return nc
