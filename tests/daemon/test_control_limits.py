"""The control socket is bounded whatever connects: a connection cap, an idle timeout, a
stop-only socket a full control socket cannot block, and accept() failures that neither spin
nor flood the log."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from devicectl.control import (
    STOP_LANE_CLIENTS,
    ControlError,
    ControlServer,
    StopRequest,
    call_daemon,
    client_cap,
    stop_socket_path,
)
from tests.telemetry.helpers import until

DEVICECTL = [sys.executable, "-c", "from devicectl.cli import main; main()"]


class _Requests:
    """A handler that keeps the requests it was given."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, request: Any) -> dict[str, Any]:
        self.seen.append(request)
        return {"stopped": True} if isinstance(request, StopRequest) else {"state": "standby"}


def _connected(stack: ExitStack, path: Path, timeout: float | None = None) -> socket.socket:
    """A connection to the Unix socket at ``path`` (``timeout`` set before connecting), closed
    with ``stack``."""
    sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


@contextmanager
def _idle_connections(path: Path, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``path`` that never send anything."""
    with ExitStack() as stack:
        yield [_connected(stack, path) for _ in range(count)]


async def test_stop_gets_through_with_the_cap_reached_by_idle_connections(
    tmp_path: Path,
) -> None:
    handler = _Requests()
    path = tmp_path / "ctl.sock"
    async with ControlServer(path, handler, max_clients=3) as server:
        assert server.stop_path == stop_socket_path(path) == tmp_path / "ctl-stop.sock"
        with _idle_connections(path, 3):
            await until(lambda: server.clients == 3, what="three connections served")
            # one more is told why at once, not left hanging
            with pytest.raises(ControlError, match="maximum of 3 control connections") as busy:
                await asyncio.to_thread(call_daemon, path, {"command": "status"})
            assert busy.value.kind == "unreachable"
            assert str(server.stop_path) in str(busy.value)
            # ... and a stop gets through its own socket, as `devicectl stop` sends it
            result = await asyncio.to_thread(call_daemon, server.stop_path, {"command": "stop"})
            cli = await asyncio.to_thread(
                subprocess.run,
                [*DEVICECTL, "stop", "--json", "--control", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert server.turned_away == 1
        assert result == {"stopped": True}
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == {"stopped": True}
        assert [type(r) for r in handler.seen] == [StopRequest, StopRequest]
        # the idle connections gone, the control socket serves again
        await until(lambda: server.clients == 0, what="connections closed")
        assert await asyncio.to_thread(call_daemon, path, {"command": "status"})
    assert not path.exists() and not server.stop_path.exists()


async def test_the_stop_socket_accepts_only_stop(tmp_path: Path) -> None:
    handler = _Requests()
    async with ControlServer(tmp_path / "ctl.sock", handler) as server:
        with pytest.raises(ControlError, match="accepts only stop") as refused:
            await asyncio.to_thread(call_daemon, server.stop_path, {"command": "arm"})
        assert refused.value.kind == "usage"
        garbage = await asyncio.to_thread(_exchange, server.stop_path, b"\xffstop\n")
    assert handler.seen == []
    assert json.loads(garbage)["kind"] == "usage" and "not JSON" in json.loads(garbage)["error"]


def _exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        return sock.recv(4096)


async def test_a_silent_stop_socket_connection_is_closed_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    """More silent connections than the stop lane holds: the oldest are closed to make room
    (told why), the rest within the lane's request timeout, so a stop behind them gets in."""
    handler = _Requests()
    async with ControlServer(tmp_path / "ctl.sock", handler) as server:
        with _idle_connections(server.stop_path, 12) as silent:
            result = await asyncio.to_thread(
                call_daemon, server.stop_path, {"command": "stop"}, timeout=10.0
            )
            for sock in silent:
                sock.settimeout(10)
            first = await asyncio.to_thread(silent[0].recv, 4096)
            last = await asyncio.to_thread(silent[-1].recv, 4096)
    assert result == {"stopped": True}
    assert b"the stop lane is full: closed" in first
    assert b"no stop request in time" in last
    assert server.stop_evicted >= 4


class _HeldStops(_Requests):
    """A handler that holds the first ``held`` stops until ``release`` is set (a daemon's loop
    busy with them), and answers the rest at once."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.held = held
        self.release = asyncio.Event()

    async def __call__(self, request: Any) -> dict[str, Any]:
        holding = len(self.seen) < self.held
        result = await super().__call__(request)
        if holding:
            await self.release.wait()
        return result


async def _answering_stops(stack: ExitStack, server: ControlServer, handler: _HeldStops) -> None:
    """Every slot of the stop lane but one busy answering a stop (``handler`` holds them)."""
    for _ in range(handler.held):
        _connected(stack, server.stop_path).sendall(b'{"command": "stop"}\n')
    await until(lambda: len(handler.seen) == handler.held, what="the slots answering")


async def test_a_stop_sent_at_once_is_answered_when_a_newer_connection_finds_the_lane_full(
    tmp_path: Path,
) -> None:
    """The lane makes room by closing a connection still without its request: never one whose
    stop is already sent. Here every other slot is answering a stop, a stop is sent at once
    after connecting, and an idle connection arrives right behind it: that stop is answered,
    not closed unread (nor told that it sent nothing)."""
    handler = _HeldStops(STOP_LANE_CLIENTS - 1)
    async with ControlServer(tmp_path / "ctl.sock", handler) as server:
        with ExitStack() as stack:
            await _answering_stops(stack, server, handler)
            # both queued before the server's loop runs again
            stopper = _connected(stack, server.stop_path, timeout=10)
            stopper.sendall(b'{"command": "stop"}\n')
            _connected(stack, server.stop_path)  # a newer connection, idle
            try:
                answer = await asyncio.to_thread(stopper.recv, 4096)
            finally:
                handler.release.set()
    assert answer, "the stop was closed unread"
    assert json.loads(answer) == {"ok": True, "result": {"stopped": True}}
    assert len(handler.seen) == STOP_LANE_CLIENTS


async def test_a_stop_received_as_its_connection_is_closed_to_make_room_is_answered(
    tmp_path: Path,
) -> None:
    """A connection waiting for its request is closed to make room only while its request has
    not come: one whose stop came in together with the newer connection (received, but not
    yet read when the newer one is accepted) is answered."""
    handler = _HeldStops(STOP_LANE_CLIENTS - 1)
    async with ControlServer(tmp_path / "ctl.sock", handler) as server:
        with ExitStack() as stack:
            await _answering_stops(stack, server, handler)
            stopper = _connected(stack, server.stop_path, timeout=10)
            for _ in range(20):  # the stopper's connection set up and waiting for its request
                await asyncio.sleep(0)
            # the newer connection first, then the stop, before the server's loop runs again
            _connected(stack, server.stop_path)  # a newer connection, idle
            stopper.sendall(b'{"command": "stop"}\n')
            try:
                answer = await asyncio.to_thread(stopper.recv, 4096)
            finally:
                handler.release.set()
    assert json.loads(answer) == {"ok": True, "result": {"stopped": True}}
    assert server.stop_evicted == 1  # it was the one chosen to make room
    assert len(handler.seen) == STOP_LANE_CLIENTS


async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async with ControlServer(tmp_path / "ctl.sock", _Requests(), idle_timeout_s=0.2) as server:
        with _idle_connections(server.path, 1) as (sock,):
            sock.settimeout(10)
            said = await asyncio.to_thread(sock.recv, 4096)
            end = await asyncio.to_thread(sock.recv, 4096)
            await until(lambda: server.clients == 0, what="connection closed")
    assert json.loads(said)["error"] == "no request for 0.2 s: closed"
    assert end == b""


# A server in its own process, its open-file limit lowered after start so that accept() runs
# out of descriptors (the cap, computed at start, would otherwise keep it clear of the limit).
_LOW_FD_SERVER = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys
    from pathlib import Path
    from devicectl.control import ControlServer

    events, details = [], []

    class Log:
        def _keep(self, event, **fields):
            events.append(event)
            details.append([event, fields.get("path"), fields.get("error")])
        debug = info = warning = error = critical = exception = _keep

    async def handler(request):
        return {"ok": True}

    async def main():
        path = Path(sys.argv[1])
        async with ControlServer(path, handler, idle_timeout_s=1.0, log=Log()):
            fds = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (fds + 4, 1024))
            print("ready", flush=True)
            await asyncio.sleep(float(sys.argv[2]))
        print(json.dumps(details), flush=True)
        print(json.dumps(events), flush=True)

    asyncio.run(main(), debug=False)
    """
)


@pytest.mark.system
def test_accept_failures_are_logged_once_per_episode_without_spinning(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", _LOW_FD_SERVER, str(path), "4.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        with _idle_connections(path, 20):  # more than the 4 descriptors it has left
            cpu_before = _cpu_s(server.pid)
            subprocess.run(["sleep", "0.8"], check=True)
            cpu_spent = _cpu_s(server.pid) - cpu_before
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    events = json.loads(out.splitlines()[-1])
    details = json.loads(out.splitlines()[-2])
    # one episode (the idle connections time out and the backlog's next ones take their
    # place, each time running out again): one line, not one per failure
    failed = [path for event, path, _error in details if event == "control_accept_failed"]
    assert failed.count(str(path)) == 1, details
    assert len(failed) == len(set(failed)), details  # at most one line per socket
    assert "control_accept_failing" not in events, events  # reminded every 10 s only
    assert "out of system resource" not in err and len(err) < 2_000, err[-2_000:]
    # backing off, not spinning: far less than the 0.8 s of CPU a tight accept loop would burn
    assert cpu_spent < 0.4, cpu_spent


def _cpu_s(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(
    ("open_files", "cap"), [(1024, 64), (4096, 64), (160, 40), (100, 10), (70, 1)]
)
def test_the_cap_leaves_the_daemon_half_its_open_files(
    monkeypatch: pytest.MonkeyPatch, open_files: int, cap: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (open_files, open_files))
    assert client_cap() == cap
    assert ControlServer(Path("/nonexistent/ctl.sock"), _Requests()).max_clients == cap


async def test_a_socket_that_cannot_be_created_leaves_nothing_behind(tmp_path: Path) -> None:
    """The stop socket cannot be bound (its path is too long for AF_UNIX): start fails, and the
    control socket bound just before is gone too."""
    stop_path = tmp_path / ("s" * 120 + ".sock")
    with pytest.raises(OSError, match="too long"):
        async with ControlServer(tmp_path / "ctl.sock", _Requests(), stop_path=stop_path):
            pass
    assert not (tmp_path / "ctl.sock").exists()


class _Events:
    """A stand-in for the daemon's logger: keeps each event's name and fields."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _keep(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    info = warning = error = exception = debug = _keep


async def test_a_crowded_stop_lane_is_logged_once_when_it_starts_and_once_when_it_ends(
    tmp_path: Path,
) -> None:
    events = _Events()
    async with ControlServer(tmp_path / "ctl.sock", _Requests(), log=events) as server:
        with _idle_connections(server.stop_path, 30):
            await until(lambda: server.stop_evicted >= 20, what="connections closed for room")
        # the silent ones left go within the lane's request timeout; then one stop, with room
        await until(lambda: not server._stop_clients, what="the lane empty", timeout=10)
        await asyncio.to_thread(call_daemon, server.stop_path, {"command": "stop"})
    crowded = [fields for event, fields in events.seen if event == "control_stop_lane_crowded"]
    ended = [fields for event, fields in events.seen if event == "control_stop_lane_crowded_ended"]
    assert len(crowded) == 1
    assert len(ended) == 1 and ended[0]["closed"] == server.stop_evicted


def test_a_reply_marked_retry_is_sent_again_on_a_new_connection(tmp_path: Path) -> None:
    """What a full stop lane answers a connection it closes before reading it: the client
    (`devicectl stop`) tries again until its timeout, a stop being idempotent."""
    path = tmp_path / "lane.sock"
    replies = [
        b'{"ok": false, "kind": "unreachable", "error": "the stop lane is full", "retry": true}\n',
        b'{"ok": true, "result": {"stopped": true}}\n',
    ]
    served: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(4)

        def serve() -> None:
            for reply in replies:
                conn, _ = listener.accept()
                with conn, conn.makefile("rb") as stream:
                    served.append(stream.readline())
                    conn.sendall(reply)

        thread = threading.Thread(target=serve)
        thread.start()
        result = call_daemon(path, {"command": "stop"}, timeout=10)
        thread.join(10)
    assert result == {"stopped": True}
    assert served == [b'{"command": "stop"}\n'] * 2
