"""A minimal bencoder (BEP 3), written from the spec.

Independent of libtorrent, so tests that check libtorrent's torrents do not
trust libtorrent's own encoder, and the benchmark can build v1 torrents and
tracker answers for other BitTorrent clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Read-only views (covariant), so that e.g. a dict[bytes, bytes] is accepted.
Bencodable = (
    int
    | bytes
    | str
    | Sequence["Bencodable"]
    | Mapping[bytes, "Bencodable"]
    | Mapping[str, "Bencodable"]
)


def bencode(value: Bencodable) -> bytes:
    """BEP 3 encoding; dictionary keys (str or bytes) sorted as raw bytes.

    Raises ``TypeError`` for what bencode cannot express (booleans included).
    """
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list | tuple):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, Mapping):
        items = sorted((k.encode() if isinstance(k, str) else k, v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")
