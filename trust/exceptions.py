"""Errors of the trust package, rooted by cause.

    TrustError
    ├── VerificationError        untrusted data failed verification (bad signature,
    │   │                        rollback, expired, wrong hash, too long ...)
    │   └── MetadataFormatError  signed metadata parsed but its content is malformed
    ├── TrustTransportError      metadata could not be fetched (no verdict on trust)
    └── TrustConfigError         local misuse: missing/unreadable keys, bad root file,
                                 a key directory that would be overwritten ...

python-tuf's exceptions are mapped at the boundary with ``raise ... from exc``.
"""


class TrustError(Exception):
    """Root of every error raised by ``trust``."""


class VerificationError(TrustError):
    """Untrusted data failed verification."""


class MetadataFormatError(VerificationError):
    """Signed metadata is well-signed but malformed for our use."""


class TrustTransportError(TrustError):
    """Metadata could not be fetched; says nothing about trust."""


class TrustConfigError(TrustError):
    """Local misuse or unusable local state (keys, trusted root, directories)."""
