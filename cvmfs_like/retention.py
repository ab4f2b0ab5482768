"""Naming and keeping revisions: tags, and garbage collection of the store.

``gc`` keeps the newest ``keep`` revisions plus every tagged one, removes the
other revision targets (a signed commit), then deletes objects no kept
catalog references, and temporary files left by killed publishes.  It holds
the publisher's lock throughout, so it never races a publish.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets, Timestamp

from cvmfs_like.catalog import Catalog
from cvmfs_like.exceptions import StoreError
from cvmfs_like.publish import _PublishState
from cvmfs_like.store import OriginStore
from trust.repository import RepositoryWriter
from trust.targets import ReleaseTarget, image_objects, is_valid_tag, releases_of, tags_of


@dataclass(frozen=True)
class GcResult:
    removed_revisions: list[int]
    kept_revisions: list[int]
    deleted_objects: int
    deleted_bytes: int


def _require(store: OriginStore) -> None:
    if not store.exists():
        raise StoreError(f"no repository {store.name!r} in store {store.root.parent}")


def list_revisions(store: OriginStore) -> tuple[list[ReleaseTarget], dict[str, ReleaseTarget]]:
    """Committed revisions (oldest first) and tags, read from the store's metadata.

    Raises:
        StoreError: the repository does not exist.
    """
    _require(store)
    targets = _committed_targets(store.metadata_dir)
    return releases_of(targets), tags_of(targets)


def _committed_targets(metadata_dir: Path) -> dict[str, TargetFile]:
    """The committed targets, following timestamp -> snapshot -> targets.

    The publisher's own store is trusted locally (no signature check here:
    nodes verify).
    """
    ts_path = metadata_dir / "timestamp.json"
    if not ts_path.exists():
        return {}
    try:
        ts = Metadata[Timestamp].from_bytes(ts_path.read_bytes())
        snap_v = ts.signed.snapshot_meta.version
        snap = Metadata[Snapshot].from_bytes(
            (metadata_dir / f"{snap_v}.snapshot.json").read_bytes()
        )
        targets_v = snap.signed.meta["targets.json"].version
        targets = Metadata[Targets].from_bytes(
            (metadata_dir / f"{targets_v}.targets.json").read_bytes()
        )
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"unreadable metadata in {metadata_dir}: {exc}") from exc
    return dict(targets.signed.targets)


def tag(
    store: OriginStore,
    keydir: Path,
    name: str,
    revision: int | None = None,
    *,
    delete: bool = False,
) -> ReleaseTarget | None:
    """Point tag ``name`` at ``revision`` (default: newest), or delete it.

    Raises:
        StoreError: bad tag name, unknown revision or tag.
    """
    _require(store)
    if not is_valid_tag(name):
        raise StoreError(f"bad tag name {name!r}: 1-64 of letters, digits, '.', '_', '-'")
    with RepositoryWriter.open(store.metadata_dir, keydir) as repo:
        targets = repo.targets()
        if delete:
            if name not in tags_of(targets):
                raise StoreError(f"no tag {name!r}")
            repo.commit({}, remove=[f"tags/{name}"])
            return None
        releases = {r.revision: r for r in releases_of(targets)}
        if not releases:
            raise StoreError("the repository has no revision to tag")
        rev = max(releases) if revision is None else revision
        if rev not in releases:
            raise StoreError(f"no revision {rev} (have {min(releases)}..{max(releases)})")
        r = releases[rev]
        tagged = ReleaseTarget(
            r.revision, r.catalog, r.catalog_size, r.published, r.files, r.total_bytes, tag=name
        )
        repo.commit({tagged.target_name: tagged.to_target_file()})
        return tagged


def catalog_tree_objects(store: OriginStore, root: str) -> set[str]:
    """Every object a revision needs: its catalogs and what they reference."""
    live = {root}
    stack = [root]
    while stack:
        cat = Catalog(store.path_of(stack.pop()))
        try:
            objects = cat.objects()
            stack.extend(h for h, _ in cat.nested.values() if h not in live)
        finally:
            cat.close()
        live.update(objects)
    return live


def _extension_objects(target: TargetFile | None) -> set[str]:
    """Objects a revision's target names beside its catalog tree: the
    torrent a publish extension added (``custom.torrent.sha256``)."""
    custom = None if target is None else target.custom
    torrent = custom.get("torrent") if isinstance(custom, dict) else None
    sha = torrent.get("sha256") if isinstance(torrent, dict) else None
    return {sha} if isinstance(sha, str) else set()


def gc(
    store: OriginStore, keydir: Path, keep: int = 3, *, dry_run: bool = False, min_age: float = 0.0
) -> GcResult:
    """Drop old revisions and unreferenced objects.

    Raises:
        StoreError: ``keep`` < 1 or the repository does not exist.
    """
    if keep < 1:
        raise StoreError("gc --keep must be at least 1")
    _require(store)
    with RepositoryWriter.open(store.metadata_dir, keydir) as repo:
        targets = repo.targets()
        releases = releases_of(targets)
        tags = tags_of(targets)
        tagged = {t.revision for t in tags.values()}
        kept = releases[-keep:]
        removed = [r for r in releases[:-keep] if r.revision not in tagged]
        kept_all = kept + [r for r in releases[:-keep] if r.revision in tagged]
        if removed and not dry_run:
            repo.commit({}, remove=[r.target_name for r in removed])

        live: set[str] = image_objects(targets)
        for r in [*kept_all, *tags.values()]:
            live |= catalog_tree_objects(store, r.catalog)
            live |= _extension_objects(targets.get(f"revisions/{r.revision}"))
        deleted: set[str] = set()
        deleted_bytes = 0
        now = time.time()
        for sub in sorted(store.data_dir.iterdir()):
            for entry in os.scandir(sub):
                st = entry.stat()
                if entry.name in live or now - st.st_mtime < min_age:
                    continue
                if not dry_run:
                    os.unlink(entry.path)
                if not entry.name.startswith(".tmp-"):
                    deleted.add(entry.name)
                    deleted_bytes += st.st_size
        if deleted and not dry_run:
            state = _PublishState(store.private_dir / "state.sqlite")
            try:
                state.forget(deleted)
            finally:
                state.close()
    return GcResult(
        [r.revision for r in removed],
        sorted(r.revision for r in kept_all),
        len(deleted),
        deleted_bytes,
    )
