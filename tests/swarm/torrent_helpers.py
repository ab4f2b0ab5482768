"""Independent checks for torrent tests: a minimal bencoder, the span of the info
dictionary, and BEP 52 merkle roots, written from the specs so the tests do not
trust libtorrent to check libtorrent."""

from __future__ import annotations

import hashlib

BLOCK = 16 * 1024

Bencodable = int | bytes | str | list["Bencodable"] | dict[bytes, "Bencodable"]


def bencode(value: Bencodable) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(value[k]) for k in sorted(value)) + b"e"


def skip_value(data: bytes, i: int) -> int:
    """Index just past the bencoded value starting at ``i``."""
    c = data[i : i + 1]
    if c == b"i":
        return data.index(b"e", i) + 1
    if c in (b"l", b"d"):
        i += 1
        while data[i : i + 1] != b"e":
            i = skip_value(data, i)
        return i + 1
    colon = data.index(b":", i)
    return colon + 1 + int(data[i:colon])


def info_span(torrent: bytes) -> bytes:
    """The exact bytes of the top-level ``info`` value of a bencoded torrent."""
    assert torrent[:1] == b"d"
    i = 1
    while torrent[i : i + 1] != b"e":
        key_end = skip_value(torrent, i)
        key = torrent[torrent.index(b":", i) + 1 : key_end]
        value_end = skip_value(torrent, key_end)
        if key == b"info":
            return torrent[key_end:value_end]
        i = value_end
    raise KeyError("info")


def merkle_root(content: bytes) -> str:
    """BEP 52 pieces root of a non-empty file: SHA-256 of 16 KiB blocks, leaves
    padded with zero hashes to a power of two, hashed pairwise up to the root."""
    leaves = [
        hashlib.sha256(content[i : i + BLOCK]).digest() for i in range(0, len(content), BLOCK)
    ]
    width = 1
    while width < len(leaves):
        width *= 2
    layer = leaves + [bytes(32)] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0].hex()
