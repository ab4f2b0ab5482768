"""The one size format (issue: `memory = "200M"` was ignored, `1e400G` crashed)."""

from __future__ import annotations

import pytest

from runner.sizes import MAX_SIZE, SizeError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("200M", 200 << 20),
        ("200m", 200 << 20),
        ("10G", 10 << 30),
        ("10GiB", 10 << 30),
        ("10 GB", 10 << 30),
        ("1.5K", 1536),
        ("2T", 2 << 40),
    ],
)
def test_sizes_parse_the_same_way_everywhere(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "G",
        "-1G",
        "0",
        0,
        -5,
        "1e400G",
        "inf",
        "nan",
        "1e-300",
        "12 parsecs",
        True,
        1.5,
        None,
        str(MAX_SIZE + 1),
        "9E",
    ],
)
def test_a_non_size_is_refused_with_what_is_accepted(bad: object) -> None:
    with pytest.raises(SizeError) as err:
        parse_size(bad)
    assert "\n" not in str(err.value)
    assert "size" in str(err.value)


def test_format_size_round_trips() -> None:
    for size in (1, 4096, 200 << 20, 10 << 30, 12345):
        assert parse_size(format_size(size)) == size
