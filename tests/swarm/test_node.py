"""The node daemon on a simulated swarm (tests/fake_swarm.py): metadata and
torrents exchanged between peers, objects through the swarm, image policy,
the HTTP API.  No FUSE: reads go through the node's namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cvmfs_like.exceptions import ObjectVerificationError
from cvmfs_like.namespace import Namespace
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.config import parse_config
from swarm.daemon import build_node
from swarm.exceptions import ConfigError
from swarm.node import Node
from swarm.release_torrent import torrent_extension
from swarm.status import NodeStatus, render
from swarm.torrent import parse_torrent
from swarm_testing.waiting import eventually_async
from tests.fake_swarm import FakeWorld
from tests.harness import OriginServer
from tests.trees import build_sample_tree
from trust.keys import init_keys
from trust.policy import ImagePolicy

REPO = "sw.example.org"


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        self.root_json = init_keys(self.keys, REPO)
        self.store = OriginStore(tmp / "store", REPO)
        self.src = build_sample_tree(tmp / "src", large_mib=2)
        self.publish()
        self.origin = OriginServer(tmp / "store").start()
        self.world = FakeWorld(tmp / "store")
        self.peer_port = _free_port()

    def publish(self) -> None:
        publish(
            self.src,
            self.store,
            self.keys,
            nest_threshold=8,
            extend_target=torrent_extension(self.store),
        )

    def node(
        self,
        i: int,
        *,
        bootstrap: tuple[int, ...] = (),
        policy: str = "",
        fetch_timeout: float = 5,
    ) -> Node:
        host = f"127.0.0.{i + 2}"
        boot = ", ".join(f'"127.0.0.{b + 2}:6881"' for b in bootstrap)
        cfg = parse_config(
            f"""
data_dir = "{self.tmp}/node{i}"
listen = "{host}:6881"
api = "{host}:0"
peer = "{host}:{self.peer_port}"
bootstrap = [{boot}]
refresh_interval = 3600
fetch_timeout = {fetch_timeout}
[repositories."{REPO}"]
origin = "{self.origin.url}"
trust = "{self.root_json}"
{policy}
"""
        )
        return build_node(
            cfg,
            self.world.session(f"{host}:6881"),
            parse_torrent=parse_torrent,
            image_policy=ImagePolicy.from_table({}),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[Node]:
    try:
        await node.start()
        yield node
    finally:
        await node.stop()


def read_file(ns: Namespace, path: str) -> bytes:
    entry = ns.lookup(path.encode())
    assert entry is not None, path
    fh = ns.open(entry)
    try:
        return ns.read(fh, 0, entry.size)
    finally:
        ns.release(fh)


def test_node_reads_a_release_through_the_swarm_with_the_origin_as_web_seed(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            st = a.repo_status(REPO)
            assert st.revision == 1 and st.torrents
            got = await asyncio.to_thread(read_file, a.namespace, f"{REPO}/bin/hello")
            assert got == (site.src / "bin/hello").read_bytes()
            st = a.repo_status(REPO)
            assert st.objects_from_swarm >= 2  # catalog(s) and the file
            assert st.objects_from_origin == 0

    asyncio.run(main())


def test_a_cached_object_cut_short_is_fetched_again_not_served_by_the_node(site: Site) -> None:
    want = (site.src / "lib/data.bin").read_bytes()
    path = f"{REPO}/lib/data.bin"

    async def main() -> None:
        async with running(site.node(0)) as a:
            assert await asyncio.to_thread(read_file, a.namespace, path) == want
            entry = a.namespace.lookup(path.encode())
            assert entry is not None and entry.object is not None
            cache = a.repos[REPO].cache
        assert (cache.root / "closed-cleanly").exists()  # stopped: a clean close
        os.truncate(cache.path_of(entry.object), 100)
        async with running(site.node(0)) as b:
            assert await asyncio.to_thread(read_file, b.namespace, path) == want
            assert b.repos[REPO].cache.stats()["dropped"] == 1

    asyncio.run(main())


def test_origin_down_a_new_node_gets_metadata_torrent_and_objects_from_a_peer(
    site: Site,
) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            # a learns of revision 2 while the origin is up ...
            (site.src / "NEW").write_bytes(b"revision two\n" * 1000)
            site.publish()
            await a.refresh(REPO)
            assert a.repo_status(REPO).revision == 2
            want = {p: (site.src / p).read_bytes() for p in ("NEW", "bin/hello", "large.bin")}
            for p in want:
                await asyncio.to_thread(read_file, a.namespace, f"{REPO}/{p}")
            # ... then the origin goes away entirely.
            site.origin.stop()
            site.world.origin_up = False
            async with running(site.node(1, bootstrap=(0,))) as b:
                st = b.repo_status(REPO)
                assert st.revision == 2, st.last_error
                assert "127.0.0.2" in st.metadata_from["timestamp.json"]
                for p, data in want.items():
                    assert await asyncio.to_thread(read_file, b.namespace, f"{REPO}/{p}") == data
                assert b.repo_status(REPO).objects_from_origin == 0

    asyncio.run(main())


def test_wrong_bytes_from_the_swarm_never_reach_a_reader(site: Site) -> None:
    # The node checks every object's SHA-256 itself: bytes that got past the
    # swarm's piece check (defeated here: verify_pieces=False) are refused,
    # neither returned nor cached.  The ban of a corrupting peer is libtorrent's,
    # shown for real in test_node_netns.py.
    async def main() -> None:
        async with running(site.node(0)) as a:
            await asyncio.to_thread(read_file, a.namespace, f"{REPO}/large.bin")
            async with running(site.node(1, bootstrap=(0,))) as b:
                hello = await asyncio.to_thread(read_file, b.namespace, f"{REPO}/bin/hello")
                assert hello == (site.src / "bin/hello").read_bytes()
                site.world.sessions[0].corrupt = True
                site.world.verify_pieces = False
                before = b.repo_status(REPO).objects_from_swarm
                with pytest.raises(ObjectVerificationError):
                    await asyncio.to_thread(read_file, b.namespace, f"{REPO}/large.bin")
                entry = b.namespace.lookup(f"{REPO}/large.bin".encode())
                assert entry is not None and entry.object is not None
                assert not b.repos[REPO].cache.contains(entry.object)
                assert b.repo_status(REPO).objects_from_swarm == before + 1

    asyncio.run(main())


def test_api_reads_openly_and_changes_only_with_the_token(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            token = (site.tmp / "node0" / "api.token").read_text().strip()
            assert os.stat(site.tmp / "node0" / "api.token").st_mode & 0o077 == 0
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/v1/status") as r:
                    st = await r.json()
                    assert r.status == 200 and st["repositories"][REPO]["revision"] == 1
                async with http.get(base + "/openapi.json") as r:
                    doc = await r.json()
                    assert "/v1/transfers" in doc["paths"]
                async with http.get(base + "/v1/repositories/nope") as r:
                    assert r.status == 404 and "nope" in (await r.json())["error"]
                url = f"{base}/v1/repositories/{REPO}/refresh"
                async with http.post(url) as r:
                    assert r.status == 401
                async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200 and (await r.json())["revision"] == 1
                async with http.get(base + "/v1/transfers") as r:
                    ts = await r.json()
                    assert ts and ts[0]["what"] == "revision 1"

    asyncio.run(main())


def _conforms(value: object, schema: dict[str, object], where: str) -> None:
    """``value`` is what ``schema`` (OpenAPI 3.0, as swarm.status writes it) says."""
    if value is None:
        assert schema.get("nullable") or schema == {}, f"{where}: null"
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), where
        props = schema.get("properties")
        if isinstance(props, dict):
            assert set(value) == set(props), f"{where}: keys {sorted(value)} != {sorted(props)}"
            for k, v in value.items():
                _conforms(v, props[k], f"{where}.{k}")
        else:
            extra = schema["additionalProperties"]
            assert isinstance(extra, dict), where
            for k, v in value.items():
                _conforms(v, extra, f"{where}.{k}")
    elif kind == "array":
        assert isinstance(value, list), where
        items = schema["items"]
        assert isinstance(items, dict)
        for i, v in enumerate(value):
            _conforms(v, items, f"{where}[{i}]")
    elif kind is not None:
        types: dict[str, type | tuple[type, ...]] = {
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
        }
        assert isinstance(value, types[str(kind)]), f"{where}: {value!r} is not {kind}"


def test_every_api_answer_matches_the_schema_generated_from_its_report(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            await asyncio.to_thread(read_file, a.namespace, f"{REPO}/bin/hello")
            base = f"http://127.0.0.2:{a.api_port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/openapi.json") as r:
                    doc = await r.json()
                for path, ops in doc["paths"].items():
                    if "get" not in ops or path.startswith("/v1/jobs"):
                        continue
                    schema = ops["get"]["responses"]["200"]["content"]["application/json"]
                    schema = schema["schema"]
                    # no more {"type": "object"} saying nothing of the answer
                    described = schema.get("properties") or schema.get("additionalProperties")
                    assert schema.get("type") == "array" or described, path
                    async with http.get(base + path.replace("{name}", REPO)) as r:
                        assert r.status == 200, path
                        _conforms(await r.json(), schema, path)
                async with http.get(base + "/v1/status") as r:
                    st = NodeStatus.from_json(await r.json())  # as `swarm status` reads it
                assert st.repositories[REPO].revision == 1 and st.transfers
                shown = render(st)
                assert any(line.startswith(f"  {REPO}: revision 1 ") for line in shown), shown
                assert any(f"transfer {REPO} revision 1: " in line for line in shown), shown

    asyncio.run(main())


SPEC = """
name = "mc-sim"
command = ["/bin/true", "{first}", "{count}", "{output}"]
cpu_work_per_event = 50.0
max_events = 1000
min_events = 10
safety = 0.8
events_per_task = 10
"""


def test_jobs_are_submitted_through_the_daemon_api(site: Site) -> None:
    from runner.service import job_service_from_config

    async def main() -> None:
        node = site.node(0)
        # A lease too short for min_events: the job is accepted and queued,
        # the pilot refuses to start it, nothing runs.
        node.job_service = job_service_from_config(
            {"cores": 1, "power_per_core": 10.0, "time_left": 1.0, "cgroup_parent": ""},
            site.tmp / "node0",
        )
        async with running(node) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            auth = {"Authorization": f"Bearer {a._token}"}
            async with aiohttp.ClientSession() as http:
                async with http.post(base + "/v1/jobs", data=SPEC) as r:
                    assert r.status == 401
                async with http.post(base + "/v1/jobs", data="name = 3", headers=auth) as r:
                    assert r.status == 400 and "name" in (await r.json())["error"]
                async with http.post(base + "/v1/jobs", data=SPEC, headers=auth) as r:
                    assert r.status == 201
                    job = await r.json()
                async with http.get(base + "/v1/jobs") as r:
                    jobs = await r.json()
                    assert [j["id"] for j in jobs] == [job["id"]]
                async with http.get(base + "/openapi.json") as r:
                    assert "/v1/jobs" in (await r.json())["paths"]

    asyncio.run(main())


def test_a_read_asks_the_swarm_for_exactly_the_pieces_it_needs(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            session = site.world.sessions[0]  # a's
            asked_at_start = len(session.requests)
            await asyncio.to_thread(read_file, a.namespace, f"{REPO}/bin/hello")
            asked = session.requests[asked_at_start:]
            ih = a.repo_status(REPO).torrents["1"]
            transfer = session.get(ih)
            assert transfer is not None
            meta = transfer.meta
            big = next(f for f in meta.files if f.size == 2 << 20)  # large.bin's object
            big_pieces = set(range(big.first_piece, big.first_piece + big.num_pieces))
            assert asked and not big_pieces & {p for _, p in asked}
            assert len(asked) == len(set(asked))  # nothing asked twice
            got = await asyncio.to_thread(read_file, a.namespace, f"{REPO}/large.bin")
            assert got == (site.src / "large.bin").read_bytes()
            assert big_pieces <= {p for _, p in session.requests}

    asyncio.run(main())


def test_images_are_shown_only_from_publishers_the_site_accepts(site: Site) -> None:
    from swarm.images import publish_image

    image = site.tmp / "vm.img"
    image.write_bytes(os.urandom(300_000))
    publish_image(
        image, name="vm", version="1", repo=REPO, keys=site.keys, store=site.tmp / "store"
    )

    async def main() -> None:
        accepted = site.node(0)
        async with running(accepted) as a:
            assert a.namespace.lookup(f".images/{REPO}/vm/1".encode()) is not None
            got = await asyncio.to_thread(read_file, a.namespace, f".images/{REPO}/vm/1")
            assert got == image.read_bytes()
        refusing = site.node(1)
        refusing.image_policy = ImagePolicy.from_table({"accept": []})
        async with running(refusing) as b:
            assert b.namespace.lookup(f".images/{REPO}/vm/1".encode()) is None
            refused = [i for i in b.images() if not i.accepted]
            assert refused and REPO in (refused[0].reason or "")

    asyncio.run(main())


def test_a_failed_metadata_fetch_is_retried_soon_not_after_the_interval(site: Site) -> None:
    async def main() -> None:
        site.origin.stop()
        async with running(site.node(0)) as a:  # refresh_interval is an hour
            assert (a.repo_status(REPO).last_error or "").startswith("metadata")
            site.origin.start_again()

            async def at_revision_1() -> bool:
                return a.repo_status(REPO).revision == 1

            await eventually_async("revision 1", at_revision_1, 10)
            assert a.repo_status(REPO).last_error is None

    asyncio.run(main())


def test_a_metadata_failure_followed_by_a_revision_failure_keeps_the_retry_backoff(
    site: Site,
) -> None:
    # The revision phase fails on every refresh (no such tag); a metadata
    # failure before it used to be overwritten by the revision's error, and
    # with it the 2 s retry: the next try came a refresh_interval (an hour) later.
    async def main() -> None:
        async with running(site.node(0, policy='tag = "no-such-tag"')) as a:
            assert (a.repo_status(REPO).last_error or "").startswith("revision")
            site.origin.stop()
            await a.refresh(REPO)
            st = a.repo_status(REPO)
            assert (st.last_error or "").startswith("metadata unreachable"), st.last_error
            assert "revision: " in (st.last_error or "")  # both phases' errors are kept
            site.origin.start_again()
            before = st.last_refresh
            recovered = "revision: no published revision"  # the metadata phase recovered

            async def retried_soon() -> bool:
                now = a.repo_status(REPO)
                return now.last_refresh != before and now.last_error == recovered

            # the back-off's first retry is 2 s away; an hour without it
            await eventually_async("the metadata phase retried soon", retried_soon, 15)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o644, True), (0o620, True), (0o600, False)],
    ids=["0644", "0620", "0600"],
)
def test_an_api_token_file_readable_by_others_is_warned_about(
    site: Site, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    token = site.tmp / "node0" / "api.token"
    token.parent.mkdir()
    token.write_text("the-operators-token\n")
    os.chmod(token, mode)

    async def main() -> None:
        async with running(site.node(0)) as a:
            assert a.check_token("the-operators-token")  # still used

    with caplog.at_level("WARNING", logger="swarm.node"):
        asyncio.run(main())
    about = [r.getMessage() for r in caplog.records if str(token) in r.getMessage()]
    if not warned:
        assert about == []
        return
    assert len(about) == 1
    assert f"mode {mode:04o}" in about[0] and f"chmod 600 {token}" in about[0]
    assert os.stat(token).st_mode & 0o777 == mode  # the operator's file is not changed


def test_the_api_token_file_is_created_0600_atomically(site: Site) -> None:
    # An empty token file left world-readable and -writable, and no umask:
    # the node's new token must never be readable by others, not even briefly.
    token = site.tmp / "node0" / "api.token"
    token.parent.mkdir()
    token.touch()
    os.chmod(token, 0o666)
    old_inode = os.stat(token).st_ino
    old_umask = os.umask(0)
    try:

        async def main() -> None:
            async with running(site.node(0)) as a:
                st = os.stat(token)
                assert st.st_mode & 0o777 == 0o600
                assert st.st_ino != old_inode  # a new file renamed into place, not rewritten
                assert a.check_token(token.read_text().strip())

        asyncio.run(main())
    finally:
        os.umask(old_umask)
    assert [p.name for p in token.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_second_node_on_the_same_data_dir_is_refused_and_the_first_keeps_its_state(
    site: Site,
) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            state = (a.config.data_dir / "node.json").read_bytes()
            with pytest.raises(ConfigError, match=rf"in use by the node with pid {os.getpid()}$"):
                await site.node(0).start()  # same data_dir, other addresses unused yet
            assert (a.config.data_dir / "node.json").read_bytes() == state
            assert a.repo_status(REPO).revision == 1
        # Stopped: the data directory is free for the next start.
        async with running(site.node(0)) as b:
            assert b.repo_status(REPO).revision == 1

    asyncio.run(main())
