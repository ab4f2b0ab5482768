"""The runner's subcommands, called through runner.cli.main."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner.cli import main

SYNTH = str(Path(__file__).with_name("synth_events.py"))


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runner.cli._STATE", tmp_path / "state")
    monkeypatch.delenv("MACHINEFEATURES", raising=False)
    monkeypatch.delenv("JOBFEATURES", raising=False)


def _spec(tmp_path: Path, min_events: int = 1) -> Path:
    p = tmp_path / "job.toml"
    cmd = json.dumps([sys.executable, SYNTH, "{first}", "{count}", "{output}"])
    p.write_text(
        f'name = "synth"\ncommand = {cmd}\ncpu_work_per_event = 1.0\n'
        f"max_events = 30\nmin_events = {min_events}\nevents_per_task = 10\n"
    )
    return p


def test_job_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["job", "run", str(_spec(tmp_path)), "--cores", "2", "--time-left", "100"]
    args += ["--job-user", "root"]  # the venv's python may not be reachable by nobody
    code = main([*args, "--power", "10", "--output", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["events_planned"] == out["events_done"] == 30
    assert out["wall_seconds"] > 0 and out["cpu_seconds"] > 0


def test_job_refused_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["job", "run", str(_spec(tmp_path, min_events=30)), "--cores", "1"]
    code = main([*args, "--time-left", "1", "--power", "1", "--output", str(tmp_path / "o")])
    assert code == 3 and "refused" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lease_json_with_mjf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mjf = tmp_path / "mjf"
    mjf.mkdir()
    (mjf / "hs06").write_text("40")
    (mjf / "total_cpu").write_text("4")
    (mjf / "shutdowntime").write_text("bogus")
    monkeypatch.setenv("MACHINEFEATURES", str(mjf))
    assert main(["lease", "--json", "--time-left", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cores"] == 4 and out["power_per_core"] == 10.0 and out["time_left"] == 60
    assert any("shutdowntime is malformed" in w for w in out["warnings"])


def test_bad_spec_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    assert main(["job", "run", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "'command'" in capsys.readouterr().err


def test_pilot_runs_the_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    _spec(tmp_path).rename(queue / "a.toml")
    args = ["pilot", str(queue), "--cores", "2", "--time-left", "100", "--power", "10"]
    assert main([*args, "--job-user", "root"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [j["spec"] for j in out["jobs_run"]] == ["a.toml"]
    assert out["events_done"] == 30 and out["stopped"] == "queue empty"
    assert (queue / "done" / "a.report.json").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--cores", "-1"),
        ("--cores", "0"),
        ("--cores", "1.5"),
        ("--time-left", "nan"),
        ("--time-left", "inf"),
        ("--time-left", "-1"),
        ("--time-left", "0"),
        ("--power", "nan"),
        ("--power", "0"),
        ("--power", "-3"),
        ("--grace", "nan"),
        ("--grace", "-1"),
        ("--grace", "inf"),
        ("--cgroup-parent", "../x"),
    ],
)
def test_runner_options_refuse_bad_values_in_one_line_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    args = ["job", "run", str(_spec(tmp_path)), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main([*args, f"{option}={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"swarm job run: error: argument {option}: expected "), err
    assert not (tmp_path / "o").exists()
