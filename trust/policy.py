"""The site's image policy: which publishers' VM images a site runs.

Releases of a repository are trusted because the site installed its root
out of band.  VM images are a stronger grant (a publisher's image runs a
whole guest with the node's network and storage), so a site may narrow, per
repository, what it accepts (``docs/IMAGES.md``)::

    [image_policy]
    accept = ["sw.example.org"]       # absent: every followed repository
    formats = ["raw", "qcow2"]        # absent: any format
    [image_policy.keys]               # optional pins, per repository
    "sw.example.org" = ["<keyid>", ...]

Decision order in :meth:`ImagePolicy.check`, first failure wins:

1. the repository was declined by the node itself (:meth:`ImagePolicy.decline`,
   e.g. ``images = false`` in its ``[repositories."NAME"]`` table);
2. the target must be one the trusted repository signs (same path, sha256 and
   size): a verdict never rests on a target the caller made up;
3. ``accept``: the repository must be listed (when the list is given);
4. ``keys``: when the repository is pinned, the trusted targets metadata must
   carry valid signatures from at least the targets threshold of pinned keys
   (a root compromise that swaps the targets key is then refused);
5. ``formats``: the image's format must be listed (when the list is given).

Parsing is pure (a TOML table in, an :class:`ImagePolicy` out) and strict:
unknown keys and malformed values raise :class:`TrustConfigError` naming the
key, so a typo never widens the policy.  No network, no disk.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol

from trust.client import RoleSigners
from trust.exceptions import TrustConfigError
from trust.targets import ImageTarget, image_format_error

TABLE = "image_policy"
_KEYS = ("accept", "keys", "formats")
_KEYID = re.compile(r"[0-9a-f]{64}")

# Verdict codes: stable words for programs (the daemon's API, tests); the
# reason is for people.
ACCEPTED = "accepted"
DECLINED = "declined"
NOT_SIGNED = "not-signed"
REPO_NOT_ACCEPTED = "repository-not-accepted"
KEY_NOT_PINNED = "key-not-pinned"
FORMAT_NOT_ALLOWED = "format-not-allowed"


class SignedRepository(Protocol):
    """What the policy needs of a :class:`trust.client.TrustedRepository`."""

    def image(self, name: str, version: str) -> ImageTarget | None: ...

    def signers(self, role: str = "targets") -> RoleSigners: ...


@dataclass(frozen=True)
class Verdict:
    """The policy's decision on one image of one repository."""

    accepted: bool
    reason: str
    code: str = ACCEPTED


def _names(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TrustConfigError(f"{key}: expected a list of names, got {value!r}")
    return frozenset(value)


@dataclass(frozen=True)
class ImagePolicy:
    """Which repositories' image targets a site accepts (module docstring).

    ``accept=None`` (the default) accepts every repository the node follows:
    following a repository already means the site installed its root out of
    band, and the node only ever hands :meth:`check` repositories it follows.
    ``accept=frozenset()`` accepts no image at all.
    """

    accept: frozenset[str] | None = None
    keys: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    formats: frozenset[str] | None = None
    declined: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "the default policy: every followed repository"

    # -- loading -------------------------------------------------------------

    @classmethod
    def from_table(cls, table: Mapping[str, object], *, source: str = TABLE) -> ImagePolicy:
        """The policy of an ``[image_policy]`` table (already parsed TOML).

        An empty table is the default policy.

        Raises:
            TrustConfigError: unknown key, a value of the wrong type, a key id
                that is not 64 hex digits, a format name that is malformed, or
                pins for a repository that ``accept`` does not list.
        """
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise TrustConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_KEYS)})"
            )
        accept = _names(table["accept"], f"{source}.accept") if "accept" in table else None
        formats: frozenset[str] | None = None
        if "formats" in table:
            formats = _names(table["formats"], f"{source}.formats")
            for fmt in sorted(formats):
                problem = image_format_error(fmt)
                if problem:
                    raise TrustConfigError(f"{source}.formats: {problem}")
        keys_raw = table.get("keys", {})
        if not isinstance(keys_raw, Mapping):
            raise TrustConfigError(f'{source}.keys: expected a table of "REPO" = [keyids]')
        keys: dict[str, frozenset[str]] = {}
        for repo, ids in keys_raw.items():
            key = f'{source}.keys."{repo}"'
            pinned = _names(ids, key)
            if not pinned:
                raise TrustConfigError(f"{key}: an empty pin list would accept no key; remove it")
            bad = sorted(k for k in pinned if not _KEYID.fullmatch(k))
            if bad:
                raise TrustConfigError(f"{key}: not a key id (64 lowercase hex digits): {bad[0]!r}")
            if accept is not None and repo not in accept:
                raise TrustConfigError(
                    f"{key}: pins keys of a repository that {source}.accept does not list"
                )
            keys[repo] = pinned
        return cls(
            accept=accept,
            keys=MappingProxyType(keys),
            formats=formats,
            source=source,
        )

    @classmethod
    def from_toml(cls, text: str, *, source: str = "policy") -> ImagePolicy:
        """Parse a policy file: TOML with an ``[image_policy]`` table (so a node
        configuration works too), or with the policy keys (``accept``,
        ``keys``, ``formats``) at its top level.  An empty file is the
        default policy.  Any other key is an error, so a typo can never fall
        back to the (wider) default.

        Raises:
            TrustConfigError: invalid TOML or an invalid policy (see :meth:`from_table`).
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TrustConfigError(f"{source}: not valid TOML: {exc}") from None
        if TABLE in doc:
            table = doc[TABLE]
            if not isinstance(table, dict):
                raise TrustConfigError(f"{source}: {TABLE} must be a table")
            return cls.from_table(table, source=f"{source} [{TABLE}]")
        return cls.from_table(doc, source=source)

    def decline(self, repos: Iterable[str], reason: str) -> ImagePolicy:
        """A copy that refuses every image of ``repos``, saying ``reason``.

        For the node's own exclusions, e.g. a followed repository whose
        images the node configuration turns off.
        """
        declined = dict(self.declined)
        declined.update((repo, reason) for repo in repos)
        return replace(self, declined=MappingProxyType(declined))

    # -- deciding ------------------------------------------------------------

    def check(self, repo: str, target: ImageTarget, trusted: SignedRepository) -> Verdict:
        """Decide whether the site accepts image ``target`` of repository ``repo``.

        ``trusted`` is the node's verified view of ``repo`` (refreshed or
        loaded from cache by the caller).

        Raises:
            TrustConfigError: ``trusted`` holds no verified metadata, or its
                cached signatures cannot be read back (key pins only).
            MetadataFormatError: the repository's image target is malformed.
        """
        what = f"image {target.name} {target.version} of {repo}"
        if repo in self.declined:
            return Verdict(False, f"{what}: {self.declined[repo]}", DECLINED)
        signed = trusted.image(target.name, target.version)
        if signed is None or (signed.sha256, signed.size) != (target.sha256, target.size):
            return Verdict(
                False,
                f"{what}: the trusted metadata of {repo} does not sign this image",
                NOT_SIGNED,
            )
        if self.accept is not None and repo not in self.accept:
            listed = ", ".join(sorted(self.accept))
            return Verdict(
                False,
                f"{what}: repository {repo} is not accepted for images by the site policy "
                f"(accept = [{listed}] in {self.source})",
                REPO_NOT_ACCEPTED,
            )
        pinned = self.keys.get(repo)
        if pinned is not None:
            signers = trusted.signers("targets")
            vouching = signers.signed & pinned
            if len(vouching) < signers.threshold:
                by = ", ".join(k[:16] for k in sorted(signers.signed)) or "no key"
                return Verdict(
                    False,
                    f"{what}: {repo}'s targets (v{signers.version}) are not signed by a key "
                    f"the site policy pins: signed by {by}; {len(vouching)} pinned, "
                    f"{signers.threshold} needed (keys in {self.source})",
                    KEY_NOT_PINNED,
                )
        if self.formats is not None and target.format not in self.formats:
            allowed = ", ".join(sorted(self.formats))
            return Verdict(
                False,
                f"{what}: format {target.format} is not allowed by the site policy "
                f"(formats = [{allowed}] in {self.source})",
                FORMAT_NOT_ALLOWED,
            )
        how = "keys the site pins" if pinned is not None else "the repository's trusted keys"
        return Verdict(True, f"{what} accepted: signed by {how} ({self.source})")
