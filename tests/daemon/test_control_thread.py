"""The control socket runs on a thread of its own (devicectl.control.ControlThread): accepting,
reading, parsing, validating and refusing never take the safety loop; only a validated request
crosses to it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from devicectl.control import ControlServer, ControlThread, DaemonLoop
from devicectl.errors import DevicectlError
from tests.daemon.conftest import Driver


def _ask(path: Path, line: bytes, timeout: float = 30.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line)
        with sock.makefile("rb") as stream:
            reply: dict[str, Any] = json.loads(stream.readline())
            return reply


async def test_the_control_socket_answers_while_the_safety_loop_is_held(driver: Driver) -> None:
    """With the daemon's loop held (as an accept storm or a flood of malformed lines would have
    held it when they shared it), connections are still accepted and malformed requests
    refused; a request that needs the daemon (and an identity refusal, audited on the daemon's
    loop before it is answered) is answered once the loop is free."""
    answered = threading.Event()
    refusals: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []

    def clients() -> None:
        malformed = (b'{"command": "fly"}\n', b"not json\n", b'{"command": "arm", "pin": 1}\n')
        refusals.extend(_ask(driver.path, line) for line in malformed)
        for _ in range(50):  # connections accepted and closed (fewer than the cap of 64)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(driver.path))
        answered.set()
        statuses.append(_ask(driver.path, b'{"command": "status"}\n'))

    thread = threading.Thread(target=clients)
    thread.start()
    # This test runs on the daemon's own loop: waiting here holds it.
    held_and_answered = answered.wait(20)
    await asyncio.to_thread(thread.join, 30)
    assert held_and_answered, "the control socket did not answer while the safety loop was held"
    assert [reply["kind"] for reply in refusals] == ["usage", "usage", "usage"]
    assert statuses and statuses[0]["ok"], statuses


async def test_a_request_runs_on_the_daemons_loop_and_its_errors_come_back(
    tmp_path: Path,
) -> None:
    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    async def handler(request: Any) -> dict[str, Any]:
        ran_on.append(threading.get_ident())
        if request.command == "disarm":
            raise DevicectlError("the board said no")
        return {"state": "standby"}

    path = tmp_path / "ctl.sock"

    def server(daemon_loop: DaemonLoop) -> ControlServer:
        return ControlServer(path, daemon_loop.handler(handler))

    async with ControlThread(server, on_died=pytest.fail):
        ok = await asyncio.to_thread(_ask, path, b'{"command": "status"}\n')
        refused = await asyncio.to_thread(_ask, path, b'{"command": "disarm"}\n')
    assert ok == {"ok": True, "result": {"state": "standby"}}
    assert refused["ok"] is False and refused["error"] == "the board said no"
    assert ran_on == [loop_thread, loop_thread]
    assert not path.exists(), "the socket is removed when the thread is closed"


async def test_an_error_binding_the_socket_is_raised_at_start(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("not a socket")

    async def handler(request: Any) -> dict[str, Any]:
        raise AssertionError("never called")

    with pytest.raises(DevicectlError, match="exists and is not a socket"):
        async with ControlThread(
            lambda daemon_loop: ControlServer(path, daemon_loop.handler(handler)),
            on_died=pytest.fail,
        ):
            pass


class _DiesSoon:
    """Stands in for a server whose thread's loop ends under it."""

    async def __aenter__(self) -> _DiesSoon:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, loop.stop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_control_thread_that_ends_on_its_own_is_reported() -> None:
    """The daemon is told (and stops, exit 1): nobody could reach it any more."""
    causes: list[str] = []
    died = asyncio.Event()

    def on_died(cause: str) -> None:
        causes.append(cause)
        died.set()

    async with ControlThread(lambda _loop: _DiesSoon(), on_died=on_died):  # type: ignore[arg-type,return-value]
        await asyncio.wait_for(died.wait(), 10)
    assert len(causes) == 1
    assert causes[0].startswith("the control socket's thread ended (RuntimeError")


async def test_closing_is_not_reported_as_a_death(tmp_path: Path) -> None:
    async def handler(request: Any) -> dict[str, Any]:
        return {}

    path = tmp_path / "ctl.sock"
    async with ControlThread(
        lambda daemon_loop: ControlServer(path, daemon_loop.handler(handler)),
        on_died=pytest.fail,
    ):
        pass
    await asyncio.sleep(0.05)  # a death report would be scheduled on this loop by now


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("dictionary changed size during iteration")


async def test_a_result_that_cannot_be_encoded_is_answered_as_an_internal_error(
    tmp_path: Path,
) -> None:
    """The result crosses from the daemon's loop and is encoded on the control thread: should
    encoding fail (a bug; a container the daemon's loop changes meanwhile), the client is
    answered, and its connection goes on, as for any other bug."""

    async def handler(request: Any) -> dict[str, Any]:
        if request.command == "disarm":
            return {"bad": _Unprintable()}
        return {"state": "standby"}

    path = tmp_path / "ctl.sock"

    def ask_twice() -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            sock.sendall(b'{"command": "disarm"}\n{"command": "status"}\n')
            with sock.makefile("rb") as stream:
                return [json.loads(stream.readline()) for _ in range(2)]

    async with ControlThread(
        lambda daemon_loop: ControlServer(path, daemon_loop.handler(handler)),
        on_died=pytest.fail,
    ):
        failed, ok = await asyncio.to_thread(ask_twice)
    assert failed["ok"] is False and failed["kind"] == "internal", failed
    assert ok == {"ok": True, "result": {"state": "standby"}}
