"""Errors of the trust package, rooted by cause.

    TrustError
    ├── VerificationError        untrusted data failed verification (bad signature,
    │   │                        rollback, expired, wrong hash, too long ...)
    │   ├── MetadataFormatError  signed metadata parsed but its content is malformed
    │   ├── SignatureError       not signed by a threshold of the delegated keys
    │   ├── RollbackError        a version older than (or inconsistent with) one
    │   │                        already trusted: rollback, mix-and-match
    │   ├── ExpiredMetadataError the newest metadata on offer is expired (freeze)
    │   ├── HashMismatchError    data does not match the length/hash that signed
    │   │                        metadata announced (arbitrary software)
    │   └── OversizedDataError   more bytes than the allowed maximum (endless data)
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


class SignatureError(VerificationError):
    """Metadata is not signed by a threshold of the keys its delegator names."""


class RollbackError(VerificationError):
    """A version older than, or inconsistent with, the trusted one (rollback,
    mix-and-match, fast-forward)."""


class ExpiredMetadataError(VerificationError):
    """The newest metadata on offer is expired (freeze attack or stale mirror)."""


class HashMismatchError(VerificationError):
    """Data does not match the length or hash announced by signed metadata."""


class OversizedDataError(VerificationError):
    """More bytes were offered than the allowed maximum (endless-data attack)."""
