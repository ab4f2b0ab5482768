"""Fakes with the interfaces of the real dependencies, for fast tests."""

from __future__ import annotations

import threading
import time

from cvmfs_like.exceptions import ObjectUnavailable
from cvmfs_like.objects import ObjectSource, digest_of


class InMemoryObjectSource(ObjectSource):
    """An ObjectSource over a dict; can tamper, truncate, fail or be slow."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.tampered: dict[str, bytes] = {}
        self.down = False
        self.delay = 0.0
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def add(self, data: bytes) -> str:
        d = digest_of(data)
        self.objects[d] = data
        return d

    def fetch(self, digest: str, size: int) -> bytes:
        with self._lock:
            self.calls.append(digest)
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise ObjectUnavailable(digest, "fake source is down")
        if digest in self.tampered:
            return self.tampered[digest]
        try:
            return self.objects[digest]
        except KeyError:
            raise ObjectUnavailable(digest, "fake source: no such object") from None
