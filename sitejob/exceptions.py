"""Errors of the sitejob package, rooted by cause.

SiteError                 root of every error raised by ``sitejob``
├── ProtocolError         untrusted data: a message that is not one of this
│                         protocol's (also a ``ValueError``; the text says why)
├── BrokerError           transport: the NATS server cannot be found, started
│   │                     or reached
│   └── NotConnected      the node holds no connection to the broker right now
└── SiteJobError          a site job cannot be created, found or reached in
    │                     the broker (its record unreadable, a call refused)
    ├── UnknownSiteJob    local misuse: no site job with that id
    └── GatherError       the gather cannot run or finish (its directory
        │                 belongs to another plan, cannot be written...)
        └── GatherBusy    another gather owns the directory or gathers the job

Foreign errors (nats-py's, ``OSError``) are mapped to these where they cross
a public function; each such function says what it raises.
"""


class SiteError(Exception):
    """Root of every error raised by ``sitejob``."""


class ProtocolError(SiteError, ValueError):
    """A message that is not a valid message of this protocol (the text says why)."""


class BrokerError(SiteError):
    """The NATS server could not be found, started or reached."""


class NotConnected(BrokerError):
    """The node holds no connection to the broker right now."""


class SiteJobError(SiteError):
    """A site job cannot be created, found or reached in the broker (one line)."""


class UnknownSiteJob(SiteJobError):
    """No site job with that id in the broker."""


class GatherError(SiteJobError):
    """The gather cannot run or finish (one line: what and why)."""


class GatherBusy(GatherError):
    """Another gather owns the output directory or gathers the job."""
