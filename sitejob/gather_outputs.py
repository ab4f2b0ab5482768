"""The outputs of accepted results: verified against their size and SHA-256,
downloaded from the job's object store, staged for the commit.

An output travels inline in its result (up to ``INLINE_MAX``) or as an
object in ``SITE_<ID>_OUT``. :meth:`OutputFetcher.verify` returns the
:class:`~sitejob.gather_dir.Staged` output (ready for
:meth:`~sitejob.gather_dir.GatherDir.commit`), a :class:`Refused` (the
output does not match its result: counted by ``kind``, never committed), or
None (the broker did not answer in time: the result is redelivered).

Invariants: an object is hashed and counted as it is written, and a get
stops as soon as it runs past the size its result claims; anything but a
good output leaves no temporary file behind; a disk that cannot take the
download ends the gather (:class:`~sitejob.exceptions.GatherError`), it is
never blamed on the result. Every get has a deadline (the request timeout
plus the size at :data:`OBJECT_RATE`); at most :data:`OBJECT_GETS` run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
from typing import TYPE_CHECKING, Any

from sitejob.exceptions import GatherError, ProtocolError
from sitejob.gather_dir import Staged
from sitejob.gather_session import GatherSession
from sitejob.protocol import ResultMsg, inline_bytes, output_bucket

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

OBJECT_RATE = 16 * 1024 * 1024  # bytes/s an object get must reach (beside the request timeout)
OBJECT_GETS = 4  # object-store downloads of one batch at once


class _TooLong(Exception):
    """An object longer than its result says."""


class _HashingFile(io.BufferedIOBase):
    """Where an object-store get writes: hashes and counts as it writes, and
    refuses more than ``limit`` bytes (an object bigger than it claims)."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__()
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close)
        self.sha = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.error: OSError | None = None

    def write(self, data: ReadableBuffer) -> int:
        chunk = bytes(data)
        self.size += len(chunk)
        if self.size > self.limit:
            raise _TooLong(f"object longer than the {self.limit} bytes reported")
        self.sha.update(chunk)
        try:
            return self.file.write(chunk)
        except OSError as exc:
            self.error = exc  # the disk's fault, not the object's
            raise

    def close(self) -> None:
        self.file.close()
        super().close()


class Refused(Exception):
    """An output that does not match its result: ``kind`` for the counters."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class OutputFetcher:
    """Verifies (and downloads) the outputs of one gather's accepted results."""

    def __init__(self, session: GatherSession) -> None:
        self.s = session
        self.gets = asyncio.Semaphore(OBJECT_GETS)
        self.objects: Any = None

    async def verify(self, res: ResultMsg) -> Staged | Refused | None:
        """Check the output of an accepted result against its size and SHA-256.

        Returns the staged output, the refusal, or None when the broker did
        not answer in time (the result is redelivered).
        """
        tmp = f"{self.s.files.tasks}/{res.task:06d}.{os.getpid()}.tmp"
        if res.inline is not None:
            try:
                data = inline_bytes(res)
            except ProtocolError as exc:
                return Refused("malformed", str(exc))
            if len(data) != res.size:
                return Refused("size mismatch", f"{len(data)} bytes, {res.size} reported")
            if hashlib.sha256(data).hexdigest() != res.sha256:
                return Refused("sha256 mismatch", "the output's SHA-256 is not the one reported")
            return Staged(res.task, res.node, res.generation, tmp, data, None)
        assert res.object is not None
        async with self.gets:
            return await self.fetch_object(res, tmp)

    async def fetch_object(self, res: ResultMsg, tmp: str) -> Staged | Refused | None:
        """Download the object of ``res`` into ``tmp``, hashing it on the way
        (anything but a good output leaves no ``tmp`` behind).

        Raises:
            GatherError: ``tmp`` cannot be written (the disk, not the result).
        """
        outcome = await self._fetch_object(res, tmp)
        if not isinstance(outcome, Staged):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return outcome

    async def _fetch_object(self, res: ResultMsg, tmp: str) -> Staged | Refused | None:
        from nats.js.errors import DigestMismatchError, ObjectNotFoundError

        assert res.object is not None
        try:
            if self.objects is None:
                self.objects = await self.s.call(
                    "object store", self.s.js.object_store(output_bucket(self.s.job))
                )
            info = await self.s.call("object info", self.objects.get_info(res.object))
        except ObjectNotFoundError:
            return Refused(
                "unknown object", f"no object {res.object} in {output_bucket(self.s.job)}"
            )
        except Exception as exc:
            self.s.warn("object", "cannot reach object %s (retrying later): %s", res.object, exc)
            return None
        if info.size != res.size:
            return Refused(
                "size mismatch", f"object {res.object} of {info.size} bytes, {res.size} reported"
            )
        try:
            sink = await asyncio.to_thread(_HashingFile, tmp, res.size)
        except OSError as exc:
            raise GatherError(f"cannot write {tmp}: {exc.strerror}") from None
        try:
            deadline = self.s.cfg.request_timeout + res.size / OBJECT_RATE
            await self.s.call("object get", self.objects.get(res.object, writeinto=sink), deadline)
        except ObjectNotFoundError:
            return Refused("unknown object", f"object {res.object} went away")
        except DigestMismatchError:
            return Refused("sha256 mismatch", f"object {res.object} does not match its own digest")
        except _TooLong as exc:
            return Refused("size mismatch", str(exc))
        except Exception as exc:
            if sink.error is not None:
                raise GatherError(f"cannot write {tmp}: {sink.error.strerror}") from None
            self.s.warn("object", "cannot fetch object %s (retrying later): %s", res.object, exc)
            return None
        finally:
            sink.close()
        if sink.size != res.size:
            return Refused(
                "size mismatch", f"object {res.object}: {sink.size} bytes, {res.size} reported"
            )
        if sink.sha.hexdigest() != res.sha256:
            return Refused(
                "sha256 mismatch", f"object {res.object}'s SHA-256 is not the one reported"
            )
        return Staged(res.task, res.node, res.generation, tmp, None, res.object)

    async def delete_object(self, name: str) -> None:
        """Delete a used object; a failure is left (the store goes at the end)."""
        if self.objects is None:
            return
        with contextlib.suppress(Exception):  # left over: removed with the store at the end
            await self.s.call("object delete", self.objects.delete(name))
