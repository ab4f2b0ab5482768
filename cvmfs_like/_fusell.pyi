"""Types of the C extension ``cvmfs_like._fusell`` (see _fusell.c)."""

from typing import Any

STREAM_BIT_SHIFT: int

class Session:
    def __init__(
        self,
        ops: Any,
        mountpoint: str,
        options: list[str],
        entry_timeout: float,
        negative_timeout: float,
        no_open: bool,
        signals: bool,
        max_fds: int,
    ) -> None:
        """Create the session and mount it; its read table holds at most
        about ``max_fds`` descriptors.

        Raises:
            RuntimeError: bad options, or the mount failed.
        """

    def loop(self, threads: int) -> int:
        """Serve with up to ``threads`` workers until unmounted or ``exit``; then unmount."""

    def exit(self) -> None: ...
    def inval_entry(self, parent: int, name: bytes) -> int: ...
    def inval_inode(self, ino: int, off: int, length: int) -> int: ...
    def set_fds(self, ino: int, fds: list[int], offsets: list[int]) -> None: ...
    def set_paths(self, ino: int, paths: list[bytes], offsets: list[int], check_size: bool) -> None:
        """Until ``ino`` has an entry in the read table, a read of its chunk
        ``i`` (``offsets[i]`` to ``offsets[i+1]``) opens the verified object at
        ``paths[i]`` in C (checking its size if asked), as do the chunks ahead
        of the reader."""

    def drop_fds(self, ino: int) -> None: ...
    def drop_listings(self) -> None:
        """Forget every directory listing kept in C (a revision switch)."""

    def fd(self) -> int: ...
    def counters(self) -> dict[str, int]:
        """Requests that reached this process, by kind (open, opendir, read_c,
        read_py, lookup, readdir, getattr; lookup_c and readdir_c: those of
        lookup and readdir answered from the listing table), the microseconds
        spent answering them in Python, GIL waits included (lookup_us,
        read_py_us, readdir_us, getattr_us), the objects C opened itself
        (open_c, see set_paths), and the bytes the listing table holds
        (listed)."""
