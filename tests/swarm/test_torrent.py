"""swarm.torrent: v2 torrents made and checked by libtorrent, and real libtorrent
sessions talking to each other (and to an HTTP web seed) on 127.0.0.1."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from swarm.exceptions import TransferError
from swarm.torrent import create_torrent, parse_torrent
from tests.swarm.torrent_helpers import bencode, info_span, merkle_root, skip_value

PIECE = 64 * 1024


def write_random(path: Path, size: int, seed: int = 0) -> bytes:
    data = hashlib.shake_256(b"%d:%d" % (seed, size)).digest(size) if size else b""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


# -- create / parse ---------------------------------------------------------


def test_multi_file_torrent_is_v2_only_with_independently_checked_roots(tmp_path: Path) -> None:
    src = tmp_path / "src"
    contents = {
        "a.bin": write_random(src / "a.bin", 300_000, 1),
        "sub/b.bin": write_random(src / "sub/b.bin", 70_000, 2),
        "tiny": write_random(src / "tiny", 10, 3),
        "empty": write_random(src / "empty", 0),
    }
    meta = create_torrent(
        src, list(contents), name="rel", piece_length=PIECE, web_seeds=["http://127.0.0.1:9/"]
    )
    assert meta.name == "rel" and meta.piece_length == PIECE
    assert meta.info_hash == hashlib.sha256(info_span(meta.data)).hexdigest()
    assert b"4:infod" in meta.data and b"6:pieces" not in info_span(meta.data)
    assert b"12:piece layers" in meta.data and b"8:url-list" in meta.data
    assert sorted(f.path for f in meta.files) == sorted(contents)  # no pad files
    covered: set[int] = set()
    for f in meta.files:
        content = contents[f.path]
        assert f.size == len(content)
        assert f.pieces_root == (merkle_root(content) if content else "")
        assert f.num_pieces == -(-len(content) // PIECE)
        span = set(range(f.first_piece, f.first_piece + f.num_pieces))
        assert not span & covered  # every file starts on its own piece
        covered |= span
    assert parse_torrent(meta.data) == meta


def test_one_file_makes_a_single_file_torrent_named_as_asked(tmp_path: Path) -> None:
    content = write_random(tmp_path / "images" / "disk.raw", 200_000)
    meta = create_torrent(tmp_path / "images", ["disk.raw"], name="vm.img", piece_length=PIECE)
    (f,) = meta.files
    assert (f.path, f.size, f.first_piece, f.num_pieces) == ("vm.img", 200_000, 0, 4)
    assert f.pieces_root == merkle_root(content)
    # Same bytes, same torrent: no creation date or other noise in the info-hash.
    again = create_torrent(tmp_path / "images", ["disk.raw"], name="vm.img", piece_length=PIECE)
    assert again.data == meta.data


def test_v1_hybrid_and_garbage_are_refused_with_a_reason(tmp_path: Path) -> None:
    v1 = bencode(
        {
            b"info": {
                b"name": b"x",
                b"length": 3,
                b"piece length": PIECE,
                b"pieces": hashlib.sha1(b"abc").digest(),
            }
        }
    )
    with pytest.raises(TransferError, match="v2"):
        parse_torrent(v1)
    write_random(tmp_path / "f", 1000)
    meta = create_torrent(tmp_path, ["f"], name="f", piece_length=PIECE)
    length = b"12:piece lengthi%de" % PIECE
    hybrid = meta.data.replace(length, length + b"6:pieces20:" + bytes(20))
    with pytest.raises(TransferError, match="hybrid"):
        parse_torrent(hybrid)
    with pytest.raises(TransferError, match="not a torrent"):
        parse_torrent(b"garbage")
    with pytest.raises(TransferError, match="not a torrent"):
        parse_torrent(bencode({b"announce": b"http://x/"}))


def test_tampered_or_missing_piece_layers_are_refused(tmp_path: Path) -> None:
    write_random(tmp_path / "big", 5 * PIECE)
    meta = create_torrent(tmp_path, ["big"], name="big", piece_length=PIECE)
    root = bytes.fromhex(meta.files[0].pieces_root)
    at = meta.data.index(root + b"160:") + len(root) + 4  # 5 piece hashes of 32 bytes
    tampered = meta.data[:at] + bytes([meta.data[at] ^ 1]) + meta.data[at + 1 :]
    with pytest.raises(TransferError, match="piece layer"):
        parse_torrent(tampered)
    start = meta.data.index(b"12:piece layers")
    end = skip_value(meta.data, skip_value(meta.data, start))  # the key, then its value
    stripped = meta.data[:start] + meta.data[end:]
    with pytest.raises(TransferError, match="lacks the piece layer"):
        parse_torrent(stripped)


def test_bad_inputs_to_create_raise_transfer_error(tmp_path: Path) -> None:
    write_random(tmp_path / "f", 10)
    for files, name, piece in [
        (["missing"], "x", PIECE),
        (["../f"], "x", PIECE),
        (["f"], "a/b", PIECE),
        (["f"], "x", 3000),
        ([], "x", PIECE),
    ]:
        with pytest.raises(TransferError):
            create_torrent(tmp_path, files, name=name, piece_length=piece)
