"""VM images: publishing them as signed targets (checking a file against them:
:mod:`swarm.image_verify`).

Publisher side, :func:`publish_image` lays an image out in the origin store::

    STORE/NAME/images/<image>/<version>/<file>   the image, immutable once signed
    STORE/NAME/data/ab/<sha256>                  its .torrent (BitTorrent v2), an object
    STORE/NAME/metadata/                         target images/<image>/<version>

and signs the target ``images/<image>/<version>`` (:class:`trust.targets.ImageTarget`):
TUF length/sha256 are the image's, ``custom`` names the torrent's v2
info-hash, the file's merkle root and the ``.torrent`` object.  The chain of
trust is target (signed) -> image sha256, and target -> info-hash / merkle
root -> every 16 KiB block a peer sends, so a node streaming the image from
peers verifies each block long before it holds the whole file.

The torrent is a single-file torrent named ``<file>`` with no web seed in it
(the origin's URL is the site's business, and the ``.torrent`` is hashed into
the signed target): a node adds the web seed
(:meth:`swarm.layout.RepositoryURLs.image_seed`) when it adds the torrent.

Invariants of a publish:

* everything is checked before anything is written: a bad name, a missing or
  empty image, an inconsistent format raise :class:`ImageError` with the
  store untouched;
* it holds the repository's publish lock (``RepositoryWriter``) throughout,
  so it serialises with ``swarm publish``, ``tag`` and ``gc``;
* the image is copied to a temporary name while hashed (the signed hash is
  that of the bytes written), fsynced and renamed; then the torrent is built
  from the stored copy and stored as an object; the TUF commit is last, so a
  publish killed half-way leaves no target and the next publish of that
  version starts afresh;
* a signed version is immutable: the same content again is a no-op (a
  missing stored file or torrent object is put back), other content is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cvmfs_like.exceptions import StoreError
from cvmfs_like.store import ObjectWriter, OriginStore, check_repo_name
from swarm.exceptions import ImageError, TransferError
from swarm.torrent import create_torrent
from swarm.transfer import TorrentMeta
from trust.durable import fsync_dir, fsync_file
from trust.exceptions import VerificationError
from trust.repository import RepositoryWriter
from trust.targets import (
    IMAGE_PREFIX,
    ImageTarget,
    image_component_error,
    image_format_error,
    image_target_name,
)

logger = logging.getLogger(__name__)

# A boot reads small scattered extents: a 64 KiB piece keeps what a cold read
# pulls over the network close to what it asked for (256 KiB pieces quadruple
# a 64 KiB read), at 32 bytes of piece layer per piece in the torrent.
DEFAULT_PIECE_LENGTH = 64 * 1024
KNOWN_FORMATS = ("raw", "qcow2", "iso", "vmdk", "vhdx", "vdi")
_EXTENSION = {"raw": "img"}  # file extension by format; default: the format's name
_CHUNK = 4 << 20
IMAGES_DIR = IMAGE_PREFIX.rstrip("/")

# progress(stage, done, total): stage is "copy" (copied and hashed), "hash"
# (hashed only) or "torrent" (libtorrent hashing: reported at 0 and at total).
Progress = Callable[[str, int, int], None]


# -- formats -----------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """The image format by its magic bytes; ``raw`` when none is recognised.

    qcow2: ``QFI\\xfb`` at 0; vmdk (sparse): ``KDMV`` at 0; vhdx: ``vhdxfile``
    at 0; vdi: ``0xbeda107f`` (little-endian) at 0x40; iso: ``CD001`` at 0x8001.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        head = f.read(0x48)
        f.seek(0x8001)
        iso = f.read(5)
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"KDMV":
        return "vmdk"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if iso == b"CD001":
        return "iso"
    return "raw"


def _choose_format(detected: str, given: str | None) -> str:
    if given is None:
        return detected
    if given not in KNOWN_FORMATS:
        raise ImageError(f"unknown image format {given!r}: one of {', '.join(KNOWN_FORMATS)}")
    # A container format run as raw (or the reverse) is how a guest reads host
    # files through a backing-file reference: a declared format must agree
    # with the content.  An ISO is raw data too, so "raw" may label one.
    if given != detected and not (given == "raw" and detected == "iso"):
        found = "no known format signature" if detected == "raw" else f"the {detected} signature"
        raise ImageError(f"the image is declared {given} but has {found}")
    return given


def image_file_name(name: str, version: str, fmt: str) -> str:
    """The image's file name in the store and in its torrent: ``NAME-VERSION.EXT``."""
    return f"{name}-{version}.{_EXTENSION.get(fmt, fmt)}"


# -- where things are ---------------------------------------------------------------


def image_dir(store: OriginStore, target: ImageTarget) -> Path:
    """``STORE/NAME/images/<image>/<version>``."""
    return store.root / IMAGES_DIR / target.name / target.version


# -- progress on stderr --------------------------------------------------------------


class StderrProgress:
    """A :data:`Progress` that shows bytes copied/hashed on a stream.

    Silent for images under ``min_size``; on a terminal one line is
    rewritten at most every ``interval`` seconds, elsewhere a line is
    written every 10 %.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        min_size: int = 64 << 20,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._min = min_size
        self._interval = interval
        self._clock = clock
        self._tty = self._stream.isatty()
        self._stage = ""
        self._start = 0.0
        self._last = 0.0
        self._decile = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total < self._min:
            return
        now = self._clock()
        if stage != self._stage:
            self._stage, self._start, self._last, self._decile = stage, now, 0.0, -1
        finished = done >= total
        if self._tty:
            if not finished and now - self._last < self._interval:
                return
        else:
            decile = done * 10 // total
            if decile == self._decile:
                return
            self._decile = decile
        self._last = now
        rate = done / max(now - self._start, 1e-6) / 1e6
        verb = {"copy": "copied and hashed", "hash": "hashed", "torrent": "torrent made of"}
        line = (
            f"{verb.get(stage, stage)} {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB"
            f" ({100 * done // total}%, {rate:,.0f} MB/s)"
        )
        if stage == "torrent" and not finished:
            line = f"making the v2 torrent of {total / 2**20:,.0f} MiB (libtorrent hashes it)"
        end = "\n" if (finished or not self._tty) else ""
        self._stream.write(("\r" if self._tty else "") + line + end)
        self._stream.flush()


# -- hashing and copying ---------------------------------------------------------------


def _stream(
    src: Path,
    stage: str,
    expected: int,
    progress: Progress | None,
    sink: Callable[[memoryview], None] | None = None,
) -> tuple[str, int]:
    digest = hashlib.sha256()
    done = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    if progress is not None:
        progress(stage, 0, expected)
    with src.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            part = view[:n]
            digest.update(part)
            if sink is not None:
                sink(part)
            done += n
            if progress is not None:
                progress(stage, min(done, expected), expected)
    return digest.hexdigest(), done


def hash_file(path: Path, *, progress: Progress | None = None) -> tuple[str, int]:
    """SHA-256 hex and size of a file, read once.

    Raises:
        OSError: the file cannot be read.
    """
    return _stream(path, "hash", path.stat().st_size, progress)


def _copy_hashed(src: Path, dst: Path, expected: int, progress: Progress | None) -> str:
    """Copy ``src`` to a new file ``dst`` (fsynced), returning the SHA-256 of
    the bytes written.  Raises ImageError if ``src`` changed size meanwhile."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:

        def write(part: memoryview) -> None:
            while part:
                part = part[os.write(fd, part) :]

        digest, done = _stream(src, "copy", expected, progress, write)
        if done != expected:
            raise ImageError(f"{src} changed while it was copied ({expected} -> {done} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


# -- publishing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    image: Path
    size: int
    format: str
    file: str


def _check_input(
    image: Path, name: str, version: str, repo: str, fmt: str | None, piece_length: int
) -> _Checked:
    for what, value in (("image name", name), ("image version", version)):
        problem = image_component_error(what, value)
        if problem:
            raise ImageError(problem)
    try:
        check_repo_name(repo)
    except StoreError as exc:
        raise ImageError(str(exc)) from None
    if fmt is not None and image_format_error(fmt):
        raise ImageError(f"unknown image format {fmt!r}: one of {', '.join(KNOWN_FORMATS)}")
    if piece_length < 16384 or piece_length & (piece_length - 1):
        raise ImageError(f"piece length {piece_length} must be a power of two >= 16 KiB")
    try:
        st = image.stat()
    except FileNotFoundError:
        raise ImageError(f"image {image}: no such file") from None
    except OSError as exc:
        raise ImageError(f"image {image}: {exc.strerror}") from None
    if not image.is_file():
        raise ImageError(f"image {image} is not a regular file")
    if st.st_size == 0:
        raise ImageError(f"image {image} is empty")
    try:
        detected = detect_format(image)
    except OSError as exc:
        raise ImageError(f"image {image}: cannot read it: {exc.strerror}") from None
    chosen = _choose_format(detected, fmt)
    file = image_file_name(name, version, chosen)
    problem = image_component_error("image file name", file)
    if problem:
        raise ImageError(f"name and version are too long together: {problem}")
    return _Checked(image, st.st_size, chosen, file)


def publish_image(
    image: Path,
    *,
    name: str,
    version: str,
    repo: str,
    keys: Path,
    store: Path,
    format: str | None = None,
    piece_length: int = DEFAULT_PIECE_LENGTH,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
) -> ImageTarget:
    """Publish ``image`` as the signed target ``images/<name>/<version>`` of ``repo``.

    ``format`` is detected from the content when not given (:func:`detect_format`);
    a given one must agree with it.  Returns the signed target; publishing
    the same content again returns the existing target unchanged.

    Raises:
        ImageError: bad name, version, format or piece length; the image is
            missing, not a regular file, empty or changed while copied; the
            version is already published with other content (a published
            version is immutable); the store cannot be written or the torrent
            cannot be made.  Nothing already stored is changed.
        trust.exceptions.TrustError: the keys are unusable, or another publish
            holds the repository's lock.
    """
    checked = _check_input(image, name, version, repo, format, piece_length)
    origin = OriginStore(store, repo)
    with RepositoryWriter.open(origin.metadata_dir, keys) as writer:
        try:
            origin.create()
        except OSError as exc:
            raise ImageError(f"cannot create the store {origin.root}: {exc.strerror}") from None
        target_name = image_target_name(name, version)
        signed = writer.targets().get(target_name)
        if signed is not None:
            try:
                existing = ImageTarget.from_target_file(signed)
            except VerificationError as exc:
                raise ImageError(f"{target_name} is already signed, but malformed: {exc}") from exc
            return _republish(origin, existing, checked, progress)
        target = _publish_new(origin, name, version, checked, piece_length, progress, clock)
        try:
            writer.commit({target_name: target.to_target_file()})  # the commit point
        except BaseException:
            _discard(image_dir(origin, target) / target.file)
            raise
        return target


def _immutable(existing: ImageTarget, why: str) -> ImageError:
    return ImageError(
        f"image {existing.name} version {existing.version} is already published "
        f"(sha256 {existing.sha256}, {existing.size} bytes) and {why}: a published "
        "version is immutable; publish a new version"
    )


def _republish(
    origin: OriginStore, existing: ImageTarget, checked: _Checked, progress: Progress | None
) -> ImageTarget:
    if checked.size != existing.size:
        raise _immutable(existing, f"this image has {checked.size} bytes")
    try:
        digest, size = hash_file(checked.image, progress=progress)
    except OSError as exc:
        raise ImageError(f"image {checked.image}: {exc.strerror}") from None
    if (digest, size) != (existing.sha256, existing.size):
        raise _immutable(existing, f"this image has sha256 {digest}")
    _restore(origin, existing, checked, progress)
    logger.info(
        "image %s %s is already published with this content: nothing to do",
        existing.name,
        existing.version,
    )
    return existing


def _restore(
    origin: OriginStore, existing: ImageTarget, checked: _Checked, progress: Progress | None
) -> None:
    """Put back a signed image's stored file or torrent object if they went missing."""
    final = image_dir(origin, existing) / existing.file
    try:
        if not final.is_file() or final.stat().st_size != existing.size:
            final.parent.mkdir(parents=True, exist_ok=True)
            _install(checked.image, final, existing.size, existing.sha256, progress)
        torrent = origin.path_of(existing.torrent_sha256)
        if not torrent.is_file() or torrent.stat().st_size != existing.torrent_length:
            meta = _make_torrent(final.parent, existing.file, existing.piece_length, progress)
            if hashlib.sha256(meta.data).hexdigest() != existing.torrent_sha256:
                raise ImageError(
                    f"the torrent object {existing.torrent_sha256} of image {existing.name} "
                    f"{existing.version} is missing and cannot be rebuilt identically"
                )
            _store_object(origin, meta.data)
    except OSError as exc:
        raise ImageError(f"cannot restore image {existing.name}: {exc}") from exc


def _install(src: Path, final: Path, size: int, want: str | None, progress: Progress | None) -> str:
    """Copy ``src`` to ``final`` through a temporary name; return its sha256.

    With ``want``, a copy of other content is discarded and refused."""
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    try:
        digest = _copy_hashed(src, tmp, size, progress)
        if want is not None and digest != want:
            raise ImageError(f"{src} changed while it was copied (sha256 {digest})")
        os.rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return digest


def _make_torrent(
    directory: Path, file: str, piece_length: int, progress: Progress | None
) -> TorrentMeta:
    size = (directory / file).stat().st_size
    if progress is not None:
        progress("torrent", 0, size)
    try:
        meta = create_torrent(directory, [file], name=file, piece_length=piece_length)
    except TransferError as exc:
        raise ImageError(f"cannot make the torrent of {directory / file}: {exc}") from exc
    if progress is not None:
        progress("torrent", size, size)
    return meta


def _store_object(origin: OriginStore, data: bytes) -> str:
    digest = ObjectWriter(origin.data_dir).put(data)
    path = origin.path_of(digest)
    fsync_file(path)
    fsync_dir(path.parent)
    return digest


def _publish_new(
    origin: OriginStore,
    name: str,
    version: str,
    checked: _Checked,
    piece_length: int,
    progress: Progress | None,
    clock: Callable[[], float],
) -> ImageTarget:
    images = origin.root / IMAGES_DIR
    directory = images / name / version
    final = directory / checked.file
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for d in (images, directory.parent):
            fsync_dir(d.parent)
    except OSError as exc:
        raise ImageError(f"cannot create {directory}: {exc.strerror}") from None
    try:
        digest = _install(checked.image, final, checked.size, None, progress)
        meta = _make_torrent(directory, checked.file, piece_length, progress)
        if len(meta.files) != 1 or meta.name != checked.file:
            raise ImageError(f"the torrent of {final} is not a single-file torrent")
        torrent = _store_object(origin, meta.data)
        return ImageTarget(
            name=name,
            version=version,
            format=checked.format,
            size=checked.size,
            sha256=digest,
            file=checked.file,
            info_hash=meta.info_hash,
            pieces_root=meta.files[0].pieces_root,
            piece_length=meta.piece_length,
            torrent_sha256=torrent,
            torrent_length=len(meta.data),
            published=int(clock()),
        )
    except OSError as exc:
        _discard(final)
        raise ImageError(f"cannot store image {name} {version}: {exc}") from exc
    except BaseException:
        # Nothing signs this version yet: remove the copy so a failed
        # publish leaves the store as it was (the torrent object, if any, is
        # unreferenced and harmless).
        _discard(final)
        raise


def _discard(final: Path) -> None:
    final.unlink(missing_ok=True)
    for d in (final.parent, final.parent.parent):
        try:
            d.rmdir()
        except OSError:
            break
