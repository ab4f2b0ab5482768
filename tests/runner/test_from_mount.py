"""End to end: an elastic job whose command is read from a FUSE mount of a
published, signed release (``swarm job run`` with the command in the mount).

As root, the job's tasks run as the job user (``nobody``): the mount allows
other users then, and the mount point and work directory are in a directory
every user can reach.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from runner.cli import main
from tests.harness import MountProcess, OriginServer
from trust.keys import init_keys

pytestmark = pytest.mark.fuse
REPO = "sw.example.org"

SIMULATE = """\
#!/bin/sh
# simulate --first N --count C --out FILE: one record per event, tagged with
# the release's version (read from the mount too).
while [ $# -gt 1 ]; do
    case $1 in
        --first) first=$2 ;;
        --count) count=$2 ;;
        --out) out=$2 ;;
    esac
    shift 2
done
version=$(cat "$(dirname "$0")/../VERSION")
n=$first
end=$((first + count))
while [ "$n" -lt "$end" ]; do
    echo "event $n release $version uid $(id -u)"
    n=$((n + 1))
done > "$out"
"""


@pytest.fixture
def mounted_release(tmp_path: Path, open_dir: Path) -> Iterator[Path]:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "VERSION").write_text("7\n")
    simulate = src / "bin" / "simulate"
    simulate.write_text(SIMULATE)
    simulate.chmod(0o755)
    root_json = init_keys(tmp_path / "keys", REPO)
    publish(src, OriginStore(tmp_path / "store", REPO), tmp_path / "keys")
    with (
        OriginServer(tmp_path / "store") as origin,
        MountProcess(REPO, open_dir / "mnt", origin.url, root_json, tmp_path / "cache") as mount,
    ):
        yield mount.mountpoint


def test_elastic_job_runs_its_command_from_the_mount(
    mounted_release: Path,
    open_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("runner.cli._STATE", tmp_path / "state")
    monkeypatch.delenv("MACHINEFEATURES", raising=False)
    monkeypatch.delenv("JOBFEATURES", raising=False)
    command = [
        str(mounted_release / "bin" / "simulate"),
        *("--first", "{first}", "--count", "{count}", "--out", "{output}"),
    ]
    spec = tmp_path / "mc.toml"
    spec.write_text(
        f'name = "mc-sim"\ncommand = {json.dumps(command)}\n'
        "cpu_work_per_event = 1.0\nmax_events = 50\nmin_events = 10\n"
        "events_per_task = 6\nfirst_event = 1000\n"
    )
    work = open_dir / "job"
    # 0.8 x 60 s x 10 HS06 x 2 cores / 1 HS06.s = 960 events fit: max_events (50) wins
    args = ["job", "run", str(spec), "--cores", "2", "--time-left", "60", "--power", "10"]
    code = main([*args, "--output", str(work), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["complete"] and report["events_planned"] == report["events_done"] == 50
    assert report["tasks"] == 9 and report["failed_runs"] == 0
    uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    expected = [f"event {n} release 7 uid {uid}" for n in range(1000, 1050)]
    assert (work / "events.out").read_text().splitlines() == expected
