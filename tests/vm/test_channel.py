"""The wire protocol's strict, bounded decoding and the host's port link
(vm/channel.py), over real unix sockets standing in for qemu's chardevs."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from vm.channel import (
    MAX_LINE,
    READY,
    Done,
    GuestDecoder,
    GuestEvent,
    Hello,
    OutputFile,
    PortLink,
    Refused,
    encode_file,
    guest_line,
    max_file_bytes,
)


def test_host_files_are_encoded_as_one_line_and_bad_paths_refused() -> None:
    line = encode_file("machinefeatures/shutdowntime", b"1800000000")
    assert line == b"FILE machinefeatures/shutdowntime " + base64.b64encode(b"1800000000") + b"\n"
    assert encode_file("user_data", b"#!/bin/sh\n").startswith(b"FILE user_data ")
    for bad in ("machinefeatures/../x", "jobfeatures/UPPER", "joboutputs/x", "user_data2"):
        with pytest.raises(ValueError, match="not machinefeatures"):
            encode_file(bad, b"")
    with pytest.raises(ValueError, match="do not fit"):
        encode_file("user_data", b"x" * (max_file_bytes("user_data") + 3))
    assert len(encode_file("user_data", b"x" * max_file_bytes("user_data"))) <= MAX_LINE


def test_guest_lines_decode_into_events_split_anywhere() -> None:
    stream = (
        guest_line(b"HELLO", b"1")
        + guest_line(b"FILE", b"joboutputs/vm-heartbeat", base64.b64encode(b"beat"))
        + guest_line(b"FILE", b"joboutputs/empty", b"")
        + b"DONE\n"
    )
    for cut in (1, 7, len(stream) // 2):
        d = GuestDecoder()
        events = d.receive(stream[:cut]) + d.receive(stream[cut:])
        assert events == [
            Hello("1"),
            OutputFile("vm-heartbeat", b"beat"),
            OutputFile("empty", b""),
            Done(),
        ]


@pytest.mark.parametrize(
    "line",
    [
        b"HELLO",
        b"HELLO two words",
        b"FILE machinefeatures/x eA==",
        b"FILE joboutputs/../../etc eA==",
        b"FILE joboutputs/ok not*base64",
        b"FILE joboutputs/ok eA=",
        b"FILE joboutputs/ok",
        b"READY",
        b"\x00\xff",
        b"",
    ],
)
def test_a_malformed_line_is_refused_and_the_next_one_still_decodes(line: bytes) -> None:
    d = GuestDecoder()
    events = d.receive(line + b"\nDONE\n")
    assert len(events) == 2 and isinstance(events[0], Refused) and events[1] == Done()


def test_a_line_too_long_is_refused_without_holding_it_and_decoding_goes_on() -> None:
    d = GuestDecoder()
    events: list[GuestEvent] = []
    chunk = b"x" * (256 << 10)
    for _ in range(12):  # 3 MiB without a newline
        events += d.receive(chunk)
        assert len(d._buf) <= MAX_LINE
    events += d.receive(b"tail\nHELLO 2\n")
    assert events == [Refused(f"a line longer than {MAX_LINE} bytes"), Hello("2")]
    # exactly at the limit is still a line
    payload = base64.b64encode(b"y" * max_file_bytes("joboutputs/f"))
    ok = guest_line(b"FILE", b"joboutputs/f", payload)
    assert len(ok) <= MAX_LINE
    assert isinstance(GuestDecoder().receive(ok)[0], OutputFile)


OPEN: list[asyncio.StreamWriter] = []


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def serve_port(path: Path) -> tuple[asyncio.Server, asyncio.Queue[Conn]]:
    conns: asyncio.Queue[Conn] = asyncio.Queue()

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await conns.put((r, w))
        OPEN.append(w)

    return await asyncio.start_unix_server(accept, str(path)), conns


def test_the_link_greets_on_every_connect_delivers_events_and_reconnects(tmp_path: Path) -> None:
    async def main() -> None:
        host_sock, guest_sock = tmp_path / "h.sock", tmp_path / "g.sock"
        events: list[GuestEvent] = []
        got = asyncio.Event()

        async def on_event(e: GuestEvent) -> None:
            events.append(e)
            got.set()

        link = PortLink(
            host_sock,
            guest_sock,
            greeting=lambda: [encode_file("jobfeatures/job_id", b"vm-1"), READY],
            on_event=on_event,
        )
        runner = asyncio.create_task(link.run())  # before the sockets exist: it retries
        await asyncio.sleep(0.2)
        hs, hconns = await serve_port(host_sock)
        gs, gconns = await serve_port(guest_sock)
        try:
            r, w = await asyncio.wait_for(hconns.get(), 10)
            first = await asyncio.wait_for(r.readuntil(b"READY\n"), 10)
            assert first.startswith(b"FILE jobfeatures/job_id ")
            _, gw = await asyncio.wait_for(gconns.get(), 10)
            gw.write(b"HELLO 1\nnonsense\n")
            await gw.drain()
            await asyncio.wait_for(got.wait(), 10)
            while len(events) < 2:
                await asyncio.sleep(0.01)
            assert events[0] == Hello("1") and isinstance(events[1], Refused)
            assert link.refused == 1
            # qemu drops the host port (a migration, a restart): the link comes back
            w.close()
            r2, _ = await asyncio.wait_for(hconns.get(), 10)
            again = await asyncio.wait_for(r2.readuntil(b"READY\n"), 10)
            assert again == first and link.connects == 2
            assert await link.send([b"STOP\n"])
            assert await asyncio.wait_for(r2.readline(), 10) == b"STOP\n"
        finally:
            link.close()
            await asyncio.wait_for(runner, 10)
            hs.close()
            gs.close()
            for wr in OPEN:
                wr.close()
            OPEN.clear()
            await hs.wait_closed()
            await gs.wait_closed()

    asyncio.run(main())
