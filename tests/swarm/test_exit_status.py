"""``swarm`` run for real (subprocesses): an error of each package is one line
on stderr, no traceback, and the exit status ``swarm --help`` documents for
its cause (``swarm/cli.py`` ``EXIT_STATUSES``)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from tests.harness import OriginServer
from tests.trees import build_sample_tree
from trust.keys import init_keys

REPO = "sw.example.org"
NOWHERE = "http://127.0.0.1:9/"  # the discard port: nothing answers
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # logging, not an error


@dataclass
class Site:
    """A published repository served by a real origin on 127.0.0.1."""

    tmp: Path
    origin: str

    def mount(self, trust: Path) -> list[str]:
        return [
            "mount",
            REPO,
            "mnt",
            "--origin",
            self.origin,
            "--trust",
            str(trust),
            "--cache",
            "cache",
            "--fetch-timeout",
            "2",
            "--foreground",
        ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("site")
    init_keys(tmp / "keys", REPO)
    init_keys(tmp / "other-keys", REPO)  # the same name, other keys: a wrong trust root
    publish(build_sample_tree(tmp / "src"), OriginStore(tmp / "store", REPO), tmp / "keys")
    (tmp / "store" / "empty.example.org").mkdir()
    (tmp / "mnt").mkdir()
    (tmp / "bad-spec.toml").write_text('name = "x"\n')  # no command
    with OriginServer(tmp / "store") as origin:
        yield Site(tmp, origin.url)


Case = Callable[[Site], list[str]]
CASES = [
    pytest.param(
        lambda s: ["node", "--config", str(s.tmp / "missing.toml")], 2, id="swarm-ConfigError"
    ),
    pytest.param(
        lambda s: ["status", "--api", NOWHERE], 6, id="swarm-FetchError-node-api-unreachable"
    ),
    pytest.param(
        lambda s: ["keys", "init", str(s.tmp / "keys"), "--repo", REPO],
        2,
        id="trust-TrustConfigError-keys-exist",
    ),
    pytest.param(
        lambda s: s.mount(s.tmp / "other-keys" / "root.json"),
        5,
        id="trust-VerificationError-wrong-trust-root",
    ),
    pytest.param(
        lambda s: ["revisions", "--repo", "empty.example.org", "--store", str(s.tmp / "store")],
        1,
        id="cvmfs_like-StoreError-no-repository",
    ),
    pytest.param(
        lambda s: ["job", "run", str(s.tmp / "bad-spec.toml"), "--output", str(s.tmp / "out")],
        1,
        id="runner-JobSpecError",
    ),
]


@pytest.mark.parametrize(("argv", "status"), CASES)
def test_an_error_of_each_package_is_one_line_with_its_documented_exit_status(
    site: Site, argv: Case, status: int
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "swarm", *argv(site)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=site.tmp,
    )
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("swarm: ")]
    assert len(errors) == 1, r.stderr
    assert all(line in errors or LOG_RECORD.match(line) for line in lines), r.stderr
    assert r.returncode == status, (r.returncode, r.stderr)


def test_the_exit_statuses_are_documented_in_help() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "swarm", "--help"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0
    for status in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert any(line.split()[:1] == [status] for line in r.stdout.splitlines()), status
