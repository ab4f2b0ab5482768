"""Errors of the swarm package, rooted by cause.

SwarmError
├── OriginError      the HTTP origin could not be reached or answered badly
├── ConfigError      local misuse: bad option, unusable path, bad address
├── TransferError    a torrent could not deliver (removed, storage error, bad torrent)
└── ImageError       a VM image could not be published or was refused by policy
"""


class SwarmError(Exception):
    """Root of every error raised by ``swarm``."""


class OriginError(SwarmError):
    """The origin could not deliver (transport)."""


class ConfigError(SwarmError):
    """Bad configuration or command-line input."""


class TransferError(SwarmError):
    """Peer-to-peer transfer failed: bad torrent, storage error, torrent gone."""


class ImageError(SwarmError):
    """A VM image could not be published, or the site's policy refused it."""
