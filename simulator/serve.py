"""Serving the simulated board to a host: over a pseudo-terminal, TCP, or in memory.

A :class:`~simulator.runner.BoardRunner` drives the board in real time; the links here only move
bytes between it and a host::

    host (devicectl run --port ...)          simulator process
    /dev/pts/N  <-- pty -->  PtyLink   --+
    socket://H:P <-- TCP --> TcpLink   --+-- runner.feed() / runner.attach(write) -- BoardRunner
    in-process callables --> MemoryLink --+                                        -- Board
    sim-control, scenario --> ControlServer / play_scenario ----- apply_command ---/

:class:`Simulator` puts one link, the control socket and an optional scenario together; it is what
``devicectl sim`` runs. Every link is an async context manager; nothing here blocks the loop.

Pty: the slave end is put in raw mode (no echo, no CR/LF translation) right after ``openpty()``,
and the simulator keeps its own slave descriptor open for its whole life, so that a host can close
the port and open it again, and the master never reads EOF/EIO in between (should it anyway, the
link waits and tries again). Writes that the pty cannot take at once are buffered and written when
it can; past :data:`MAX_PENDING_BYTES` (no host reading) the newest bytes are dropped and counted,
as a UART with no one listening loses them.

TCP: one client at a time, a new client replaces the old one (whose connection is closed), and
bytes sent while no client is connected, or while the client does not read, are dropped and
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import structlog

from simulator.board import Board
from simulator.control import ControlServer, SimCommand, apply_command
from simulator.runner import BoardRunner, monotonic_us
from simulator.scenario import Scenario, play_scenario

__all__ = [
    "MAX_PENDING_BYTES",
    "MemoryLink",
    "PtyLink",
    "Simulator",
    "TcpLink",
    "TransportCounters",
    "parse_tcp_address",
    "serve_in_memory",
]

MAX_PENDING_BYTES: Final = 256 * 1024
_READ_CHUNK: Final = 64 * 1024
_EIO_RETRY_S: Final = 0.05


@dataclass(slots=True)
class TransportCounters:
    """What a link moved: bytes from the host, to the host, dropped on the way, hosts seen."""

    bytes_in: int = 0
    bytes_out: int = 0
    bytes_dropped: int = 0
    clients: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ValueError naming the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:5555)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is out of range 0..65535")
    return host, port


# ---------------------------------------------------------------- in memory


class MemoryLink:
    """Wires a runner to a pair of callables, for tests and the daemon's ``--port sim``.

    ``to_host`` receives every byte the board writes; the host calls :meth:`from_host` with the
    bytes it sends. Both run on the loop's thread. Used as a (sync) context manager: attached on
    entry, detached on exit. :func:`serve_in_memory` also starts the runner.
    """

    def __init__(self, runner: BoardRunner, to_host: Callable[[bytes], None]) -> None:
        self.runner = runner
        self.counters = TransportCounters(clients=1)
        self._to_host = to_host

    def __enter__(self) -> MemoryLink:
        self.runner.attach(self._write)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.runner.attach(None)

    def from_host(self, data: bytes) -> None:
        self.counters.bytes_in += len(data)
        self.runner.feed(data)

    def _write(self, data: bytes) -> None:
        self.counters.bytes_out += len(data)
        self._to_host(data)


@contextlib.asynccontextmanager
async def serve_in_memory(
    to_host: Callable[[bytes], None],
    board: Board | None = None,
    *,
    clock: Callable[[], int] = monotonic_us,
    log: Any = None,
) -> AsyncIterator[MemoryLink]:
    """Run ``board`` (a fresh one by default) in real time, wired to ``to_host``.

    Yields the :class:`MemoryLink`; the host sends with ``link.from_host(data)``. The board's clock
    is the runner's, so a board built here starts at ``clock()``.
    """
    if board is None:
        board = Board(now_us=clock())
    async with BoardRunner(board, clock=clock, log=log) as runner:
        with MemoryLink(runner, to_host) as link:
            yield link


# ---------------------------------------------------------------- pty


class PtyLink:
    """A pseudo-terminal whose slave end (:attr:`path`) a host opens like a serial port."""

    def __init__(self, runner: BoardRunner, *, log: Any = None) -> None:
        self.runner = runner
        self.counters = TransportCounters()
        self.path = ""
        self._log = log if log is not None else structlog.get_logger("simulator.serve")
        self._master = -1
        self._slave = -1
        self._pending = bytearray()
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        """What ``devicectl run --port`` accepts."""
        return self.path

    async def __aenter__(self) -> PtyLink:
        self._loop = asyncio.get_running_loop()
        self._master, self._slave = os.openpty()
        try:
            # Raw before anyone can open it: a fresh pty echoes and turns CR into LF.
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
        except BaseException:
            self._close_fds()
            raise
        self._loop.add_reader(self._master, self._on_readable)
        self.runner.attach(self._write)
        self._log.info("sim_pty_serving", path=self.path)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.runner.attach(None)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loop is not None and self._master >= 0:
            self._loop.remove_reader(self._master)
            self._loop.remove_writer(self._master)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: no slave open at all (cannot happen while we hold ours, but a kernel may say so
            # transiently). Anything else is as unexpected; neither may kill the simulator.
            if exc.errno != errno.EIO:
                self._log.warning("sim_pty_read_failed", error=str(exc))
            data = b""
        if not data:
            # Stop polling a descriptor that stays readable, and look again soon.
            self._pause_reading()
            return
        self.counters.bytes_in += len(data)
        self.runner.feed(data)

    def _pause_reading(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._master)
        self._retry = self._loop.call_later(_EIO_RETRY_S, self._resume_reading)

    def _resume_reading(self) -> None:
        self._retry = None
        if self._loop is not None and self._master >= 0:
            self._loop.add_reader(self._master, self._on_readable)

    def _write(self, data: bytes) -> None:
        if self._master < 0:
            return
        if self._pending:
            self._queue(data)
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._write_failed(exc, len(data))
            return
        self.counters.bytes_out += written
        if written < len(data):
            self._queue(memoryview(data)[written:])
            assert self._loop is not None
            self._loop.add_writer(self._master, self._on_writable)

    def _write_failed(self, exc: OSError, size: int) -> None:
        # Like a UART with nobody on the line: the bytes are lost, the board goes on.
        self.counters.bytes_dropped += size
        if exc.errno != errno.EIO:
            self._log.warning("sim_pty_write_failed", error=str(exc), bytes=size)

    def _queue(self, data: bytes | memoryview) -> None:
        if len(self._pending) + len(data) > MAX_PENDING_BYTES:
            self.counters.bytes_dropped += len(data)
        else:
            self._pending += data

    def _on_writable(self) -> None:
        try:
            written = os.write(self._master, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._write_failed(exc, len(self._pending))
            written = 0
            self._pending.clear()
        self.counters.bytes_out += written
        del self._pending[:written]
        if not self._pending:
            assert self._loop is not None
            self._loop.remove_writer(self._master)


# ---------------------------------------------------------------- TCP


class _TcpClient(asyncio.Protocol):
    def __init__(self, link: TcpLink) -> None:
        self._link = link
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=MAX_PENDING_BYTES)
        self._link._connected(self)

    def data_received(self, data: bytes) -> None:
        self._link._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class TcpLink:
    """A TCP server for one host at a time; a new client replaces the old one."""

    def __init__(self, runner: BoardRunner, host: str, port: int, *, log: Any = None) -> None:
        self.runner = runner
        self.counters = TransportCounters()
        self.host, self.port = host, port
        self._log = log if log is not None else structlog.get_logger("simulator.serve")
        self._server: asyncio.Server | None = None
        self._client: _TcpClient | None = None
        self._all_clients: set[_TcpClient] = set()

    @property
    def address(self) -> str:
        """What ``devicectl run --port`` accepts: ``socket://HOST:PORT`` with the bound port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"socket://{host}:{self.port}"

    async def __aenter__(self) -> TcpLink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            functools.partial(_TcpClient, self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.runner.attach(self._write)
        self._log.info("sim_tcp_serving", address=self.address)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.runner.attach(None)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        clients = list(self._all_clients)
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
        await asyncio.gather(*(c.closed for c in clients))

    def _connected(self, client: _TcpClient) -> None:
        old, self._client = self._client, client
        self._all_clients.add(client)
        self.counters.clients += 1
        if old is not None and old.transport is not None:
            self._log.info("sim_tcp_client_replaced")
            old.transport.abort()
        else:
            self._log.info("sim_tcp_client_connected")

    def _received(self, client: _TcpClient, data: bytes) -> None:
        if client is not self._client:
            return  # a replaced client's last bytes: it is no longer the host
        self.counters.bytes_in += len(data)
        self.runner.feed(data)

    def _lost(self, client: _TcpClient) -> None:
        self._all_clients.discard(client)
        if client is self._client:
            self._client = None
            self._log.info("sim_tcp_client_disconnected")

    def _write(self, data: bytes) -> None:
        client = self._client
        if client is None or client.paused or client.transport is None:
            self.counters.bytes_dropped += len(data)
            return
        self.counters.bytes_out += len(data)
        client.transport.write(data)


# ---------------------------------------------------------------- the whole simulator


class Simulator:
    """A served simulator: the board's runner, one host link, the control socket, a scenario.

    ``tcp=None`` serves a pty, else a TCP ``(host, port)`` (port 0 picks a free one). On entry the
    link and the control socket exist, so :attr:`address` can be handed to a host at once; on exit
    the scenario is cancelled, the control socket removed and the link closed.
    """

    def __init__(
        self,
        board: Board,
        *,
        control_path: Path,
        tcp: tuple[str, int] | None = None,
        scenario: Scenario | None = None,
        log: Any = None,
    ) -> None:
        self.board = board
        self.control_path = control_path
        self._tcp = tcp
        self._scenario = scenario
        self._log = log if log is not None else structlog.get_logger("simulator.serve")
        self._stack = contextlib.AsyncExitStack()
        self._link: PtyLink | TcpLink | None = None
        self._runner: BoardRunner | None = None
        self.scenario_done: asyncio.Future[int] | None = None

    @property
    def address(self) -> str:
        assert self._link is not None, "the simulator is not serving"
        return self._link.address

    @property
    def runner(self) -> BoardRunner:
        assert self._runner is not None, "the simulator is not serving"
        return self._runner

    async def __aenter__(self) -> Simulator:
        async with contextlib.AsyncExitStack() as stack:
            runner = await stack.enter_async_context(BoardRunner(self.board, log=self._log))
            self._runner = runner
            link: PtyLink | TcpLink = (
                PtyLink(runner, log=self._log)
                if self._tcp is None
                else TcpLink(runner, *self._tcp, log=self._log)
            )
            self._link = await stack.enter_async_context(link)
            await stack.enter_async_context(
                ControlServer(
                    runner,
                    self.control_path,
                    transport_status=link.counters.as_dict,
                    log=self._log,
                )
            )
            if self._scenario is not None:
                tasks = await stack.enter_async_context(asyncio.TaskGroup())
                task = tasks.create_task(
                    play_scenario(self._scenario, self._apply, log=self._log), name="sim-scenario"
                )
                self.scenario_done = task
                stack.callback(task.cancel)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
        self._link = None

    def _apply(self, command: SimCommand) -> object:
        return apply_command(self.runner, command)
