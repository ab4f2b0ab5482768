"""v2 torrent files: made and checked by libtorrent, refused unless v2-only.

Torrents are v2 only (BEP 52): every file has its own SHA-256 merkle tree
whose root is in the info dictionary, and the info dictionary's SHA-256 (the
v2 info-hash) is what the signed TUF target names.  A hybrid or v1 torrent is
refused, since its SHA-1 piece hashes would be a second, weaker way to accept
bytes.  So is a torrent that names trackers or DHT nodes: peers come only from
the node's configured bootstrap nodes, the DHT they seed and LSD.

Layout (BEP 52 and libtorrent's ``file_storage``): each file starts on a piece
boundary.  libtorrent represents the gap after a file as a *pad file*
(``NAME/.pad/N``, ``flag_pad_file``) in its file list, so libtorrent file
indices and :attr:`TorrentMeta.files` indices differ; ``TorrentMeta.files``
never lists pad files.  A file of ``size`` bytes starting at piece ``p`` covers
pieces ``p .. p + ceil(size / piece_length) - 1``; an empty file covers none.

Paths: a torrent of exactly one file is a *single-file* torrent (libtorrent
makes every one-file torrent one), stored at ``SAVE_PATH/NAME``, and its
``TorrentFile.path`` is ``NAME``.  Otherwise the files are stored at
``SAVE_PATH/NAME/PATH`` and ``TorrentFile.path`` is ``PATH`` (relative to the
torrent's directory, ``/``-separated, as in the file tree).

Web seeds (BEP 19 ``url-list``): give a *directory* URL ending in ``/``.
libtorrent fetches each file at ``URL + NAME + "/" + PATH`` (multi-file) or
``URL + NAME`` (single file), percent-escaping the path, with HTTP ranges.
So an HTTP server whose document root is ``STORE`` and which holds the
files at ``STORE/NAME/PATH`` (or ``STORE/NAME``) is a web seed with
``URL = http://host:port/``.  (A v2 single-file torrent usually has a tail pad
file, which makes libtorrent treat it as multi-file and always append the
path; a URL that names the file itself would therefore break, hence the rule
"always a directory URL".)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import libtorrent as lt

from swarm.exceptions import TransferError
from swarm.transfer import TorrentFile, TorrentMeta

BLOCK_SIZE = 16 * 1024


def _check_relative(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise TransferError(f"file path {path!r} must be relative, without '.' or '..'")
    return p


def create_torrent(
    root: Path,
    files: Sequence[str],
    *,
    name: str,
    piece_length: int = 256 * 1024,
    web_seeds: Sequence[str] = (),
) -> TorrentMeta:
    """A v2-only torrent of ``root/f`` for each ``f`` in ``files``, hashed by libtorrent.

    One file makes a single-file torrent named ``name`` (stored as ``NAME``);
    several make a directory ``NAME`` holding each file at its relative path.
    The .torrent includes the piece layers of every file larger than a piece,
    so a peer needs nothing but the torrent to verify every block.
    ``web_seeds`` are directory URLs (see the module docstring).  Blocking:
    it reads every byte, so call it off the event loop.

    Raises :class:`TransferError` for a bad name, path or piece length, a
    missing or unreadable file.
    """
    if not name or "/" in name or name in (".", ".."):
        raise TransferError(f"torrent name {name!r} must be one path component")
    if piece_length < BLOCK_SIZE or piece_length & (piece_length - 1):
        raise TransferError(f"piece length {piece_length} must be a power of two >= 16 KiB")
    if not files:
        raise TransferError("a torrent needs at least one file")
    if len(set(files)) != len(files):
        raise TransferError("duplicate file paths")
    relative = [_check_relative(f) for f in files]
    sources = [root / f for f in relative]
    for src in sources:
        if not src.is_file():
            raise TransferError(f"{src} is not a regular file")
    single = len(files) == 1
    torrent_paths = [name] if single else [f"{name}/{f}" for f in relative]
    entries = [
        lt.create_file_entry(tp, src.stat().st_size)
        for tp, src in zip(torrent_paths, sources, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="swarm-torrent-") as stage:
        # libtorrent reads each file at STAGE/<torrent path>; a symlink makes
        # that path lead to the caller's file wherever it lives.
        if single:
            os.symlink(sources[0].resolve(), Path(stage) / name)
        else:
            os.symlink(root.resolve(), Path(stage) / name, target_is_directory=True)
        try:
            ct = lt.create_torrent(entries, piece_length, lt.create_torrent.v2_only)
            lt.set_piece_hashes(ct, stage)
        except RuntimeError as exc:
            raise TransferError(f"cannot hash files for torrent {name!r}: {exc}") from exc
    for url in web_seeds:
        ct.add_url_seed(url)
    entry = ct.generate()
    # No creation date: the same files give the same .torrent bytes.
    entry.pop(b"creation date", None)
    return parse_torrent(lt.bencode(entry))


def _bdecode_dict(data: bytes) -> dict[bytes, Any]:
    try:
        decoded: Any = lt.bdecode(data)
    except RuntimeError as exc:
        raise TransferError(f"not a torrent (bdecode failed: {exc})") from exc
    if not isinstance(decoded, dict) or not isinstance(decoded.get(b"info"), dict):
        raise TransferError("not a torrent (no info dictionary)")
    return decoded


def load_info(data: bytes) -> Any:
    """libtorrent's ``torrent_info`` of a validated v2 torrent (untyped: libtorrent's).

    Raises :class:`TransferError` like :func:`parse_torrent`.
    """
    decoded = _bdecode_dict(data)
    info = decoded[b"info"]
    if info.get(b"meta version") != 2:
        raise TransferError("not a BitTorrent v2 torrent (info has no 'meta version' 2)")
    if b"pieces" in info:
        raise TransferError("hybrid v1/v2 torrent refused: v2-only torrents are required")
    for key in (b"announce", b"announce-list", b"nodes"):
        if key in decoded:
            raise TransferError(
                f"torrent names {key.decode()!r}: trackers and DHT nodes are refused"
            )
    try:
        ti = lt.torrent_info(data)
    except RuntimeError as exc:
        raise TransferError(f"invalid v2 torrent: {exc}") from exc
    hashes = ti.info_hashes()
    if hashes.has_v1() or not hashes.has_v2():
        raise TransferError("not a v2-only torrent")
    return ti


def stored_paths(ti: Any) -> list[str]:
    """Where each file of :attr:`TorrentMeta.files` is stored, relative to
    the save path, in the same order (libtorrent's paths without pad files)."""
    fs = ti.layout()
    return [
        str(fs.file_path(i))
        for i in range(fs.num_files())
        if not fs.file_flags(i) & lt.file_storage.flag_pad_file
    ]


def parse_torrent(data: bytes) -> TorrentMeta:
    """Parse and validate a v2-only .torrent (bytes) into :class:`TorrentMeta`.

    libtorrent checks the file tree and that each piece layer hashes to its
    file's root; we also require a piece layer for every file larger than a
    piece (so no peer is needed to learn the hashes).

    Raises :class:`TransferError` naming what is wrong: not bencoded, v1 or
    hybrid, malformed v2 metadata, invalid or missing piece layers.
    """
    ti = load_info(data)
    info_bytes = bytes(ti.info_section())
    info_hash = hashlib.sha256(info_bytes).hexdigest()
    if info_hash != ti.info_hashes().v2.to_bytes().hex():
        raise TransferError("info-hash mismatch between libtorrent and the info dictionary")
    layers = _bdecode_dict(data).get(b"piece layers", {})
    if not isinstance(layers, dict):
        raise TransferError("'piece layers' is not a dictionary")
    piece_length = int(ti.piece_length())
    name = str(ti.name())
    fs = ti.layout()
    files: list[TorrentFile] = []
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        size = int(fs.file_size(i))
        lt_path = str(fs.file_path(i))
        path = lt_path.removeprefix(name + "/") if lt_path != name else name
        root = fs.root(i).to_bytes() if size else b""
        if size > piece_length and root not in layers:
            raise TransferError(f"torrent lacks the piece layer of {path!r}")
        files.append(
            TorrentFile(
                path=path,
                size=size,
                pieces_root=root.hex(),
                first_piece=int(fs.file_offset(i)) // piece_length,
                num_pieces=-(-size // piece_length),
            )
        )
    return TorrentMeta(
        data=bytes(data),
        info_hash=info_hash,
        name=name,
        piece_length=piece_length,
        files=tuple(files),
    )
