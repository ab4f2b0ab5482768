"""What a signed target says about a release revision: the schema of ``custom``.

Each revision of a repository is one TUF target named ``revisions/<N>``.  The
target's length and sha256 are those of the revision's root catalog object, so
TUF itself verifies the catalog; ``custom`` carries what a node needs to mount
it.  Named revisions are targets ``tags/<name>`` with the same form.

Parsing is strict: a target whose ``custom`` is malformed is untrusted data and
raises :class:`trust.exceptions.MetadataFormatError`, never a ``KeyError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import TargetFile

from trust.exceptions import MetadataFormatError

REVISION_PREFIX = "revisions/"
TAG_PREFIX = "tags/"
FORMAT_VERSION = 1

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_tag(name: str) -> bool:
    """A tag is 1-64 characters of letters, digits, ``.``, ``_`` and ``-``."""
    return _TAG.fullmatch(name) is not None


@dataclass(frozen=True)
class ReleaseTarget:
    """A verified revision of a release: root catalog hash and metadata."""

    revision: int
    catalog: str  # sha256 hex of the root catalog object
    catalog_size: int
    published: int  # unix seconds
    files: int = 0
    total_bytes: int = 0
    tag: str | None = None  # set for ``tags/<name>`` targets

    @property
    def target_name(self) -> str:
        if self.tag is not None:
            return f"{TAG_PREFIX}{self.tag}"
        return f"{REVISION_PREFIX}{self.revision}"

    def to_target_file(self) -> TargetFile:
        custom: dict[str, Any] = {
            "kind": "release",
            "format": FORMAT_VERSION,
            "revision": self.revision,
            "catalog": self.catalog,
            "published": self.published,
            "files": self.files,
            "bytes": self.total_bytes,
        }
        return TargetFile(
            length=self.catalog_size,
            hashes={"sha256": self.catalog},
            path=self.target_name,
            unrecognized_fields={"custom": custom},
        )

    @classmethod
    def from_target_file(cls, target: TargetFile) -> ReleaseTarget:
        """Parse a verified TargetFile.

        Raises:
            MetadataFormatError: ``custom`` is missing, of the wrong kind or
                inconsistent with the target's own hash and length.
        """
        custom = target.custom
        if not isinstance(custom, dict) or custom.get("kind") != "release":
            raise MetadataFormatError(f"target {target.path!r} is not a release")
        try:
            revision = custom["revision"]
            catalog = custom["catalog"]
            published = custom["published"]
            files = custom.get("files", 0)
            total = custom.get("bytes", 0)
        except KeyError as exc:
            raise MetadataFormatError(f"target {target.path!r}: missing {exc}") from exc
        for field, value in (
            ("revision", revision),
            ("published", published),
            ("files", files),
            ("bytes", total),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MetadataFormatError(f"target {target.path!r}: bad {field} {value!r}")
        if not isinstance(catalog, str) or not _HEX64.fullmatch(catalog):
            raise MetadataFormatError(f"target {target.path!r}: bad catalog hash {catalog!r}")
        if target.hashes.get("sha256") != catalog:
            raise MetadataFormatError(
                f"target {target.path!r}: catalog hash does not match the target's sha256"
            )
        tag: str | None = None
        if target.path.startswith(TAG_PREFIX):
            tag = target.path[len(TAG_PREFIX) :]
            if not is_valid_tag(tag):
                raise MetadataFormatError(f"target {target.path!r}: bad tag name")
        elif target.path != f"{REVISION_PREFIX}{revision}":
            raise MetadataFormatError(f"target {target.path!r} claims revision {revision}")
        return cls(
            revision=revision,
            catalog=catalog,
            catalog_size=target.length,
            published=published,
            files=files,
            total_bytes=total,
            tag=tag,
        )


def releases_of(targets: dict[str, TargetFile]) -> list[ReleaseTarget]:
    """Every revision target (not tags), oldest first.

    Raises:
        MetadataFormatError: a revision target is malformed.
    """
    found = [
        ReleaseTarget.from_target_file(t)
        for name, t in targets.items()
        if name.startswith(REVISION_PREFIX)
    ]
    return sorted(found, key=lambda r: r.revision)


def tags_of(targets: dict[str, TargetFile]) -> dict[str, ReleaseTarget]:
    """Every tag target by tag name.

    Raises:
        MetadataFormatError: a tag target is malformed.
    """
    out: dict[str, ReleaseTarget] = {}
    for name, t in targets.items():
        if name.startswith(TAG_PREFIX):
            r = ReleaseTarget.from_target_file(t)
            assert r.tag is not None
            out[r.tag] = r
    return out
