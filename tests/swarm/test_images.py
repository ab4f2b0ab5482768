"""VM images: publishing (layout, torrent tied to the signed target, immutability,
refusals that leave the store untouched), verifying a file against signed
targets and the site policy, and the ``swarm image`` commands.  Metadata is
served by a real origin on loopback; torrents are checked with independent
helpers (BEP 52 merkle root, info span), not only with libtorrent."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm import image_cli
from swarm import images as images_mod
from swarm.exceptions import ImageError, TransferError
from swarm.image_verify import verify_image
from swarm.images import (
    DEFAULT_PIECE_LENGTH,
    StderrProgress,
    detect_format,
    publish_image,
)
from swarm.layout import RepositoryURLs
from swarm.origin_client import OriginMetadataFetcher
from swarm.torrent import parse_torrent
from tests.harness import OriginServer
from tests.swarm.torrent_helpers import info_span, merkle_root
from trust import policy as p
from trust.client import TrustedRepository
from trust.keys import KeyRing, init_keys
from trust.policy import ImagePolicy
from trust.targets import ImageTarget

REPO = "sw.example.org"
OTHER = "other.example.org"
SIZE = (3 << 20) + 12345  # a few MiB, not a whole number of pieces


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its content (the store's state)."""
    if not root.exists():
        return {}
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != ".lock"
    }


def publish(image: Path, store: Path, keys: Path, version: str = "22.04", **kw: Any) -> ImageTarget:
    return publish_image(
        image, name="ubuntu", version=version, repo=REPO, keys=keys, store=store, **kw
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys", REPO)
    return tmp_path / "keys"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "ubuntu-22.04.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def published(image: Path, store: Path, keys: Path) -> ImageTarget:
    return publish(image, store, keys)


@pytest.fixture
def origin(published: ImageTarget, store: Path) -> Iterator[OriginServer]:
    with OriginServer(store) as server:
        yield server


def trusted_repo(
    origin: OriginServer, keys: Path, cache: Path, repo: str = REPO
) -> TrustedRepository:
    trusted = TrustedRepository(
        cache,
        f"{origin.url}{repo}/metadata/",
        fetcher=OriginMetadataFetcher(timeout=5),
        trusted_root=(keys / "root.json").read_bytes(),
    )
    trusted.refresh()
    return trusted


@pytest.fixture
def trusted(origin: OriginServer, keys: Path, tmp_path: Path) -> TrustedRepository:
    return trusted_repo(origin, keys, tmp_path / "cache")


# -- publishing ---------------------------------------------------------------------------------


def test_publish_stores_image_and_torrent_tied_to_the_signed_target(
    image: Path, store: Path, published: ImageTarget, trusted: TrustedRepository
) -> None:
    content = image.read_bytes()
    t = published
    assert (t.name, t.version, t.format, t.size) == ("ubuntu", "22.04", "raw", SIZE)
    assert t.sha256 == hashlib.sha256(content).hexdigest()
    stored = store / REPO / "images" / "ubuntu" / "22.04" / t.file
    assert t.file == "ubuntu-22.04.img" and stored.read_bytes() == content
    assert t.relative_path == f"images/ubuntu/22.04/{t.file}"

    torrent = (store / REPO / "data" / t.torrent_sha256[:2] / t.torrent_sha256).read_bytes()
    assert hashlib.sha256(torrent).hexdigest() == t.torrent_sha256
    assert len(torrent) == t.torrent_length
    meta = parse_torrent(torrent)
    assert meta.info_hash == t.info_hash == hashlib.sha256(info_span(torrent)).hexdigest()
    assert meta.name == t.file and meta.piece_length == t.piece_length == DEFAULT_PIECE_LENGTH
    assert len(meta.files) == 1 and meta.files[0].size == SIZE
    assert meta.files[0].pieces_root == t.pieces_root == merkle_root(content)
    assert b"url-list" not in torrent  # the node adds the site's own web seed

    # what a node sees through TUF is exactly what was published
    assert trusted.images() == [t]
    assert trusted.image("ubuntu", "22.04") == t
    tf = trusted.targets()["images/ubuntu/22.04"]
    assert tf.length == SIZE and tf.hashes == {"sha256": t.sha256}
    assert trusted.releases() == []

    base = "http://origin.example.org/"
    urls = RepositoryURLs.origin(base, REPO)
    assert urls.image_seed(t.target_name) == f"{base}{REPO}/images/ubuntu/22.04/"
    assert urls.image_seed(t.target_name) + t.file == f"{base}{REPO}/{t.relative_path}"
    want = f"{base}{REPO}/data/{t.torrent_sha256[:2]}/{t.torrent_sha256}"
    assert urls.torrent(t.torrent_sha256) == want


def test_formats_are_detected_and_a_contradicting_format_is_refused(
    tmp_path: Path, store: Path, keys: Path
) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + os.urandom(100_000))
    iso = tmp_path / "cd.iso"
    iso.write_bytes(bytes(0x8001) + b"CD001" + os.urandom(50_000))
    (tmp_path / "raw").write_bytes(os.urandom(70_000))
    assert (detect_format(qcow2), detect_format(iso)) == ("qcow2", "iso")
    with pytest.raises(ImageError, match="declared raw but has the qcow2 signature"):
        publish(qcow2, store, keys, format="raw")
    with pytest.raises(ImageError, match="declared qcow2 but has no known format signature"):
        publish(tmp_path / "raw", store, keys, version="x", format="qcow2")
    with pytest.raises(ImageError, match="declared qcow2 but has the iso signature"):
        publish(iso, store, keys, version="x", format="qcow2")
    assert tree(store) == {}
    t = publish(qcow2, store, keys)
    assert t.format == "qcow2" and t.file == "ubuntu-22.04.qcow2"
    assert publish(iso, store, keys, version="cd", format="raw").format == "raw"


def test_same_content_again_is_a_no_op(
    image: Path, store: Path, keys: Path, published: ImageTarget
) -> None:
    before = tree(store)
    assert publish(image, store, keys) == published
    assert tree(store) == before  # no new metadata version either


def test_other_content_for_a_published_version_is_refused_and_the_old_one_kept(
    image: Path, store: Path, keys: Path, published: ImageTarget, tmp_path: Path
) -> None:
    before = tree(store)
    same_size = tmp_path / "same-size.img"
    same_size.write_bytes(os.urandom(SIZE))
    with pytest.raises(ImageError, match=r"already published .* immutable") as err:
        publish(same_size, store, keys)
    assert published.sha256 in str(err.value)
    longer = tmp_path / "longer.img"
    longer.write_bytes(image.read_bytes() + b"x")
    with pytest.raises(ImageError, match=f"this image has {SIZE + 1} bytes"):
        publish(longer, store, keys)
    assert tree(store) == before
    # a new version of the same image is fine
    assert publish(same_size, store, keys, version="22.04.1").sha256 != published.sha256


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "../etc"}, "bad image name '../etc'"),
        ({"name": ".hidden"}, "bad image name"),
        ({"version": "1/2"}, "bad image version '1/2'"),
        ({"version": "1..2"}, "bad image version"),
        ({"repo": "bad repo"}, "bad repository name"),
        ({"piece_length": 1000}, "piece length 1000"),
        ({"format": "Raw"}, "unknown image format"),
        ({"image": "missing"}, "no such file"),
        ({"image": "empty"}, "is empty"),
        ({"image": "dir"}, "not a regular file"),
    ],
)
def test_bad_input_is_refused_naming_it_and_the_store_is_untouched(
    change: dict[str, object],
    message: str,
    image: Path,
    store: Path,
    keys: Path,
    published: ImageTarget,
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").touch()
    (tmp_path / "dir").mkdir()
    args: dict[str, object] = {
        "name": "alma",
        "version": "9",
        "repo": REPO,
        "keys": keys,
        "store": store,
        **change,
    }
    path = tmp_path / str(args.pop("image")) if "image" in args else image
    before = tree(store)
    with pytest.raises(ImageError, match=message):
        publish_image(path, **args)  # type: ignore[arg-type]
    assert tree(store) == before


def test_a_failed_publish_leaves_no_copy_and_no_target(
    image: Path, store: Path, keys: Path, published: ImageTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tree(store)

    def broken(*args: object, **kw: object) -> None:
        raise TransferError("disk on fire")

    monkeypatch.setattr(images_mod, "create_torrent", broken)
    with pytest.raises(ImageError, match="disk on fire"):
        publish(image, store, keys, version="23.04")
    assert tree(store) == before
    assert not (store / REPO / "images" / "ubuntu" / "23.04").exists()


def test_republishing_puts_back_a_lost_file_and_torrent(
    image: Path, store: Path, keys: Path, published: ImageTarget
) -> None:
    before = tree(store)
    (store / REPO / published.relative_path).unlink()
    (store / REPO / "data" / published.torrent_sha256[:2] / published.torrent_sha256).unlink()
    assert publish(image, store, keys) == published
    assert tree(store) == before


def test_progress_is_shown_for_big_images(image: Path, store: Path, keys: Path) -> None:
    out = io.StringIO()
    publish(image, store, keys, progress=StderrProgress(out, min_size=1 << 20))
    text = out.getvalue()
    assert "copied and hashed" in text and "(100%" in text and "torrent" in text
    quiet = io.StringIO()
    publish(image, store, keys, progress=StderrProgress(quiet, min_size=SIZE + 1))
    assert quiet.getvalue() == ""


# -- verifying a file ----------------------------------------------------------------------------


def test_verify_accepts_a_published_image(image: Path, trusted: TrustedRepository) -> None:
    verdict = verify_image(image, {REPO: trusted}, ImagePolicy())
    assert verdict.accepted
    assert verdict.match is not None and verdict.match.target.name == "ubuntu"
    assert "image ubuntu 22.04 of sw.example.org accepted" in verdict.reason


def test_verify_rejects_an_unknown_hash_naming_the_closest_image(
    image: Path, trusted: TrustedRepository, tmp_path: Path
) -> None:
    tampered = tmp_path / "other" / image.name
    tampered.parent.mkdir()
    data = bytearray(image.read_bytes())
    data[1000] ^= 1
    tampered.write_bytes(data)
    verdict = verify_image(tampered, {REPO: trusted}, ImagePolicy())
    assert not verdict.accepted and verdict.matches == ()
    assert "no signed image target has sha256" in verdict.reason
    assert "closest by name: image ubuntu 22.04 of sw.example.org" in verdict.reason


def test_verify_rejects_a_repository_the_policy_does_not_accept(
    image: Path, trusted: TrustedRepository
) -> None:
    verdict = verify_image(image, {REPO: trusted}, ImagePolicy(accept=frozenset({OTHER})))
    assert not verdict.accepted
    assert [m.verdict.code for m in verdict.matches] == [p.REPO_NOT_ACCEPTED]
    assert f"repository {REPO} is not accepted for images by the site policy" in verdict.reason


def test_verify_rejects_targets_not_signed_by_a_pinned_key(
    image: Path, keys: Path, trusted: TrustedRepository
) -> None:
    real = KeyRing.load(keys).keyids("targets")[0]
    pinned_other = ImagePolicy(keys={REPO: frozenset({"ab" * 32})})
    verdict = verify_image(image, {REPO: trusted}, pinned_other)
    assert not verdict.accepted
    assert [m.verdict.code for m in verdict.matches] == [p.KEY_NOT_PINNED]
    assert "not signed by a key the site policy pins" in verdict.reason
    assert real[:16] in verdict.reason
    pinned_real = ImagePolicy(keys={REPO: frozenset({real})})
    assert verify_image(image, {REPO: trusted}, pinned_real).accepted


def test_verify_accepts_through_the_one_accepted_of_two_publishers(
    image: Path, tmp_path: Path, store: Path, published: ImageTarget, origin: OriginServer
) -> None:
    other_keys = tmp_path / "other-keys"
    init_keys(other_keys, OTHER)
    publish_image(image, name="u", version="1", repo=OTHER, keys=other_keys, store=store)
    repos = {
        REPO: trusted_repo(origin, tmp_path / "keys", tmp_path / "c1"),
        OTHER: trusted_repo(origin, other_keys, tmp_path / "c2", OTHER),
    }
    verdict = verify_image(image, repos, ImagePolicy(accept=frozenset({OTHER})))
    assert verdict.accepted and verdict.match is not None and verdict.match.repo == OTHER
    assert sorted(m.repo for m in verdict.matches) == [OTHER, REPO]


# -- the commands --------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = image_cli.main(["image", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_publish_json_and_refusal(
    capsys: pytest.CaptureFixture[str], image: Path, store: Path, keys: Path, tmp_path: Path
) -> None:
    common = ["--repo", REPO, "--keys", str(keys), "--store", str(store)]
    code, out, _ = run(
        capsys, "publish", str(image), "--name", "ubuntu", "--version", "1", *common, "--json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["target"] == "images/ubuntu/1" and doc["kind"] == "image"
    assert doc["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    code, out, _ = run(capsys, "publish", str(image), "--name", "ubuntu", "--version", "2", *common)
    assert code == 0 and "published image ubuntu 2 in sw.example.org" in out
    other = tmp_path / "other.img"
    other.write_bytes(b"different")
    code, _, err = run(capsys, "publish", str(other), "--name", "ubuntu", "--version", "1", *common)
    assert code == 1 and "immutable" in err
    code, _, err = run(capsys, "publish", str(image), "--name", "a/b", "--version", "1", *common)
    assert code == 1 and "bad image name" in err
    with pytest.raises(SystemExit) as exc:
        image_cli.main(["image", "publish", str(image), "--version", "1", *common])
    assert exc.value.code == 2


def test_cli_verify_with_explicit_repository_and_policy_file(
    capsys: pytest.CaptureFixture[str],
    image: Path,
    keys: Path,
    origin: OriginServer,
    tmp_path: Path,
) -> None:
    explicit = ["--repo", REPO, "--trust", str(keys / "root.json"), "--origin", origin.url]
    code, out, _ = run(capsys, "verify", str(image), *explicit)
    assert code == 0 and out.startswith("accepted: ") and "ubuntu 22.04" in out

    policy = tmp_path / "policy.toml"
    policy.write_text(f'[image_policy]\naccept = ["{OTHER}"]\n')
    code, out, _ = run(capsys, "verify", str(image), *explicit, "--policy", str(policy))
    assert code == 1 and out.startswith("rejected: ") and "is not accepted" in out

    unknown = tmp_path / "unknown.img"
    unknown.write_bytes(b"not an image anyone signed")
    code, out, _ = run(capsys, "verify", str(unknown), *explicit, "--json")
    assert code == 1 and "no signed image target" in json.loads(out)["reason"]

    code, _, err = run(capsys, "verify", str(image), "--repo", REPO)
    assert code == 2 and "--trust" in err
    code, _, err = run(capsys, "verify", str(tmp_path / "absent"), *explicit)
    assert code == 2 and "no such file" in err
    policy.write_text("acept = []\n")
    code, _, err = run(capsys, "verify", str(image), *explicit, "--policy", str(policy))
    assert code == 2 and "unknown key" in err


def test_cli_verify_and_list_with_a_node_config(
    capsys: pytest.CaptureFixture[str],
    image: Path,
    keys: Path,
    origin: OriginServer,
    tmp_path: Path,
) -> None:
    real = KeyRing.load(keys).keyids("targets")[0]
    config = tmp_path / "node.toml"
    body = f"""
data_dir = "{tmp_path / "data"}"
[repositories."{REPO}"]
origin = "{origin.url}"
trust = "{keys / "root.json"}"
"""
    config.write_text(body + f'[image_policy.keys]\n"{REPO}" = ["{"ab" * 32}"]\n')
    code, out, _ = run(capsys, "verify", str(image), "--config", str(config))
    assert code == 1 and "not signed by a key the site policy pins" in out
    # the node's own metadata cache was used and filled
    assert (tmp_path / "data" / "repos" / REPO / "metadata" / "root.json").exists()

    config.write_text(body + f'[image_policy.keys]\n"{REPO}" = ["{real}"]\n')
    code, out, _ = run(capsys, "verify", str(image), "--config", str(config))
    assert code == 0, out

    code, out, _ = run(capsys, "list", "--config", str(config), "--json")
    assert code == 0
    [entry] = json.loads(out)["repositories"]
    assert entry["repository"] == REPO and entry["targets"]["keyids"] == [real]
    assert [(i["name"], i["version"], i["accepted"]) for i in entry["images"]] == [
        ("ubuntu", "22.04", True)
    ]
    code, out, _ = run(capsys, "list", "--config", str(config))
    assert code == 0 and "ubuntu" in out and "accepted" in out

    # offline, from the cache the node keeps, with the origin gone
    origin.stop()
    code, out, _ = run(capsys, "verify", str(image), "--config", str(config), "--offline")
    assert code == 0, out
    code, out, err = run(capsys, "verify", str(image), "--config", str(config), "--timeout", "2")
    assert code == 0 and "using cached metadata" in err

    config.write_text(body + "images = false\n")
    code, out, _ = run(capsys, "verify", str(image), "--config", str(config), "--offline")
    assert code == 1 and "does not follow the repository's images" in out

    code, _, err = run(capsys, "verify", str(image), "--config", str(config), "--repo", REPO)
    assert code == 2 and "exclude each other" in err
