"""A live migration's keys and the admission handshake of its relays (pure).

Key exchange (no key crosses the node API): the source makes an ephemeral
X25519 key pair when a migration is prepared and hands out its public key
(``POST /v1/vms/ID/migration``); the destination makes its own when it is
asked to wait (``POST /v1/vms/incoming``) and answers with its public key;
the source gets it with ``POST /v1/vms/ID/migrate``. Each side derives the
same :class:`MigrationKeys` with HKDF-SHA256 over the X25519 shared secret,
bound to the VM's id and both public keys (source first): qemu's TLS
pre-shared key and the relays' admission key. A wrong or forged public key
on either side gives two different key sets: the destination's relay refuses
the source's connections and the migration fails, the VM running on at the
source.

Admission (the destination's relay owns the TCP ports; qemu listens on unix
sockets only the daemon reaches): on each connection the relay sends
:data:`MAGIC` and a fresh :data:`NONCE_BYTES`-byte nonce; the peer must answer
with exactly :data:`PROOF_BYTES` bytes, HMAC-SHA256 under the admission key of
the channel's name and the nonce (:func:`proof`), within the relay's deadline;
then the relay sends :data:`ADMITTED` and relays bytes both ways. Anything
else is refused: the connection is closed, nothing reached qemu. A nonce is
never reused, so a recorded answer admits nothing later, and a proof for one
channel (``disk``) is not one for the other (``memory``).

Invariants: nothing here touches a socket, a file or a clock; the secret
halves of key pairs never leave this module's objects except as derived keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vm.exceptions import VmConfigError

MAGIC = b"swarm-migrate/1\n"  # the relay's greeting, before its nonce
NONCE_BYTES = 32
PROOF_BYTES = 32  # the whole of what a peer may send before it is admitted
ADMITTED = b"+"  # the relay's answer to a good proof (a refused peer gets EOF)
CHANNELS = ("disk", "memory")  # the NBD stream and the memory stream
PUBLIC_KEY_BYTES = 32
_INFO = b"swarm-grid vm migration v1"
_ADMIT = b"swarm-grid vm migration admission v1"
_HEX_KEY = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class MigrationKeys:
    """What both ends of one migration derive (never sent anywhere)."""

    psk: str  # 64 hex digits: qemu's tls-creds-psk key (NBD and memory streams)
    admission: bytes  # 32 bytes: the relays' HMAC key

    def __repr__(self) -> str:  # a log line or a traceback never shows them
        return "MigrationKeys(...)"


class KeyPair:
    """One side's ephemeral X25519 key pair for one migration."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public: bytes = self._private.public_key().public_bytes_raw()

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def keys(self, peer: bytes, *, vm_id: str, source: bool, field: str = "key") -> MigrationKeys:
        """The migration's keys, this side being the source if ``source``.

        Raises:
            VmConfigError: ``peer`` is not a usable X25519 public key (a
                low-order point gives no shared secret); names ``field``.
        """
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError:
            raise VmConfigError(f"{field}: not a usable X25519 public key") from None
        src, dst = (self.public, peer) if source else (peer, self.public)
        return derive_keys(shared, vm_id=vm_id, source_public=src, destination_public=dst)


def derive_keys(
    shared: bytes, *, vm_id: str, source_public: bytes, destination_public: bytes
) -> MigrationKeys:
    """HKDF-SHA256 of the X25519 shared secret, bound to the VM and both public keys."""
    info = b"\0".join((_INFO, vm_id.encode(), source_public, destination_public))
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(shared)
    return MigrationKeys(psk=okm[:32].hex(), admission=okm[32:])


def parse_public_key(field: str, value: object) -> bytes:
    """A public key as the API carries it: 64 lower-case hex digits.

    Raises:
        VmConfigError: anything else (names ``field``).
    """
    if not isinstance(value, str) or not _HEX_KEY.match(value):
        raise VmConfigError(f"{field}: expected an X25519 public key (64 lower-case hex digits)")
    return bytes.fromhex(value)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def greeting(nonce: bytes) -> bytes:
    """What the relay sends first on a connection."""
    return MAGIC + nonce


def nonce_of(greeting: bytes) -> bytes | None:
    """The nonce of a relay's greeting, or None if it is not one."""
    if len(greeting) != len(MAGIC) + NONCE_BYTES or not greeting.startswith(MAGIC):
        return None
    return greeting[len(MAGIC) :]


def proof(key: bytes, channel: str, nonce: bytes) -> bytes:
    """The answer that admits a peer holding ``key`` to ``channel``."""
    if channel not in CHANNELS:
        raise ValueError(f"channel {channel!r} is not one of {CHANNELS}")
    msg = b"\0".join((_ADMIT, channel.encode(), nonce))
    return hmac.new(key, msg, hashlib.sha256).digest()


def admits(key: bytes, channel: str, nonce: bytes, answer: bytes) -> bool:
    """Does ``answer`` prove ``key`` for ``channel`` and this ``nonce``? (constant time)"""
    return hmac.compare_digest(answer, proof(key, channel, nonce))
