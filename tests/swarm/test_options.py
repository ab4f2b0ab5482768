"""Durations, counts and directories as checked where they enter (swarm/options.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from swarm.exceptions import ConfigError
from swarm.options import (
    MAX_SECONDS,
    MIN_SECONDS,
    OneLineParser,
    ValueRangeError,
    check_directory,
    count_argument,
    existing_directory,
    parse_count,
    parse_seconds,
    seconds_argument,
)


@pytest.mark.parametrize(
    ("value", "seconds"), [(30, 30.0), (0.5, 0.5), ("2.5", 2.5), (MIN_SECONDS, MIN_SECONDS)]
)
def test_durations_in_range_are_seconds(value: object, seconds: float) -> None:
    assert parse_seconds(value) == seconds
    assert parse_seconds(MAX_SECONDS) == MAX_SECONDS


@pytest.mark.parametrize(
    "value", [0, -1, math.nan, math.inf, -math.inf, "nan", "1e400", 1e9, "soon", True, None]
)
def test_durations_out_of_range_say_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueRangeError, match=r"expected a number of seconds from 0\.1 to 604800"):
        parse_seconds(value)


def test_counts_are_whole_numbers_in_range() -> None:
    assert parse_count("4096") == 4096 and parse_count(0, minimum=0) == 0
    for bad in (0, "-3", "1.5", 2.0, True, "many"):
        with pytest.raises(ValueRangeError, match="expected a whole number of at least 1"):
            parse_count(bad)
    with pytest.raises(ValueRangeError, match="from 1 to 64, got 65"):
        parse_count(65, maximum=64)


def test_a_bad_option_value_is_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = OneLineParser(prog="swarm mount")
    p.add_argument("--ttl", type=seconds_argument())
    p.add_argument("--keep", type=count_argument(1))
    assert p.parse_args(["--ttl", "1.5", "--keep", "2"]) == argparse.Namespace(ttl=1.5, keep=2)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--ttl", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swarm mount: argument --ttl: expected")


def test_directories_are_checked_without_creating_anything(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert check_directory(tmp_path / "new" / "deeper", "data_dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=r"^data_dir: .*/file is not a directory$"):
        check_directory(tmp_path / "file", "data_dir")
    with pytest.raises(ConfigError, match=r"^data_dir: cannot create .*: .*/file is not a dir"):
        check_directory(tmp_path / "file" / "sub", "data_dir")
    with pytest.raises(ConfigError, match=r"^--store: .*/absent does not exist$"):
        existing_directory(tmp_path / "absent", "--store")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]
