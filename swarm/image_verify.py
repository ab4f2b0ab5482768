"""VM images: is a local file a signed image the site's policy accepts, and why.

:func:`verify_image` hashes the file and looks for signed image targets (in
every repository given) with that SHA-256 and size; the site's policy then
judges the publisher.  A file that matches nothing gets the closest listed
image by name in its reason, so a wrong download is told apart from a
tampered one.  Verification only reads: nothing is written.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from swarm.exceptions import ImageError
from swarm.images import Progress, hash_file
from trust.exceptions import TrustError
from trust.policy import ImagePolicy, SignedRepository, Verdict
from trust.targets import ImageTarget


class ImageRepository(SignedRepository, Protocol):
    """What :func:`verify_image` needs of a :class:`trust.client.TrustedRepository`."""

    def images(self) -> list[ImageTarget]: ...


@dataclass(frozen=True)
class ImageMatch:
    """A signed image target with the file's hash, and the policy's verdict on it."""

    repo: str
    target: ImageTarget
    verdict: Verdict


@dataclass(frozen=True)
class ImageVerdict:
    """Whether a local file is a signed image the site's policy accepts, and why."""

    accepted: bool
    reason: str
    path: Path
    sha256: str
    size: int
    matches: tuple[ImageMatch, ...]  # every signed target with this sha256 and size
    problems: tuple[str, ...] = ()  # repositories that could not be consulted

    @property
    def match(self) -> ImageMatch | None:
        """The accepted match, or else the first one."""
        for m in self.matches:
            if m.verdict.accepted:
                return m
        return self.matches[0] if self.matches else None

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "path": str(self.path),
            "sha256": self.sha256,
            "size": self.size,
            "matches": [
                {
                    "repository": m.repo,
                    "target": m.target.target_name,
                    "accepted": m.verdict.accepted,
                    "code": m.verdict.code,
                    "reason": m.verdict.reason,
                    "custom": m.target.to_custom(),
                }
                for m in self.matches
            ],
            "problems": list(self.problems),
        }


def _closest(path: Path, listed: list[tuple[str, ImageTarget]]) -> tuple[str, ImageTarget] | None:
    def score(item: tuple[str, ImageTarget]) -> float:
        t = item[1]
        return max(
            difflib.SequenceMatcher(None, path.name, t.file).ratio(),
            difflib.SequenceMatcher(None, path.stem, f"{t.name}-{t.version}").ratio(),
            difflib.SequenceMatcher(None, path.stem, t.name).ratio(),
        )

    best = max(listed, key=score, default=None)
    return best if best is not None and score(best) >= 0.5 else None


def verify_image(
    path: Path,
    repos: Mapping[str, ImageRepository],
    policy: ImagePolicy,
    *,
    progress: Progress | None = None,
) -> ImageVerdict:
    """Hash ``path`` and say whether it is a signed image the site accepts.

    Looks for image targets with the file's sha256 and size in every
    repository of ``repos`` (each already refreshed or loaded from cache),
    and applies ``policy`` to each.  Accepted if any match is accepted.  A
    repository whose metadata cannot be read is reported in ``problems``
    and consulted no further.

    Raises:
        ImageError: ``path`` is missing, not a regular file or unreadable.
    """
    if not path.is_file():
        raise ImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        digest, size = hash_file(path, progress=progress)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    listed: list[tuple[str, ImageTarget]] = []
    matches: list[ImageMatch] = []
    problems: list[str] = []
    for repo in sorted(repos):
        trusted = repos[repo]
        try:
            images = trusted.images()
            listed += [(repo, t) for t in images]
            for t in images:
                if (t.sha256, t.size) == (digest, size):
                    matches.append(ImageMatch(repo, t, policy.check(repo, t, trusted)))
        except TrustError as exc:
            problems.append(f"repository {repo}: {exc}")
    short = f"sha256 {digest[:16]}… ({size} bytes)"
    accepted = next((m for m in matches if m.verdict.accepted), None)
    if accepted is not None:
        reason = f"{short} matches: {accepted.verdict.reason}"
    elif matches:
        reason = f"{short} matches, but " + "; ".join(m.verdict.reason for m in matches)
    else:
        names = ", ".join(sorted(repos)) or "no repository"
        reason = f"no signed image target has {short} in {names}"
        near = _closest(path, listed)
        if near is not None:
            r, t = near
            reason += (
                f"; closest by name: image {t.name} {t.version} of {r} ({t.file}, sha256 "
                f"{t.sha256[:16]}…, {t.size} bytes), which this file is not"
            )
    if problems and accepted is None:
        reason += "; could not consult " + "; ".join(problems)
    return ImageVerdict(
        accepted=accepted is not None,
        reason=reason,
        path=path,
        sha256=digest,
        size=size,
        matches=tuple(matches),
        problems=tuple(problems),
    )
