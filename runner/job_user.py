"""Who a job's tasks run as, and what that user can reach and execute.

A node daemon runs as root (FUSE, cgroups); the jobs it runs must not. When
the node runs as root, every task of a job runs as a dedicated unprivileged
user (``nobody`` unless configured) with no supplementary groups; when it
does not, tasks run as the node's own user and nothing is switched
(:func:`job_user_for_node` returns None).

Invariant: what a job needs of the file system is checked against the job
user *before* anything of the job runs, as the kernel will check it (owner,
then group, then other bits; no supplementary groups): the work directory
must be reachable (:func:`check_reachable`) and the command executable
(:func:`command_path`), so a job that cannot run here fails at once with a
message naming the directory or file, not as every task's exit status.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.exceptions import ConfinementError, TaskError

DEFAULT_JOB_USER = "nobody"


@dataclass(frozen=True)
class JobUser:
    """The unprivileged identity a job's tasks run as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> JobUser:
        """The user named ``name`` (or a numeric uid) from the password database.

        Raises:
            ConfinementError: no such user.
        """
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except KeyError:
            raise ConfinementError(f"job user {name!r} does not exist on this node") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def job_user_for_node(
    name: str | None = DEFAULT_JOB_USER, euid: int | None = None
) -> JobUser | None:
    """The user jobs run as: ``name`` when the node runs as root, else None
    (tasks keep the node's own unprivileged user).

    Raises:
        ConfinementError: the node is root and ``name`` does not exist.
    """
    if (os.geteuid() if euid is None else euid) != 0 or not name:
        return None
    return JobUser.lookup(name)


def command_path(argv0: str, env: Mapping[str, str], user: JobUser | None) -> Path:
    """The file ``argv0`` names (searched in ``env``'s PATH without a slash).

    Raises:
        TaskError: it does not exist, is not a regular file, or the job user
            cannot reach or execute it (the job cannot run here as it is).
    """
    if "/" in argv0:
        found: str | None = argv0 if os.path.exists(argv0) else None
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if found is None:
        raise TaskError(f"cannot start {argv0!r}: no such file")
    path = Path(found)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise TaskError(f"cannot start {argv0!r}: not a regular file")
    if user is None:
        ok = os.access(path, os.X_OK)
        who = "this node's user"
    else:
        try:
            check_reachable(path.parent, user)
        except ConfinementError as exc:
            raise TaskError(f"cannot start {argv0!r}: {exc}") from None
        bit = (
            stat.S_IXUSR
            if st.st_uid == user.uid
            else stat.S_IXGRP
            if st.st_gid == user.gid
            else stat.S_IXOTH
        )
        ok = bool(st.st_mode & bit)
        who = f"job user {user.name}"
    if not ok:
        raise TaskError(
            f"cannot start {argv0!r}: {who} may not execute {path} "
            f"(mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid})"
        )
    return path


def check_reachable(path: Path, user: JobUser) -> None:
    """Raise unless ``user`` (no supplementary groups) can search every
    directory from ``/`` down to ``path``.

    Raises:
        ConfinementError: names the first directory that denies it.
    """
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        st = current.stat()
        if st.st_uid == user.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == user.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise ConfinementError(
                f"job user {user.name} cannot reach {path}: {current} is mode "
                f"{stat.S_IMODE(st.st_mode):o} owned by uid {st.st_uid}"
            )
