"""Errors of the swarm package, rooted by cause.

SwarmError
├── OriginError      the HTTP origin could not be reached or answered badly
└── ConfigError      local misuse: bad option, unusable path, bad address
"""


class SwarmError(Exception):
    """Root of every error raised by ``swarm``."""


class OriginError(SwarmError):
    """The origin could not deliver (transport)."""


class ConfigError(SwarmError):
    """Bad configuration or command-line input."""
