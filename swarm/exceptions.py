"""Errors of the swarm package, rooted by cause.

SwarmError
├── FetchError       an HTTP GET from an origin or a peer failed (transport)
│   ├── FetchTimeout     no complete answer by the GET's deadline
│   ├── FetchStatus      the server answered with a status other than 200
│   └── FetchTooLong     the body ran past its limit (endless data)
├── ConfigError      local misuse: bad option, unusable path, bad address
├── TransferError    a torrent could not deliver (removed, storage error, bad torrent)
└── ImageError       a VM image could not be published or was refused by policy
"""


class SwarmError(Exception):
    """Root of every error raised by ``swarm``."""


class FetchError(SwarmError):
    """An HTTP GET could not deliver: unreachable, broken, malformed, too slow."""


class FetchTimeout(FetchError):
    """No complete answer (headers and body) by the GET's deadline."""


class FetchStatus(FetchError):
    """The server answered, but not with ``200 OK``."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url}: HTTP {status}")
        self.url = url
        self.status = status


class FetchTooLong(FetchError):
    """The body is longer than the GET allows (endless-data defence)."""


class ConfigError(SwarmError):
    """Bad configuration or command-line input."""


class TransferError(SwarmError):
    """Peer-to-peer transfer failed: bad torrent, storage error, torrent gone."""


class ImageError(SwarmError):
    """A VM image could not be published, or the site's policy refused it."""
