"""The repository-name rule: one rule for every place a repository is named.

A repository name is a directory name in the origin store and in a node's
``data_dir``, a path segment of every origin URL (``BASE/NAME/metadata/``),
the ``repo`` of a key directory and a table name in the node config.  All of
them accept exactly the names a publisher can create, so a node is never
configured for a repository no store can hold, and the origin serves every
repository a publisher wrote.

The rule (the store's, unchanged since the first publish): a letter or a
digit, then letters, digits, dots and dashes, 253 characters at most (a DNS
name's length, e.g. ``sw.example.org``), and never ``..``.  So a name is
never empty, ``.`` or ``..``, never holds ``/`` and never starts with ``-``
(not an option) or ``.`` (not hidden).

It lives in ``trust`` because ``trust`` is the bottom layer: ``cvmfs_like``
(the store) and ``swarm`` (config, origin, CLI) both import it, and
``trust/keys.py`` uses it for key directories.  The rule is a predicate and a
sentence; each package raises its own error with that sentence.
"""

from __future__ import annotations

import re

MAX_REPO_NAME = 253
_REPO_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9.-]{{0,{MAX_REPO_NAME - 1}}}")
REPO_NAME_RULE = (
    "use letters, digits, dots and dashes, starting with a letter or digit,"
    f" no '..', at most {MAX_REPO_NAME} characters (e.g. sw.example.org)"
)


def is_repo_name(name: object) -> bool:
    """Whether ``name`` is a repository name (never raises)."""
    return isinstance(name, str) and bool(_REPO_NAME.fullmatch(name)) and ".." not in name


def repo_name_problem(name: object) -> str | None:
    """``None`` for a repository name, else one line saying what is accepted."""
    if is_repo_name(name):
        return None
    return f"bad repository name {name!r}: {REPO_NAME_RULE}"
