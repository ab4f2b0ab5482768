"""Network addresses as a person writes them: ``HOST:PORT``.

The one owner of the address format in ``swarm``: the node config's
``listen``, ``api``, ``peer`` and ``bootstrap``, ``swarm serve --listen``
and (when it adopts :class:`Address`) the libtorrent adapter parse and write
addresses here, so they accept the same text everywhere.

* ``HOST`` is an IPv4 address, an IPv6 address in brackets (``[::1]:6881``:
  without them the port could not be told apart) or a host name (letters,
  digits, dots, dashes).  An empty host (``:6881``) takes the caller's
  default host, where it has one.
* ``PORT`` is a decimal number.  An address to *listen* on takes 0 to 65535
  (0: any free port, where the caller can report which); an address to
  *connect* to, or one a person must be told, takes 1 to 65535.

:meth:`Address.parse` raises :class:`AddressError` (a ``ValueError``) whose
message says what is accepted; each caller names its key or option.
"""

from __future__ import annotations

import ipaddress
import re

MAX_PORT = 65535
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_PORT = re.compile(r"[0-9]{1,5}")


class AddressError(ValueError):
    """Text that is not a ``HOST:PORT`` address; the message says what is accepted."""


class Address:
    """A host and a port; immutable, compared and hashed by value (a subclass
    only says which rule parsed it, e.g. a config key's default host).

    ``str(address)`` is its ``HOST:PORT`` text (IPv6 in brackets), which
    :meth:`parse` reads back as the same address.
    """

    __slots__ = ("host", "port")
    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Address is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.host!r}, {self.port})"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_unspecified(self) -> bool:
        """``0.0.0.0`` or ``::``: every interface, which is no peer's address."""
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False  # a host name

    @classmethod
    def parse(
        cls, text: object, *, default_host: str | None = None, any_port: bool = False
    ) -> Address:
        """``HOST:PORT`` -> :class:`Address`.

        ``default_host`` is taken for an empty host (else one is required);
        ``any_port`` accepts port 0 (listen on any free port).

        Raises:
            AddressError: not a string of that shape, a bad host, or the port
                is out of range; the message says what is accepted.
        """
        low = 0 if any_port else 1
        accepted = f"HOST:PORT with a port from {low} to {MAX_PORT}, e.g. 10.1.0.1:6881"
        if not isinstance(text, str):
            raise AddressError(f"expected {accepted}, got {text!r}")
        host, sep, port = text.rpartition(":")
        if not sep or not _PORT.fullmatch(port) or not low <= int(port) <= MAX_PORT:
            raise AddressError(f"expected {accepted}, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not _is_ip(host, version=6):
                raise AddressError(f"bad IPv6 address in {text!r}: expected {accepted}")
        elif ":" in host:
            raise AddressError(f"IPv6 address without brackets in {text!r}: write [{host}]:{port}")
        elif not host:
            if default_host is None:
                raise AddressError(f"no host in {text!r}: expected {accepted}")
            host = default_host
        elif not (_is_ip(host, version=4) or _HOST_NAME.fullmatch(host)):
            raise AddressError(f"bad host in {text!r}: expected {accepted}")
        return cls(host, int(port))


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False
