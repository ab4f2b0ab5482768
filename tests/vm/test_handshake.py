"""A migration's keys and the admission of its relays (docs/VMS.md, "Trust:
migration traffic"): both sides derive the same keys from the two public keys
and nothing else crosses; a wrong key, a forged public key, garbage, an
oversized or a slow preamble is refused and never reaches qemu's socket, and
the relay keeps listening for the right key, which is admitted and relayed
both ways. Real sockets on 127.0.0.1 and in tmp_path; a unix echo server
stands for qemu."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from vm.exceptions import MigrationError, VmConfigError
from vm.handshake import (
    MAGIC,
    NONCE_BYTES,
    PROOF_BYTES,
    KeyPair,
    admits,
    nonce_of,
    parse_public_key,
    proof,
)
from vm.relay import (
    MAX_PENDING_PER_HOST,
    IncomingRelay,
    OutgoingRelay,
    admit,
    answer_challenge,
)

VM_ID = "20261201-110000-abcdef"


def pair_keys() -> tuple[KeyPair, KeyPair]:
    return KeyPair(), KeyPair()


def test_both_sides_derive_the_same_keys_bound_to_the_vm_and_both_public_keys() -> None:
    src, dst = pair_keys()
    a = src.keys(dst.public, vm_id=VM_ID, source=True)
    b = dst.keys(src.public, vm_id=VM_ID, source=False)
    assert a == b and len(a.psk) == 64 and len(a.admission) == 32
    assert a.psk != a.admission.hex()
    assert "psk" not in repr(a) and a.psk not in repr(a)
    # another VM, or the roles swapped, gives other keys
    assert src.keys(dst.public, vm_id="20261201-110000-000000", source=True) != a
    assert src.keys(dst.public, vm_id=VM_ID, source=False) != a
    # a forged public key (someone else's pair) gives keys the other side does not have
    forger = KeyPair()
    assert src.keys(forger.public, vm_id=VM_ID, source=True) != b
    # fresh pairs each time: no two migrations share a key
    again_src, again_dst = pair_keys()
    assert again_src.keys(again_dst.public, vm_id=VM_ID, source=True) != a


def test_a_public_key_that_is_malformed_or_a_low_order_point_is_refused_naming_it() -> None:
    for bad in ("", "ab" * 31, "AB" * 32, "zz" * 32, 7, None):
        with pytest.raises(VmConfigError, match=r"^key: expected an X25519 public key"):
            parse_public_key("key", bad)
    assert parse_public_key("key", "01" * 32) == bytes([1]) * 32
    with pytest.raises(VmConfigError, match=r"^key: not a usable X25519 public key"):
        KeyPair().keys(bytes(32), vm_id=VM_ID, source=True)  # all-zero shared secret


def test_a_proof_admits_only_its_key_its_channel_and_its_nonce() -> None:
    key, other = os.urandom(32), os.urandom(32)
    nonce = os.urandom(NONCE_BYTES)
    good = proof(key, "memory", nonce)
    assert admits(key, "memory", nonce, good)
    assert not admits(other, "memory", nonce, good)
    assert not admits(key, "disk", nonce, good)
    assert not admits(key, "memory", os.urandom(NONCE_BYTES), good)
    assert not admits(key, "memory", nonce, good[:-1])
    assert nonce_of(MAGIC + nonce) == nonce
    assert nonce_of(b"SSH-2.0-x\r\n" + nonce) is None


# -- the relays, on real sockets ------------------------------------------------------------


@asynccontextmanager
async def echo_server(path: Path) -> AsyncIterator[list[bytes]]:
    """A unix server standing for qemu: echoes, and records what each connection sent."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(b"")
        try:
            while data := await reader.read(65536):
                got[-1] += data
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield got
    finally:
        server.close()


@asynccontextmanager
async def relay(
    tmp_path: Path, key: bytes, deadline: float = 5.0
) -> AsyncIterator[tuple[IncomingRelay, int, list[bytes]]]:
    async with echo_server(tmp_path / "qemu.sock") as got:
        r = IncomingRelay(
            key=key, channel="memory", target=tmp_path / "qemu.sock", name="test", deadline=deadline
        )
        port = await r.start("127.0.0.1")
        try:
            yield r, port, got
        finally:
            await r.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the relay sends until it closes the connection (its greeting:
    a refused peer gets no more; the kernel resets a connection closed with
    unread data, which ends it as well)."""
    sent = await asyncio.wait_for(reader.readexactly(len(MAGIC) + NONCE_BYTES), timeout)
    with suppress(ConnectionResetError):
        sent += await asyncio.wait_for(reader.read(), timeout)
    return sent


def test_a_wrong_key_garbage_and_an_oversized_preamble_are_refused_and_the_right_key_admitted(
    tmp_path: Path,
) -> None:
    key = os.urandom(32)

    async def main() -> None:
        async with relay(tmp_path, key) as (r, port, got):
            # an idle connection (no key, nothing sent) does not hold the port
            idle = await asyncio.open_connection("127.0.0.1", port)
            # the migration's protocol with another key: refused, the source says why
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(MigrationError, match="refused the memory stream: its key differs"):
                await answer_challenge(reader, writer, key=os.urandom(32), channel="memory")
            writer.close()
            # a proof for the disk stream is not one for the memory stream
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(MigrationError, match="refused"):
                await answer_challenge(reader, writer, key=key, channel="disk")
            writer.close()
            # garbage, 1 MiB of it: refused after the first PROOF_BYTES bytes, at once
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(os.urandom(1 << 20))
            began = time.monotonic()
            sent = await closed_by_peer(reader, 4.0)
            assert time.monotonic() - began < 4.0
            assert sent.startswith(MAGIC) and len(sent) == len(MAGIC) + NONCE_BYTES  # no "+"
            writer.close()
            # then the right key, with the idle one still open: admitted, relayed both ways
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await answer_challenge(reader, writer, key=key, channel="memory")
            writer.write(b"qemu's TLS inside")
            assert await asyncio.wait_for(reader.readexactly(17), 5) == b"qemu's TLS inside"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # half-close goes through
            writer.close()
            assert got == [b"qemu's TLS inside"]  # nothing of the refused ones reached qemu
            assert (r.admitted, r.refused) == (1, 3)
            idle[1].close()

    asyncio.run(main())


def test_a_slow_preamble_is_refused_at_the_admission_deadline(tmp_path: Path) -> None:
    key = os.urandom(32)

    async def main() -> None:
        async with relay(tmp_path, key, deadline=0.5) as (r, port, got):
            began = time.monotonic()  # before the relay can start its clock
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * (PROOF_BYTES - 1))  # all but one byte, then nothing
            sent = await closed_by_peer(reader, 10.0)
            took = time.monotonic() - began
            assert 0.5 <= took < 0.5 + 5.0, took
            assert len(sent) == len(MAGIC) + NONCE_BYTES
            writer.close()
            assert got == [] and r.refused == 1

    asyncio.run(main())


def test_admission_reads_no_more_than_the_proof(tmp_path: Path) -> None:
    async def main() -> None:
        import socket

        a, b = socket.socketpair()
        with a, b:
            reader, writer = await asyncio.open_unix_connection(sock=a)
            b.sendall(b"G" * 4096)
            why = await admit(reader, writer, key=os.urandom(32), channel="disk", deadline=2)
            assert why is not None and "wrong answer" in why
            rest = await asyncio.wait_for(reader.readexactly(4096 - PROOF_BYTES), 2)
            assert rest == b"G" * (4096 - PROOF_BYTES)  # still unread: admit took 32 bytes
            writer.close()

    asyncio.run(main())


def test_the_source_relay_carries_qemus_stream_to_the_destination_once_admitted(
    tmp_path: Path,
) -> None:
    src, dst = pair_keys()
    mine = src.keys(dst.public, vm_id=VM_ID, source=True)
    theirs = dst.keys(src.public, vm_id=VM_ID, source=False)
    forged = src.keys(KeyPair().public, vm_id=VM_ID, source=True)

    async def main() -> None:
        async with relay(tmp_path, theirs.admission) as (_, port, got):
            out = OutgoingRelay(key=mine.admission, channel="memory", path=tmp_path / "out.sock",
                                host="127.0.0.1", port=port, name="test")  # fmt: skip
            await out.start()
            bad = OutgoingRelay(key=forged.admission, channel="memory",
                                path=tmp_path / "bad.sock", host="127.0.0.1", port=port,
                                name="test")  # fmt: skip
            await bad.start()
            try:
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "bad.sock"))
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed for qemu
                writer.close()
                assert bad.error is not None and "its key differs" in str(bad.error)
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "out.sock"))
                writer.write(b"memory pages")
                assert await asyncio.wait_for(reader.readexactly(12), 5) == b"memory pages"
                writer.close()
                assert out.error is None and got == [b"memory pages"]
            finally:
                await out.close()
                await bad.close()

    asyncio.run(main())


def test_a_finished_source_relay_delivers_all_qemu_wrote_before_it_closed(
    tmp_path: Path,
) -> None:
    # qemu reports a migration complete once its last byte is in the relay's
    # socket, and closes it; a destination that reads slowly must still get
    # every byte (closing the relays at that moment cut the stream: the
    # destination's qemu failed to load the device state).
    src, dst = pair_keys()
    mine = src.keys(dst.public, vm_id=VM_ID, source=True)
    theirs = dst.keys(src.public, vm_id=VM_ID, source=False)
    payload = os.urandom(8 << 20)

    async def main() -> None:
        got = bytearray()
        loaded = asyncio.Event()

        async def slow_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                got.extend(data)
                await asyncio.sleep(0.005)
            loaded.set()
            writer.close()  # as the destination's qemu closes once it has loaded

        server = await asyncio.start_unix_server(slow_qemu, str(tmp_path / "qemu.sock"))
        incoming = IncomingRelay(key=theirs.admission, channel="memory",
                                 target=tmp_path / "qemu.sock", name="test")  # fmt: skip
        port = await incoming.start("127.0.0.1")
        out = OutgoingRelay(key=mine.admission, channel="memory", path=tmp_path / "out.sock",
                            host="127.0.0.1", port=port, name="test")  # fmt: skip
        await out.start()
        try:
            _, writer = await asyncio.open_unix_connection(str(tmp_path / "out.sock"))
            writer.write(payload)
            await writer.drain()
            writer.close()  # "completed"
            assert await out.finish(30.0)
            await asyncio.wait_for(loaded.wait(), 30.0)
            assert len(got) == len(payload) and bytes(got) == payload
        finally:
            await out.close()
            await incoming.close()
            server.close()

    asyncio.run(main())


def test_one_host_cannot_hold_more_than_its_share_of_waiting_connections(tmp_path: Path) -> None:
    key = os.urandom(32)

    async def main() -> None:
        async with relay(tmp_path, key) as (r, port, got):
            idle = [await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(MAX_PENDING_PER_HOST)]  # fmt: skip
            for reader, _ in idle:  # each is waiting for admission once it is greeted
                await asyncio.wait_for(reader.readexactly(len(MAGIC) + NONCE_BYTES), 5)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(MigrationError, match="closed the connection before its challenge"):
                await answer_challenge(reader, writer, key=key, channel="memory")
            writer.close()
            assert r.refused == 1 and got == []
            for _, w in idle:
                w.close()
            end = time.monotonic() + 10
            while True:  # the relay sees them go, then has room again
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    await answer_challenge(reader, writer, key=key, channel="memory")
                    writer.write(b"in")
                    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"in"
                    break
                except MigrationError:
                    assert time.monotonic() < end, "no room after the idle connections went"
                    await asyncio.sleep(0.05)
                finally:
                    writer.close()
            assert r.admitted == 1 and got[-1] == b"in"

    asyncio.run(main())
