"""The ``swarm`` command line, run for real (subprocesses): a bad value in a
node config key or an option is one line on stderr naming it, exit status 2,
and nothing is created or stored."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.config import render_config
from trust.keys import init_keys

REPO = "sw.example.org"
NOWHERE = "http://127.0.0.1:9/"  # the discard port: nothing answers


@dataclass
class Case:
    """A temporary directory with a repository's keys and a source tree."""

    tmp: Path
    cleanup: ExitStack

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    def node(self, settings: dict[str, object], repo: dict[str, object] | None = None) -> list[str]:
        base: dict[str, object] = {
            "data_dir": self.tmp / "data",
            "api": "127.0.0.1:0",
            "listen": "127.0.0.1:0",
            "peer": "127.0.0.1:0",
            "dht": False,
        }
        repos = {} if repo is None else {REPO: {"trust": self.keys / "root.json", **repo}}
        (self.tmp / "node.toml").write_text(render_config(base | settings, repos))
        return ["node", "--config", str(self.tmp / "node.toml")]

    def mount(self, *options: str, mountpoint: str = "mnt") -> list[str]:
        return [
            "mount",
            REPO,
            mountpoint,
            "--origin",
            NOWHERE,
            "--trust",
            str(self.keys / "root.json"),
            "--cache",
            "cache",
            *options,
        ]

    def publish(self, *options: str, store: str = "store") -> list[str]:
        return ["publish", "src", "--repo", REPO, "--keys", "keys", "--store", store, *options]

    def file(self, name: str) -> Path:
        (self.tmp / name).write_text("precious\n")
        return self.tmp / name

    def read_only_dir(self, name: str) -> Path:
        """A directory on a small tmpfs remounted read-only (unmounted at the end)."""
        d = self.tmp / name
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
        self.cleanup.callback(subprocess.run, ["umount", str(d)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d


Setup = Callable[[Case], list[str]]


def bad(what: str, setup: Setup, names: str, *, root: bool = False) -> object:
    marks = [pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]
    return pytest.param(setup, names, id=what, marks=marks if root else [])


def store_cmd(*args: str) -> Setup:
    return lambda c: [*args, "--repo", REPO, "--keys", "keys", "--store", "store"]


BAD_VALUES = [
    bad("data_dir is a file", lambda c: c.node({"data_dir": c.file("data")}), "data_dir"),
    bad(
        "data_dir on a read-only file system",
        lambda c: c.node({"data_dir": c.read_only_dir("ro")}),
        "data_dir",
        root=True,
    ),
    bad(
        "data_dir below a read-only file system",
        lambda c: c.node({"data_dir": c.read_only_dir("ro") / "data"}),
        "data_dir",
        root=True,
    ),
    bad("data_dir below a file", lambda c: c.node({"data_dir": c.file("f") / "d"}), "data_dir"),
    bad("mount is a file", lambda c: c.node({"mount": c.file("mntfile")}), "mount"),
    bad("--store is a file", lambda c: c.publish(store=str(c.file("store"))), "--store"),
    bad(
        "cache_quota 1e400G",
        lambda c: c.node({}, {"cache_quota": "1e400G"}),
        'repositories."sw.example.org".cache_quota',
    ),
    bad("--quota 1e400G", lambda c: c.mount("--quota", "1e400G"), "--quota"),
    bad("fetch_timeout inf", lambda c: c.node({"fetch_timeout": float("inf")}), "fetch_timeout"),
    bad(
        "refresh_interval nan",
        lambda c: c.node({"refresh_interval": float("nan")}),
        "refresh_interval",
    ),
    bad("refresh_interval 0", lambda c: c.node({"refresh_interval": 0}), "refresh_interval"),
    bad("--ttl 0", lambda c: c.mount("--ttl", "0"), "--ttl"),
    bad("--ttl negative", lambda c: c.mount("--ttl=-1"), "--ttl"),
    bad("--ttl nan", lambda c: c.mount("--ttl", "nan"), "--ttl"),
    bad("--catalog-entries 0", lambda c: c.publish("--catalog-entries", "0"), "--catalog-entries"),
    bad("--fetch-timeout -1", lambda c: c.mount("--fetch-timeout=-1"), "--fetch-timeout"),
    bad("--fetch-timeout inf", lambda c: c.mount("--fetch-timeout", "inf"), "--fetch-timeout"),
    bad("mountpoint is a file", lambda c: c.mount(mountpoint=str(c.file("m"))), "mountpoint"),
    bad("--cache is a file", lambda c: [*c.mount()[:-1], str(c.file("cachefile"))], "--cache"),
    bad(
        "api_token_file in a missing directory",
        lambda c: c.node({"api_token_file": c.tmp / "absent" / "token"}),
        "api_token_file",
    ),
    bad("gc --keep 0", lambda c: [*store_cmd("gc")(c), "--keep", "0"], "--keep"),
    bad("tag --revision 0", lambda c: [*store_cmd("tag", "t")(c), "--revision", "0"], "--revision"),
    bad("reload --timeout inf", lambda c: ["reload", "mnt", "--timeout", "inf"], "--timeout"),
    bad(
        "keys init --root-keys 0",
        lambda c: ["keys", "init", "k2", "--repo", REPO, "--root-keys", "0"],
        "--root-keys",
    ),
    bad(
        "image verify --timeout nan",
        lambda c: [
            "image",
            "verify",
            "src/a",
            "--repo",
            REPO,
            "--trust",
            "keys/root.json",
            "--origin",
            NOWHERE,
            "--timeout",
            "nan",
        ],
        "--timeout",
    ),
    bad(
        "serve --listen with a port out of range",
        lambda c: ["serve", "src", "--listen", "127.0.0.1:70000"],
        "--listen",
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root`` with its type and content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.join(dirpath, name)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def case(tmp_path: Path) -> Iterator[Case]:
    init_keys(tmp_path / "keys", REPO)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a\n")
    (tmp_path / "mnt").mkdir()
    with ExitStack() as cleanup:
        yield Case(tmp_path, cleanup)


@pytest.mark.parametrize(("setup", "names"), BAD_VALUES)
def test_bad_values_get_a_one_line_error_naming_the_key(
    case: Case, setup: Setup, names: str
) -> None:
    argv = setup(case)
    before = _snapshot(case.tmp)
    r = subprocess.run(
        [sys.executable, "-m", "swarm", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=case.tmp,
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("swarm") and names in lines[0], lines[0]
    assert _snapshot(case.tmp) == before, "something was created or changed"
