"""The site's image policy: parsing (strict), and each rule of ``check`` against
a real trusted repository (the in-memory TUF simulator), including key pins
that survive a root which hands the targets role to another key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from tests.trust.simulator import METADATA_URL, RepositorySimulator
from trust import policy as p
from trust.client import STATE_FILE, TrustedRepository
from trust.exceptions import MetadataFormatError, TrustConfigError
from trust.policy import ImagePolicy
from trust.targets import ImageTarget, images_of, releases_of

REPO = "sw.example.org"
OTHER = "other.example.org"
KEYID = "ab" * 32


def image(name: str = "ubuntu", version: str = "22.04", fmt: str = "qcow2") -> ImageTarget:
    return ImageTarget(
        name=name,
        version=version,
        format=fmt,
        size=4096,
        sha256="11" * 32,
        file=f"{name}-{version}.{fmt}",
        info_hash="22" * 32,
        pieces_root="33" * 32,
        piece_length=256 * 1024,
        torrent_sha256="44" * 32,
        torrent_length=700,
        published=1_700_000_000,
    )


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    for target in (image(), image("alma", "9", "raw")):
        tf = target.to_target_file()
        sim.targets.targets[tf.path] = tf
    sim.publish()
    return sim


def trusted_of(sim: RepositorySimulator, cache: Path) -> TrustedRepository:
    client = TrustedRepository(cache, METADATA_URL, fetcher=sim, trusted_root=sim.signed_roots[0])
    client.refresh()
    return client


@pytest.fixture
def trusted(sim: RepositorySimulator, tmp_path: Path) -> TrustedRepository:
    return trusted_of(sim, tmp_path / "cache")


def targets_keyid(sim: RepositorySimulator) -> str:
    keyid: str = sim.signers["targets"][0].public_key.keyid
    return keyid


# -- the target schema ---------------------------------------------------------------


def test_image_target_round_trips_and_lists_apart_from_releases(
    trusted: TrustedRepository,
) -> None:
    assert [(i.name, i.version) for i in trusted.images()] == [("alma", "9"), ("ubuntu", "22.04")]
    assert trusted.image("ubuntu", "22.04") == image()
    assert trusted.image("ubuntu", "24.04") is None
    assert releases_of(trusted.targets()) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "../etc", "bad image name"),
        ("name", ".hidden", "bad image name"),
        ("version", "1..2", "bad image version"),
        ("version", "a/b", "bad image version"),
        ("size", 0, "bad size"),
        ("sha256", "XYZ", "bad sha256"),
        ("piece_length", 1000, "bad piece_length"),
        ("format", "QCOW2!", "bad image format"),
    ],
)
def test_malformed_image_targets_are_refused_with_the_field_named(
    field: str, value: object, message: str
) -> None:
    tf = image().to_target_file()
    tf.unrecognized_fields["custom"][field] = value
    with pytest.raises(MetadataFormatError, match=message):
        ImageTarget.from_target_file(tf)
    with pytest.raises(MetadataFormatError, match=message):
        images_of({tf.path: tf})


def test_image_target_must_agree_with_its_path_and_hashes() -> None:
    tf = image().to_target_file()
    tf.path = "images/ubuntu/24.04"
    with pytest.raises(MetadataFormatError, match=r"describes image 'ubuntu' version '22\.04'"):
        ImageTarget.from_target_file(tf)
    tf = image().to_target_file()
    tf.hashes["sha256"] = "55" * 32
    with pytest.raises(MetadataFormatError, match="differ from the target's own"):
        ImageTarget.from_target_file(tf)
    tf = image().to_target_file()
    del tf.unrecognized_fields["custom"]["info_hash"]
    with pytest.raises(MetadataFormatError, match="missing 'info_hash'"):
        ImageTarget.from_target_file(tf)


# -- parsing -----------------------------------------------------------------------------


def test_policy_table_parses_accept_keys_and_formats() -> None:
    pol = ImagePolicy.from_toml(
        f"""
data_dir = "/var/lib/swarm"
[image_policy]
accept = ["{REPO}", "{OTHER}"]
formats = ["raw", "qcow2"]
[image_policy.keys]
"{REPO}" = ["{KEYID}"]
""",
        source="node.toml",
    )
    assert pol.accept == frozenset({REPO, OTHER})
    assert pol.formats == frozenset({"raw", "qcow2"})
    assert dict(pol.keys) == {REPO: {KEYID}}
    assert pol.source == "node.toml [image_policy]"


def test_standalone_policy_file_and_the_default_policy() -> None:
    assert ImagePolicy.from_toml(f'accept = ["{REPO}"]').accept == frozenset({REPO})
    assert ImagePolicy.from_toml("accept = []").accept == frozenset()
    default = ImagePolicy.from_toml("")
    assert default.accept is None and default.formats is None and not default.keys
    assert ImagePolicy.from_table({}) == ImagePolicy(source="image_policy")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('acept = ["x"]', "unknown key.*acept"),
        ('data_dir = "/x"', "unknown key.*data_dir"),
        ('accept = "sw.example.org"', "accept: expected a list"),
        ('[image_policy.keys]\n"r" = ["abc"]', "not a key id"),
        ('[image_policy.keys]\n"r" = []', "empty pin list"),
        (
            f'[image_policy]\naccept = ["a"]\n[image_policy.keys]\n"b" = ["{KEYID}"]',
            "does not list",
        ),
        ('[image_policy]\nformats = ["Raw Disk"]', "bad image format"),
        ("image_policy = 3", "must be a table"),
        ("[image_policy", "not valid TOML"),
    ],
)
def test_bad_policies_are_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(TrustConfigError, match=message):
        ImagePolicy.from_toml(text)


# -- deciding ------------------------------------------------------------------------------


def test_default_policy_accepts_a_followed_repository(trusted: TrustedRepository) -> None:
    verdict = ImagePolicy().check(REPO, image(), trusted)
    assert verdict.accepted and verdict.code == p.ACCEPTED
    assert "image ubuntu 22.04 of sw.example.org accepted" in verdict.reason


def test_repository_not_in_accept_list_is_refused(trusted: TrustedRepository) -> None:
    verdict = ImagePolicy(accept=frozenset({OTHER})).check(REPO, image(), trusted)
    assert not verdict.accepted and verdict.code == p.REPO_NOT_ACCEPTED
    assert f"repository {REPO} is not accepted for images by the site policy" in verdict.reason
    assert not ImagePolicy(accept=frozenset()).check(REPO, image(), trusted).accepted


def test_pinned_key_accepts_and_another_key_is_refused(
    sim: RepositorySimulator, trusted: TrustedRepository
) -> None:
    keyid = targets_keyid(sim)
    signers = trusted.signers()
    assert signers.signed == {keyid} and signers.threshold == 1 and signers.authorized == {keyid}
    ok = ImagePolicy(keys={REPO: frozenset({keyid})}).check(REPO, image(), trusted)
    assert ok.accepted and "keys the site pins" in ok.reason
    refused = ImagePolicy(keys={REPO: frozenset({KEYID})}).check(REPO, image(), trusted)
    assert not refused.accepted and refused.code == p.KEY_NOT_PINNED
    assert "are not signed by a key the site policy pins" in refused.reason
    assert keyid[:16] in refused.reason


def test_pin_refuses_images_after_root_hands_targets_to_another_key(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A compromised root can delegate targets to the attacker's key: TUF
    follows it, the site's pin does not."""
    pinned = targets_keyid(sim)
    trusted = trusted_of(sim, tmp_path / "cache")
    pol = ImagePolicy(keys={REPO: frozenset({pinned})})
    assert pol.check(REPO, image(), trusted).accepted
    sim.rotate("targets")
    sim.publish()
    trusted.refresh()
    assert trusted.image("ubuntu", "22.04") == image()  # TUF trusts the new key
    verdict = pol.check(REPO, image(), trusted)
    assert not verdict.accepted and verdict.code == p.KEY_NOT_PINNED


def test_pins_need_the_targets_threshold(sim: RepositorySimulator, tmp_path: Path) -> None:
    second = CryptoSigner.generate_ed25519()
    sim.root.add_key(second.public_key, "targets")
    sim.root.roles["targets"].threshold = 2
    sim.root.version += 1
    sim.publish_root()
    sim.signers["targets"].append(second)
    sim.publish()
    trusted = trusted_of(sim, tmp_path / "cache")
    first = targets_keyid(sim)
    one = ImagePolicy(keys={REPO: frozenset({first})}).check(REPO, image(), trusted)
    assert not one.accepted and "1 pinned, 2 needed" in one.reason
    both = frozenset({first, second.public_key.keyid})
    assert ImagePolicy(keys={REPO: both}).check(REPO, image(), trusted).accepted


def test_format_not_allowed_and_declined_repository(trusted: TrustedRepository) -> None:
    pol = ImagePolicy(formats=frozenset({"raw"}))
    assert pol.check(REPO, image("alma", "9", "raw"), trusted).accepted
    verdict = pol.check(REPO, image(), trusted)
    assert not verdict.accepted and verdict.code == p.FORMAT_NOT_ALLOWED
    assert "format qcow2 is not allowed" in verdict.reason
    declined = ImagePolicy().decline([REPO], "images are off for this repository")
    verdict = declined.check(REPO, image(), trusted)
    assert not verdict.accepted and verdict.code == p.DECLINED
    assert "images are off" in verdict.reason


def test_a_target_the_repository_does_not_sign_is_refused(trusted: TrustedRepository) -> None:
    forged = ImageTarget(**{**image().__dict__, "sha256": "66" * 32})
    verdict = ImagePolicy().check(REPO, forged, trusted)
    assert not verdict.accepted and verdict.code == p.NOT_SIGNED
    assert not ImagePolicy().check(REPO, image("ubuntu", "99"), trusted).accepted


def test_signers_after_load_cached_and_when_the_cache_changed_underneath(
    sim: RepositorySimulator, trusted: TrustedRepository, tmp_path: Path
) -> None:
    offline = TrustedRepository(tmp_path / "cache", METADATA_URL, fetcher=sim)
    offline.load_cached()
    assert offline.signers().signed == {targets_keyid(sim)}
    # another process refreshes the same cache to a newer targets version
    sim.publish()
    TrustedRepository(tmp_path / "cache", METADATA_URL, fetcher=sim).refresh()
    with pytest.raises(TrustConfigError, match="changed since it was verified"):
        offline.signers()
    state = json.loads((tmp_path / "cache" / STATE_FILE).read_text())
    assert "targets" in state
    with pytest.raises(TrustConfigError, match="no signers for role 'root'"):
        offline.signers("root")
