"""Errors of the cvmfs_like package, rooted by cause.

ReleaseError
├── ObjectVerificationError   an object's bytes do not match its signed hash
│                             or size (tampered, truncated): untrusted data
├── ObjectUnavailable         no source delivered the object in time (transport)
├── CatalogError              a catalog is unreadable or inconsistent
├── ProfileError              a start profile file is unusable (ignored)
├── PublishError              the source tree cannot be published (unreadable
│                             file, file changed while read, bad name ...)
└── StoreError                local misuse of a store or cache (missing
                              repository, bad quota, lock held ...)
"""


class ReleaseError(Exception):
    """Root of every error raised by ``cvmfs_like``."""


class ObjectVerificationError(ReleaseError):
    """An object's content does not match its name: never served."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"object {digest}: {reason}")
        self.digest = digest
        self.reason = reason


class ObjectUnavailable(ReleaseError):
    """An object could not be fetched from any source within the deadline."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"object {digest} unavailable: {reason}")
        self.digest = digest
        self.reason = reason


class CatalogError(ReleaseError):
    """A catalog cannot be read or is inconsistent."""


class PublishError(ReleaseError):
    """The source tree cannot be published as it is."""


class StoreError(ReleaseError):
    """A store, cache or repository is missing or misused."""


class ProfileError(ReleaseError):
    """A start profile file is unusable (advisory: ignored, never fatal)."""
