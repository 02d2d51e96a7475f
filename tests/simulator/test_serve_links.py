"""The simulator's links, in-process: pty (raw, reconnectable), TCP (a new client replaces the old),
and the in-memory pair of callables."""

from __future__ import annotations

import asyncio
import os
import termios
from collections.abc import AsyncIterator

import pytest

from protocols import GetStatus, Hello, HostCodec, Ident, InputEvent, StatusReply
from protocols.codec import NEED_DATA, Frame
from protocols.messages import Message
from simulator.board import Board
from simulator.control import Footswitch, apply_command
from simulator.runner import BoardRunner, monotonic_us
from simulator.serve import PtyLink, TcpLink, parse_tcp_address, serve_in_memory


@pytest.fixture
async def runner() -> AsyncIterator[BoardRunner]:
    async with BoardRunner(Board(serial=4242, now_us=monotonic_us())) as running:
        yield running


def _take(codec: HostCodec, want: type[Message], seq: int | None = None) -> Frame[Message] | None:
    while (frame := codec.next_event()) is not NEED_DATA:
        if isinstance(frame.message, want) and (seq is None or frame.seq == seq):
            return frame
    return None


async def _read_pty_until(
    fd: int, codec: HostCodec, want: type[Message], seq: int | None = None
) -> Frame[Message]:
    """Read the host end of the pty until a frame of type ``want`` (and ``seq``) arrives."""
    async with asyncio.timeout(5):
        while True:
            try:
                codec.receive_data(os.read(fd, 4096))
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            if (frame := _take(codec, want, seq)) is not None:
                return frame


def _open_host_end(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


async def test_pty_is_raw_answers_hello_and_survives_the_host_reconnecting(
    runner: BoardRunner,
) -> None:
    async with PtyLink(runner) as link:
        assert link.address.startswith("/dev/pts/")
        fd = _open_host_end(link.path)
        try:
            iflag, oflag, _, lflag, _, _ = termios.tcgetattr(fd)[:6]
            assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)
            assert not iflag & (termios.ICRNL | termios.INLCR | termios.IXON)
            assert not oflag & termios.OPOST
            host = HostCodec()
            # SEQ 0x0D is CR and 0x0A is LF: any CR/LF translation would break the CRC.
            os.write(fd, host.send(0x0D, Hello()))
            ident = await _read_pty_until(fd, host, Ident, seq=0x0D)
            assert isinstance(ident.message, Ident)
            assert ident.message.serial == 4242
            os.write(fd, host.send(0x0A, GetStatus()))
            await _read_pty_until(fd, host, StatusReply, seq=0x0A)
        finally:
            os.close(fd)
        # The host closed the port; a new host opens it again and is answered.
        await asyncio.sleep(0.05)
        fd = _open_host_end(link.path)
        try:
            host = HostCodec()
            os.write(fd, host.send(1, Hello()))
            await _read_pty_until(fd, host, Ident, seq=1)
            apply_command(runner, Footswitch(down=True))
            pressed = await _read_pty_until(fd, host, InputEvent)
            assert isinstance(pressed.message, InputEvent)
            assert pressed.message.footswitch == 1
        finally:
            os.close(fd)
        assert link.counters.bytes_in > 0
        assert link.counters.bytes_out > 0
        # No echo: the board never received its own frames back as commands.
        assert runner.board.link.naks == 0


async def test_pty_waits_out_eio_while_no_slave_is_open(runner: BoardRunner) -> None:
    async with PtyLink(runner) as link:
        # As if the simulator had not kept its slave descriptor: with no slave open, the master
        # reads EIO. The link must neither spin nor die, and serve the next host that opens it.
        os.close(link._slave)
        link._slave = -1
        await asyncio.sleep(0.2)
        fd = _open_host_end(link.path)
        try:
            host = HostCodec()
            os.write(fd, host.send(9, Hello()))
            await _read_pty_until(fd, host, Ident, seq=9)
        finally:
            os.close(fd)


async def test_pty_buffers_what_the_host_does_not_read_and_drops_past_the_cap(
    runner: BoardRunner,
) -> None:
    async with PtyLink(runner) as link:
        chunk = bytes(1000)
        for _ in range(400):  # 400 kB, far beyond what the pty holds with nobody reading
            link._write(chunk)
        assert link.counters.bytes_dropped > 0
        assert link.counters.bytes_out + link.counters.bytes_dropped <= 400 * 1000
        # The loop still runs and the link still serves once a host drains it.
        fd = _open_host_end(link.path)
        try:
            host = HostCodec()
            os.write(fd, host.send(7, Hello()))
            await _read_pty_until(fd, host, Ident, seq=7)
        finally:
            os.close(fd)


async def _read_tcp_until(
    reader: asyncio.StreamReader, codec: HostCodec, want: type[Message], seq: int
) -> Frame[Message]:
    async with asyncio.timeout(5):
        while True:
            data = await reader.read(4096)
            if not data:
                raise ConnectionError("closed by the simulator")
            codec.receive_data(data)
            if (frame := _take(codec, want, seq)) is not None:
                return frame


async def test_tcp_serves_one_client_and_a_new_client_replaces_the_old(
    runner: BoardRunner,
) -> None:
    async with TcpLink(runner, "127.0.0.1", 0) as link:
        host, port = parse_tcp_address(link.address.removeprefix("socket://"))
        assert (host, port) == ("127.0.0.1", link.port)
        assert port != 0
        first_reader, first_writer = await asyncio.open_connection(host, port)
        second_writer: asyncio.StreamWriter | None = None
        try:
            codec = HostCodec()
            first_writer.write(codec.send(1, Hello()))
            await _read_tcp_until(first_reader, codec, Ident, 1)

            second_reader, second_writer = await asyncio.open_connection(host, port)
            async with asyncio.timeout(5):
                while await first_reader.read(4096):
                    pass  # status events already in flight, then the end of the stream
            codec = HostCodec()
            second_writer.write(codec.send(2, Hello()))
            ident = await _read_tcp_until(second_reader, codec, Ident, 2)
            assert isinstance(ident.message, Ident)
            assert link.counters.clients == 2
        finally:
            first_writer.close()
            if second_writer is not None:
                second_writer.close()
                await second_writer.wait_closed()
            await first_writer.wait_closed()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5555", ("127.0.0.1", 5555)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_tcp_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_tcp_address(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("5555", "is not HOST:PORT"),
        (":5555", "is not HOST:PORT"),
        ("host:http", "port 'http'"),
        ("host:70000", "out of range 0..65535"),
    ],
)
def test_bad_tcp_addresses_are_named(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_tcp_address(text)


async def test_in_memory_link_wires_the_board_to_two_callables() -> None:
    codec = HostCodec()
    async with serve_in_memory(codec.receive_data) as link:
        link.from_host(codec.send(3, Hello()))
        # The runner answers inside feed(): the reply is already here.
        ident = _take(codec, Ident, 3)
        assert ident is not None
        link.from_host(codec.send(4, GetStatus()))
        assert _take(codec, StatusReply, 4) is not None
        assert link.counters.bytes_in > 0
        assert link.counters.bytes_out > 0
