"""What a signed target says about a release or an image: the schema of ``custom``.

Each revision of a repository is one TUF target named ``revisions/<N>``.  The
target's length and sha256 are those of the revision's root catalog object, so
TUF itself verifies the catalog; ``custom`` carries what a node needs to mount
it.  Named revisions are targets ``tags/<name>`` with the same form.

A VM image is one target ``images/<name>/<version>`` whose length and sha256
are those of the image file itself (:class:`ImageTarget`, ``docs/IMAGES.md``).

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


# -- VM images -------------------------------------------------------------------

IMAGE_PREFIX = "images/"
IMAGE_SCHEMA = 1
DEFAULT_IMAGE_FORMAT = "raw"

# A name or version is one safe path component: it starts with a letter or a
# digit (so never ".", ".." or an option-like "-x"), then letters, digits,
# ".", "_" and "-"; ".." anywhere is refused too.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_IMAGE_FORMAT = re.compile(r"[a-z0-9][a-z0-9_-]{0,15}")


def image_component_error(what: str, value: object) -> str | None:
    """Why ``value`` is not a usable image name/version/file name, or None.

    ``what`` names the field in the message (``"image name"``, ``"version"``).
    """
    if not isinstance(value, str):
        return f"{what} must be a string, not {type(value).__name__}"
    if not _COMPONENT.fullmatch(value) or ".." in value:
        return (
            f"bad {what} {value!r}: use 1-128 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'"
        )
    return None


def image_format_error(value: object) -> str | None:
    """Why ``value`` is not a well-formed image format name, or None.

    Any short lowercase name is well-formed (``raw``, ``qcow2``, ``iso``,
    ``vmdk`` ...): which formats a site runs is its policy's business, so a
    node must not reject a repository's metadata over a format it does not know.
    """
    if not isinstance(value, str) or not _IMAGE_FORMAT.fullmatch(value):
        return f"bad image format {value!r}: use 1-16 lowercase letters, digits, '_' or '-'"
    return None


def _count_error(what: str, value: object, *, positive: bool = False) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (1 if positive else 0):
        return f"bad {what} {value!r}"
    return None


def _hex_error(what: str, value: object) -> str | None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        return f"bad {what} {value!r}: 64 lowercase hex digits expected"
    return None


@dataclass(frozen=True)
class ImageTarget:
    """A signed VM image: the target ``images/<name>/<version>``.

    The TUF target's length and sha256 are those of the image file itself, so
    TUF verifies the whole image; ``custom`` adds what a node needs to fetch it
    from the swarm (v2 info-hash, the file's merkle root, piece length, and the
    hash of the ``.torrent`` object in the store) and to decide whether the
    site runs it (format).  A published version is immutable.

    Construction validates every field and raises ``ValueError`` naming the
    first bad one; :meth:`from_target_file` maps that to MetadataFormatError.
    """

    name: str
    version: str
    format: str  # "raw", "qcow2", "iso", ... (detected by the publisher or given)
    size: int  # bytes of the image file
    sha256: str  # hex SHA-256 of the image file
    file: str  # the file's name in STORE/NAME/images/<name>/<version>/ and in the torrent
    info_hash: str  # hex BitTorrent v2 info-hash
    pieces_root: str  # hex SHA-256 merkle root of the file (BEP 52)
    piece_length: int
    torrent_sha256: str  # the .torrent, a content-addressed object of the store
    torrent_length: int
    published: int  # unix seconds

    def __post_init__(self) -> None:
        problem = (
            image_component_error("image name", self.name)
            or image_component_error("image version", self.version)
            or image_component_error("image file name", self.file)
            or image_format_error(self.format)
            or _count_error("size", self.size, positive=True)
            or _hex_error("sha256", self.sha256)
            or _hex_error("info_hash", self.info_hash)
            or _hex_error("pieces_root", self.pieces_root)
            or _count_error("piece_length", self.piece_length, positive=True)
            or _hex_error("torrent sha256", self.torrent_sha256)
            or _count_error("torrent length", self.torrent_length, positive=True)
            or _count_error("published", self.published)
        )
        if problem is None and (
            self.piece_length < 16384 or self.piece_length & (self.piece_length - 1)
        ):
            problem = f"bad piece_length {self.piece_length}: a power of two >= 16 KiB expected"
        if problem is not None:
            raise ValueError(problem)

    @property
    def target_name(self) -> str:
        return image_target_name(self.name, self.version)

    @property
    def relative_path(self) -> str:
        """Where the file lives below ``STORE/NAME/`` (and the origin's ``BASE/NAME/``)."""
        return f"{self.target_name}/{self.file}"

    def to_custom(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "schema": IMAGE_SCHEMA,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "file": self.file,
            "info_hash": self.info_hash,
            "pieces_root": self.pieces_root,
            "piece_length": self.piece_length,
            "torrent": {"sha256": self.torrent_sha256, "length": self.torrent_length},
            "published": self.published,
        }

    def to_target_file(self) -> TargetFile:
        return TargetFile(
            length=self.size,
            hashes={"sha256": self.sha256},
            path=self.target_name,
            unrecognized_fields={"custom": self.to_custom()},
        )

    @classmethod
    def from_target_file(cls, target: TargetFile) -> ImageTarget:
        """Parse a verified TargetFile.

        Raises:
            MetadataFormatError: ``custom`` is missing, of another kind or
                malformed, or disagrees with the target's path, length or sha256.
        """
        path = target.path
        custom = target.custom
        if not isinstance(custom, dict) or custom.get("kind") != "image":
            raise MetadataFormatError(f"target {path!r} is not an image")
        schema = custom.get("schema", IMAGE_SCHEMA)
        if schema != IMAGE_SCHEMA:
            raise MetadataFormatError(f"target {path!r}: unknown image schema {schema!r}")
        torrent = custom.get("torrent")
        if not isinstance(torrent, dict):
            raise MetadataFormatError(f"target {path!r}: missing or bad 'torrent'")
        try:
            image = cls(
                name=custom["name"],
                version=custom["version"],
                format=custom["format"],
                size=custom["size"],
                sha256=custom["sha256"],
                file=custom["file"],
                info_hash=custom["info_hash"],
                pieces_root=custom["pieces_root"],
                piece_length=custom["piece_length"],
                torrent_sha256=torrent["sha256"],
                torrent_length=torrent["length"],
                published=custom["published"],
            )
        except KeyError as exc:
            raise MetadataFormatError(f"target {path!r}: missing {exc}") from exc
        except ValueError as exc:
            raise MetadataFormatError(f"target {path!r}: {exc}") from exc
        if path != image.target_name:
            raise MetadataFormatError(
                f"target {path!r} describes image {image.name!r} version {image.version!r}"
            )
        if target.length != image.size or target.hashes.get("sha256") != image.sha256:
            raise MetadataFormatError(
                f"target {path!r}: size/sha256 in custom differ from the target's own"
            )
        return image


def image_target_name(name: str, version: str) -> str:
    """``images/<name>/<version>`` (the caller validated both components)."""
    return f"{IMAGE_PREFIX}{name}/{version}"


def images_of(targets: dict[str, TargetFile]) -> list[ImageTarget]:
    """Every image target, by name then publication time then version.

    Raises:
        MetadataFormatError: an image target is malformed.
    """
    found = [
        ImageTarget.from_target_file(t)
        for name, t in targets.items()
        if name.startswith(IMAGE_PREFIX)
    ]
    return sorted(found, key=lambda i: (i.name, i.published, i.version))


def image_objects(targets: dict[str, TargetFile]) -> set[str]:
    """Store objects that image targets reference (their ``.torrent`` files):
    a garbage collector of the store's ``data/`` must keep these.

    Raises:
        MetadataFormatError: an image target is malformed.
    """
    return {i.torrent_sha256 for i in images_of(targets)}
