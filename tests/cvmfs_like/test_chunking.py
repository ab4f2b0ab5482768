"""Content-defined chunking: the cuts cover the input exactly, respect the
size bounds, and stay put around an edit (which is what makes it worth it)."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest

from cvmfs_like.chunking import (
    AVG_CHUNK,
    MAX_CHUNK,
    MIN_CHUNK,
    ChunkSpan,
    cut_bytes,
    cut_file,
    cut_stream,
)

MiB = 1 << 20


def _random(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _spans(chunks: list[ChunkSpan]) -> list[tuple[int, int]]:
    return [(c.offset, len(c.data)) for c in chunks]


def _digests(data: bytes) -> list[str]:
    return [hashlib.sha256(c.data).hexdigest() for c in cut_bytes(data)]


def test_chunks_are_contiguous_and_reassemble_to_the_input() -> None:
    data = _random(48 * MiB)
    chunks = list(cut_bytes(data))
    assert len(chunks) > 1
    offset = 0
    for c in chunks:
        assert c.offset == offset
        offset += len(c.data)
    assert offset == len(data)
    assert b"".join(bytes(c.data) for c in chunks) == data


def test_chunk_sizes_respect_min_and_max_and_average_near_the_target() -> None:
    sizes = [n for _, n in _spans(list(cut_bytes(_random(96 * MiB))))]
    assert all(MIN_CHUNK <= n <= MAX_CHUNK for n in sizes[:-1]), sizes
    assert 0 < sizes[-1] <= MAX_CHUNK
    # FastCDC's normalised average lands a little above AVG_CHUNK (see the module).
    mean = sum(sizes) / len(sizes)
    assert AVG_CHUNK / 2 <= mean <= 2 * AVG_CHUNK, sizes


def test_data_without_content_boundaries_is_cut_at_the_maximum() -> None:
    sizes = [n for _, n in _spans(list(cut_bytes(bytes(40 * MiB))))]
    assert sizes[:-1] == [MAX_CHUNK] * (len(sizes) - 1)
    assert sum(sizes) == 40 * MiB and sizes[-1] <= MAX_CHUNK


@pytest.mark.parametrize("size", [0, 1, 1000, MIN_CHUNK - 1, MIN_CHUNK, MIN_CHUNK + 1])
def test_empty_and_tiny_inputs(size: int) -> None:
    data = _random(size)
    chunks = list(cut_bytes(data))
    assert _spans(chunks) == ([(0, size)] if size else [])
    assert b"".join(bytes(c.data) for c in chunks) == data


def test_an_insertion_changes_only_the_chunks_around_it() -> None:
    data = _random(64 * MiB)
    at = 30 * MiB + 12345
    edited = data[:at] + b"inserted bytes" * 100 + data[at:]
    before, after = _digests(data), _digests(edited)
    assert len(before) >= 8
    changed = set(after) - set(before)
    # The chunk holding the insertion changes (and at most the next one,
    # until the cuts resynchronise); every chunk before and after is shipped
    # by its old hash.
    assert 1 <= len(changed) <= 2, (len(before), len(changed))
    assert len(set(before) & set(after)) >= len(before) - 2
    first_changed = next(i for i, d in enumerate(after) if d in changed)
    assert after[:first_changed] == before[:first_changed]


def test_file_stream_and_buffer_are_cut_alike(tmp_path: Path) -> None:
    data = _random(40 * MiB, seed=3)
    path = tmp_path / "big"
    path.write_bytes(data)
    want = _spans(list(cut_bytes(data)))
    assert _spans(list(cut_file(path))) == want
    # A stream's span is valid only until the next one: copy it as it goes.
    streamed = [(c.offset, bytes(c.data)) for c in cut_stream(io.BytesIO(data))]
    assert [(o, len(d)) for o, d in streamed] == want
    assert b"".join(d for _, d in streamed) == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert list(cut_file(empty)) == []
