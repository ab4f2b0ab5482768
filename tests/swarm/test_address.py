"""``HOST:PORT`` parsed and written in one place (``swarm/address.py``)."""

from __future__ import annotations

import re

import pytest

from swarm.address import Address, AddressError


@pytest.mark.parametrize(
    "text", ["10.1.0.1:6881", "[::1]:7000", "[fe80::1]:1", "node-1.example.org:65535"]
)
def test_str_is_read_back_as_the_same_address(text: str) -> None:
    address = Address.parse(text)
    assert str(address) == text and Address.parse(str(address)) == address
    assert hash(address) == hash(Address(address.host, address.port))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("10.1.0.1", "HOST:PORT"),
        ("10.1.0.1:", "HOST:PORT"),
        ("10.1.0.1:65536", "from 1 to 65535"),
        ("10.1.0.1:-1", "from 1 to 65535"),
        ("10.1.0.1:0", "from 1 to 65535"),  # 0 only where any free port will do
        ("10.1.0.1: 80", "HOST:PORT"),
        ("::1:80", "write [::1]:80"),
        ("[not-v6]:80", "bad IPv6 address"),
        ("[10.0.0.1]:80", "bad IPv6 address"),
        ("bad host:80", "bad host"),
        (":80", "no host"),
        (6881, "HOST:PORT"),
    ],
)
def test_a_bad_address_is_one_line_saying_what_is_accepted(text: object, says: str) -> None:
    with pytest.raises(AddressError, match=re.escape(says)) as err:
        Address.parse(text)
    assert "\n" not in str(err.value)


def test_a_listener_may_take_any_port_and_a_default_host() -> None:
    assert Address.parse(":0", default_host="0.0.0.0", any_port=True) == Address("0.0.0.0", 0)
    assert Address.parse("[::]:6881").is_unspecified and not Address("h", 1).is_unspecified


def test_an_address_cannot_be_changed() -> None:
    address = Address("10.0.0.1", 6881)
    with pytest.raises(AttributeError):
        address.port = 1
