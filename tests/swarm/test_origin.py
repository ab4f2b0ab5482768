"""The HTTP origin and the HTTP object source, against real loopback servers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from cvmfs_like.exceptions import ObjectUnavailable
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.origin_client import OriginObjectSource
from swarm_testing.waiting import eventually
from tests.harness import MountProcess, OriginServer
from tests.trees import build_sample_tree
from trust.keys import init_keys

REPO = "sw.example.org"


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, Path, OriginStore]:
    keys = tmp_path / "keys"
    root = init_keys(keys, REPO)
    store = OriginStore(tmp_path / "store", REPO)
    publish(build_sample_tree(tmp_path / "src"), store, keys)
    return tmp_path / "store", root, store


@pytest.fixture
def origin(published: tuple[Path, Path, OriginStore]) -> Iterator[OriginServer]:
    with OriginServer(published[0]) as server:
        yield server


def any_object(store: OriginStore) -> Path:
    return next(p for p in store.data_dir.glob("*/*") if p.stat().st_size > 1000)


def test_objects_metadata_and_ranges_are_served_with_cache_headers(
    origin: OriginServer, published: tuple[Path, Path, OriginStore]
) -> None:
    obj = any_object(published[2])
    http = urllib3.PoolManager()
    url = f"{origin.url}{REPO}/data/{obj.parent.name}/{obj.name}"
    r = http.request("GET", url)
    assert r.status == 200 and r.data == obj.read_bytes()
    assert "immutable" in r.headers["Cache-Control"]
    r = http.request("GET", url, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.data == obj.read_bytes()[10:20]
    r = http.request("GET", f"{origin.url}{REPO}/metadata/timestamp.json")
    assert r.status == 200 and r.headers["Cache-Control"] == "no-cache"
    assert http.request("GET", f"{origin.url}{REPO}/metadata/1.root.json").status == 200


@pytest.mark.parametrize(
    "path",
    [
        f"{REPO}/.publish/state.sqlite",
        f"{REPO}/metadata/.lock",
        f"{REPO}/data/%2e%2e/metadata/timestamp.json",
        f"{REPO}/data/ab/not-a-digest",
        "../etc/passwd",
        f"{REPO}/data/00/{'0' * 64}",
    ],
)
def test_nothing_but_metadata_and_objects_is_served(origin: OriginServer, path: str) -> None:
    r = urllib3.PoolManager().request("GET", origin.url + path)
    assert r.status == 404


def test_object_source_refuses_an_endless_body(
    origin: OriginServer, published: tuple[Path, Path, OriginStore]
) -> None:
    obj = any_object(published[2])
    source = OriginObjectSource(origin.url, REPO, timeout=5)
    assert source.fetch(obj.name, obj.stat().st_size) == obj.read_bytes()
    with pytest.raises(ObjectUnavailable, match="more than 100 bytes"):
        source.fetch(obj.name, 100)
    with pytest.raises(ObjectUnavailable, match="HTTP 404"):
        source.fetch("0" * 64, 10)


def test_object_source_gives_up_on_a_silent_server() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        source = OriginObjectSource(f"http://127.0.0.1:{port}/", REPO, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ObjectUnavailable):
            source.fetch("a" * 64, 10)
        assert time.monotonic() - started < 4
    finally:
        silent.close()


@pytest.mark.nginx
@pytest.mark.fuse
def test_the_store_works_as_plain_files_behind_nginx(
    tmp_path: Path, published: tuple[Path, Path, OriginStore]
) -> None:
    store_dir, root_json, _ = published
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""daemon off;
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/nginx-tmp;
    proxy_temp_path {tmp_path}/nginx-tmp;
    fastcgi_temp_path {tmp_path}/nginx-tmp;
    uwsgi_temp_path {tmp_path}/nginx-tmp;
    scgi_temp_path {tmp_path}/nginx-tmp;
    server {{ listen 127.0.0.1:{port}; root {store_dir}; }}
}}
"""
    )
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(tmp_path / "nginx-error.log")])
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        eventually("nginx to listen", listening, 10)
        with MountProcess(
            REPO, tmp_path / "mnt", f"http://127.0.0.1:{port}/", root_json, tmp_path / "cache"
        ) as m:
            out = subprocess.run([str(m.mountpoint / "bin/hello")], capture_output=True, text=True)
            assert out.stdout == "hello from revision 1\n"
    finally:
        nginx.terminate()
        nginx.wait(10)
