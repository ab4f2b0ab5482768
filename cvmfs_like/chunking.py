"""Content-defined chunking of large files.

Files above :data:`CHUNK_THRESHOLD` are cut with FastCDC (gear hash) so that a
change inside a large file re-ships only the chunks around it.  CVMFS uses
4/8/16 MiB min/avg/max; the FastCDC implementation bounds the minimum at
1 MiB and the normalised average to 4 MiB, so chunks here are 1 MiB minimum,
about 5 MiB on average and 16 MiB at most.  Parameters are part of the format:
changing them changes chunk boundaries (not correctness) and so deduplication.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyfastcdc

MIN_CHUNK = 1 << 20
AVG_CHUNK = 4 << 20
MAX_CHUNK = 16 << 20
CHUNK_THRESHOLD = 8 << 20  # files larger than this are chunked


@dataclass(frozen=True)
class ChunkSpan:
    offset: int
    data: memoryview


def _chunker() -> pyfastcdc.FastCDC:
    return pyfastcdc.FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)


def cut_file(path: Path | str) -> Iterator[ChunkSpan]:
    """Yield the chunks of the file at ``path`` (memory-mapped, zero copy)."""
    for chunk in _chunker().cut_file(str(path)):
        yield ChunkSpan(chunk.offset, chunk.data)


def cut_stream(stream: BinaryIO) -> Iterator[ChunkSpan]:
    """Yield the chunks of a stream; each span's data is valid until the next."""
    for chunk in _chunker().cut_stream(stream):
        yield ChunkSpan(chunk.offset, chunk.data)


def cut_bytes(data: bytes | memoryview) -> Iterator[ChunkSpan]:
    """Yield the chunks of an in-memory buffer (same boundaries as cut_file)."""
    for chunk in _chunker().cut_buf(data):
        yield ChunkSpan(chunk.offset, chunk.data)
