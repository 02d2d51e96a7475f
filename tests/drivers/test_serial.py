"""The serial transport over a real pty pair and over socket:// to a local asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tty
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from devicectl.link import DeviceLink
from drivers import DataHandler, LostHandler, SerialTransport, TransportError, open_serial
from protocols import Ack, DeviceCodec, Frame, GetStatus, Hello, Ident, Message, StatusReply

pytestmark = pytest.mark.system


async def until(condition: Callable[[], bool], limit: float = 3.0) -> None:
    """Wait until ``condition()`` holds; fail the test (not time it) if it never does."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - conditions are plain state, not events
            await asyncio.sleep(0.002)


@contextlib.contextmanager
def raw_pty() -> Iterator[tuple[int, str]]:
    """A pty pair in raw mode (as `devicectl sim` makes it): the master fd and the slave's path."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)  # the host opens it by path; the master keeps the pair alive
    try:
        yield master, path
    finally:
        with contextlib.suppress(OSError):
            os.close(master)


async def read_master(master: int, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    ready = asyncio.Event()
    loop.add_reader(master, ready.set)
    try:
        async with asyncio.timeout(3):
            while len(got) < count:
                await ready.wait()
                ready.clear()
                with contextlib.suppress(BlockingIOError):
                    got += os.read(master, 4096)
    finally:
        loop.remove_reader(master)
    return got


async def write_master(master: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking master, waiting for room when the pty is full
    (the kernel moves a pty's bytes to the other side on a worker thread of its own, later)."""
    loop = asyncio.get_running_loop()
    room = asyncio.Event()
    loop.add_writer(master, room.set)
    try:
        async with asyncio.timeout(3):
            while data:
                try:
                    data = data[os.write(master, data) :]
                except BlockingIOError:
                    room.clear()
                    await room.wait()
    finally:
        loop.remove_writer(master)


async def test_pty_carries_bytes_both_ways_and_reports_the_master_closing() -> None:
    with raw_pty() as (master, path):
        os.set_blocking(master, False)
        received: list[bytes] = []
        lost: list[TransportError] = []
        port = await open_serial(
            path, baudrate=921_600, on_data=received.append, on_lost=lost.append
        )
        assert isinstance(port, SerialTransport)
        assert port.url == path
        assert port.is_open
        # Raw mode: 0x00, 0x0d and 0x0a pass untouched.
        port.write(b"\x00\x0d\x0a\x7f")
        assert await read_master(master, 4) == b"\x00\x0d\x0a\x7f"
        os.write(master, b"\x03\x00\x0a\x0d")
        await until(lambda: b"".join(received) == b"\x03\x00\x0a\x0d")
        os.close(master)
        await until(lambda: bool(lost))
        await port.wait_closed()
    assert lost[0].port == path
    assert str(lost[0]).startswith(f"serial port {path} vanished: "), lost[0]
    assert "Input/output error" in str(lost[0]) or "disconnected" in str(lost[0])
    assert not port.is_open


async def test_opening_a_missing_tty_names_it() -> None:
    with pytest.raises(
        TransportError, match=r"serial port /dev/nonexistent-tty cannot be opened: "
    ) as err:
        await open_serial("/dev/nonexistent-tty", on_data=lambda _d: None, on_lost=lambda _e: None)
    assert err.value.port == "/dev/nonexistent-tty"


async def test_a_malformed_url_is_a_transport_error_naming_it() -> None:
    with pytest.raises(TransportError, match="serial port bogus://x cannot be opened"):
        await open_serial("bogus://x", on_data=lambda _d: None, on_lost=lambda _e: None)


@contextlib.asynccontextmanager
async def echo_server(
    port: int = 0,
) -> AsyncIterator[tuple[asyncio.Server, list[asyncio.StreamWriter]]]:
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield server, writers
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_socket_url_echoes_sets_nodelay_and_reports_the_peer_closing() -> None:
    async with echo_server() as (server, writers):
        port_no = server.sockets[0].getsockname()[1]
        url = f"socket://127.0.0.1:{port_no}"
        received: list[bytes] = []
        lost: list[TransportError] = []
        port = await open_serial(url, on_data=received.append, on_lost=lost.append)
        sock = port._asyncio_transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        port.write(b"\x06\x01\x01\x01\xbc\xd8\x00")
        await until(lambda: b"".join(received) == b"\x06\x01\x01\x01\xbc\xd8\x00")
        await until(lambda: bool(writers))
        writers[0].close()
        await until(lambda: bool(lost))
        await port.wait_closed()
    assert str(lost[0]) == f"serial port {url} vanished: closed by the peer"


async def test_socket_url_with_nothing_listening_names_the_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    url = f"socket://127.0.0.1:{free}"
    with pytest.raises(TransportError, match=f"serial port {url} cannot be opened: .*refused"):
        await open_serial(url, on_data=lambda _d: None, on_lost=lambda _e: None)


class TcpBoard:
    """A minimal device over TCP: answers HELLO, SET_REPORTING and GET_STATUS."""

    def __init__(self) -> None:
        self.hellos = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        codec = DeviceCodec()
        while data := await reader.read(1024):
            codec.receive_data(data)
            for item in codec.events():
                assert isinstance(item, Frame)
                command = item.message
                if isinstance(command, Hello):
                    self.hellos += 1
                    reply: Message = Ident(1, (1, 0, 0), 9, 1550, 60000, 100, 20000, 500000, (300,))
                elif isinstance(command, GetStatus):
                    reply = StatusReply(1, 0, 0, 0, 2500, 2500, 0)
                else:
                    reply = Ack(command.TYPE)
                writer.write(codec.send(item.seq, reply))
        writer.close()


async def test_link_over_socket_reconnects_when_the_board_returns() -> None:
    board = TcpBoard()
    port_no = await board.start()
    url = f"socket://127.0.0.1:{port_no}"
    lost: list[str] = []

    async def connect(*, on_data: DataHandler, on_lost: LostHandler) -> SerialTransport:
        return await open_serial(url, on_data=on_data, on_lost=on_lost)

    try:
        async with DeviceLink(
            connect, port=url, status_period_ms=0, on_link_lost=lost.append,
            backoff=lambda _n: 0.01,
        ) as link:  # fmt: skip
            await until(link.connected.is_set)
            await board.stop()  # the simulator is killed
            await until(lambda: bool(lost))
            assert not link.connected.is_set()
            await asyncio.sleep(0.05)  # a few refused reconnection attempts
            assert link.stats["connect_failures"] >= 1
            await board.start(port_no)  # ... and comes back on the same port
            await until(link.connected.is_set)
    finally:
        await board.stop()
    assert lost == [f"serial port {url} vanished: closed by the peer"]
    assert board.hellos == 2


async def test_pty_keeps_order_for_writes_larger_than_the_tty_takes_at_once() -> None:
    """The tty path writes with os.write: what the kernel cannot take waits, in order."""
    with raw_pty() as (master, path):
        os.set_blocking(master, False)
        received: list[bytes] = []
        port = await open_serial(path, on_data=received.append, on_lost=lambda _e: None)
        big = bytes(i % 251 for i in range(200_000))
        port.write(big[:150_000])
        port.write(big[150_000:])  # queued behind the first
        assert await read_master(master, len(big)) == big
        sent = bytes(i % 241 for i in range(20_000))
        for start in range(0, len(sent), 4096):
            await write_master(master, sent[start : start + 4096])
            await asyncio.sleep(0)
        await until(lambda: sum(map(len, received)) >= len(sent))
        assert b"".join(received) == sent
        port.close()
        await port.wait_closed()
        assert not port.is_open
