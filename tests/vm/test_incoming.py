"""A migration's destination request (``POST /v1/vms/incoming``'s body): what
the source writes is what the destination reads, and a request without a
well-formed public key, or with a bad agent or user_data, is refused naming
the field; the request carries no secret key."""

from __future__ import annotations

import dataclasses

import pytest

from vm.config import ImageName, IncomingRequest, parse_incoming
from vm.exceptions import VmConfigError

REQ = IncomingRequest(
    vm_id="20261201-074500-abcdef", image=ImageName("r.example.org", "guest", "1"), cores=1,
    memory=128 << 20, accelerator="tcg", software=False, started=1.8e9, ends=1.8e9 + 3600,
    source="http://10.0.0.1:7000/", source_key="0123456789abcdef" * 4, agent="1",
    user_data=b"#!/bin/sh\necho hi\n",
)  # fmt: skip


def test_the_destination_reads_what_the_source_wrote() -> None:
    assert parse_incoming(REQ.to_json()) == REQ
    assert "psk" not in REQ.to_json()
    bare = dataclasses.replace(REQ, agent=None, user_data=None)
    assert parse_incoming(bare.to_json()) == bare


@pytest.mark.parametrize(
    ("field", "value"),
    [("source_key", None), ("source_key", "short"), ("source_key", "0123456789ABCDEF" * 4),
     ("source_key", 7), ("psk", "0123456789abcdef" * 4),
     ("agent", ""), ("agent", 1), ("user_data", 5)],
)  # fmt: skip
def test_a_request_with_a_bad_key_agent_or_user_data_is_refused_naming_it(
    field: str, value: object
) -> None:
    doc = {**REQ.to_json(), field: value}
    if value is None:
        del doc[field]
    with pytest.raises(VmConfigError, match=f"^{field}: "):  # "psk": an unknown field now
        parse_incoming(doc)
