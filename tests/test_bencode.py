"""The test bencoder against BEP 3's own examples."""

from __future__ import annotations

import pytest

from swarm_testing.bencode import Bencodable, bencode


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (b"spam", b"4:spam"),
        ("spam", b"4:spam"),
        (3, b"i3e"),
        (-3, b"i-3e"),
        (0, b"i0e"),
        ([b"spam", b"eggs"], b"l4:spam4:eggse"),
        ({"cow": b"moo", "spam": b"eggs"}, b"d3:cow3:moo4:spam4:eggse"),
        ({"spam": [b"a", b"b"]}, b"d4:spaml1:a1:bee"),
        ({b"b": 1, "a": 2}, b"d1:ai2e1:bi1ee"),  # keys sorted as raw bytes
    ],
)
def test_bep3_examples(value: Bencodable, encoded: bytes) -> None:
    assert bencode(value) == encoded


def test_booleans_are_refused() -> None:
    with pytest.raises(TypeError, match="booleans"):
        bencode(True)
