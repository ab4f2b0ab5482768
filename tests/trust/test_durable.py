"""The one atomic file write (``trust/durable.py``), on a real file system."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from trust import durable
from trust.keys import write_file_atomic  # where its users have always imported it


def test_concurrent_atomic_writes_of_one_file_never_tear_or_fail(tmp_path: Path) -> None:
    """Threads of one process (a node refreshing a repository from its loop
    and from the API) replacing the same file: each write succeeds and the
    file always holds one whole version, never a mix of two."""
    path = tmp_path / "state.json"
    versions = [bytes([65 + i]) * (4096 * (i + 1)) for i in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(versions))

    def writer(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(200):
                write_file_atomic(path, data, mode=0o600)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    seen: set[bytes] = set()
    while any(t.is_alive() for t in threads):
        if path.exists():
            seen.add(path.read_bytes())
    for t in threads:
        t.join()
    assert errors == []
    assert seen | {path.read_bytes()} <= set(versions)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    durable.write_file_atomic(path, b"old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)  # the module calls os.fsync
    with pytest.raises(OSError, match="Input/output error"):
        durable.write_file_atomic(path, b"new\n")
    assert path.read_bytes() == b"old\n"
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]
