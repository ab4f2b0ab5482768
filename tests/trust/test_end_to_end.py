"""Publisher and node together over real files and a real HTTP server on
127.0.0.1: RepositoryWriter output is what TrustedRepository and the
conformance CLI accept, including across key rotations."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root, TargetFile

from trust.client import TrustedRepository
from trust.conformance import main as conformance_main
from trust.exceptions import SignatureError
from trust.keys import init_keys
from trust.repository import RepositoryWriter, rotate_key
from trust.targets import ReleaseTarget


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on 127.0.0.1; yields (directory, base URL)."""
    root = tmp_path / "www"
    (root / "metadata").mkdir(parents=True)
    (root / "targets").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    init_keys(path, "sft.example.org")
    return path


def _publish_file(www: Path, writer: RepositoryWriter, name: str, content: bytes) -> None:
    target = TargetFile.from_data(name, content, ["sha256"])
    dirname, _, basename = name.rpartition("/")  # TUF 5.7.3: <dir>/<hash>.<basename>
    path = www / "targets" / dirname / f"{target.hashes['sha256']}.{basename}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    writer.commit({name: target})


def _release(revision: int) -> TargetFile:
    return ReleaseTarget(revision, "cd" * 32, 42, 1_700_000_000).to_target_file()


def test_node_follows_publisher_through_root_rotation(
    www: tuple[Path, str], keydir: Path, tmp_path: Path
) -> None:
    root_dir, base = www
    meta = root_dir / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/1": _release(1)})
    node = TrustedRepository(
        tmp_path / "node", base + "metadata/", trusted_root=(keydir / "root.json").read_bytes()
    )
    node.refresh()
    latest = node.latest_release()
    assert latest is not None and latest.revision == 1

    for role in ("root", "targets", "snapshot", "timestamp"):
        rotate_key(keydir, meta, role)
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/2": _release(2)})
    node.refresh()  # walks 2.root.json .. 5.root.json from the old root
    latest = node.latest_release()
    assert latest is not None and latest.revision == 2
    cached_root = Metadata[Root].from_bytes((tmp_path / "node" / "root.json").read_bytes())
    assert cached_root.signed.version == 5


def test_root_signed_by_old_keys_only_is_refused(
    www: tuple[Path, str], keydir: Path, tmp_path: Path
) -> None:
    root_dir, base = www
    meta = root_dir / "metadata"
    with RepositoryWriter.open(meta, keydir) as w:
        w.commit({"revisions/1": _release(1)})
    node = TrustedRepository(
        tmp_path / "node", base + "metadata/", trusted_root=(keydir / "root.json").read_bytes()
    )
    node.refresh()
    rotate_key(keydir, meta, "root")
    # strip the new root key's signature from 2.root.json: only the old key signed
    md = Metadata[Root].from_bytes((meta / "2.root.json").read_bytes())
    new_ids = set(md.signed.roles["root"].keyids)
    for keyid in new_ids:
        md.signatures.pop(keyid, None)
    (meta / "2.root.json").write_bytes(md.to_bytes())
    with pytest.raises(SignatureError):
        node.refresh()
    assert node.targets_version == 1


def test_conformance_cli_init_refresh_download(
    www: tuple[Path, str], keydir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root_dir, base = www
    with RepositoryWriter.open(root_dir / "metadata", keydir) as w:
        _publish_file(root_dir, w, "dir/artifact.txt", b"artifact bytes")
    mdir = str(tmp_path / "client")
    common = ["--metadata-dir", mdir, "--metadata-url", base + "metadata"]
    assert conformance_main(["--metadata-dir", mdir, "init", str(keydir / "root.json")]) == 0
    assert conformance_main([*common, "refresh"]) == 0
    for role in ("timestamp", "snapshot", "targets"):
        assert (tmp_path / "client" / f"{role}.json").exists()
    download = [
        *common,
        "--target-name",
        "dir/artifact.txt",
        "--target-base-url",
        base + "targets/",
        "--target-dir",
        str(tmp_path / "artifacts"),
        "download",
    ]
    assert conformance_main(download) == 0
    files = list((tmp_path / "artifacts").iterdir())
    assert [f.read_bytes() for f in files] == [b"artifact bytes"]

    # a tampered artifact is refused with exit status 1 and a reason
    for f in (root_dir / "targets" / "dir").iterdir():
        f.write_bytes(b"tampered bytes")
    files[0].unlink()
    assert conformance_main(download) == 1
    assert "HashMismatchError" in capsys.readouterr().err
    assert not files[0].exists()

    # missing target and unreachable repository fail too
    assert conformance_main([*download[:5], "nope", *download[6:]]) == 1
    assert conformance_main([*common[:2], "--metadata-url", "http://127.0.0.1:9/", "refresh"]) == 1
