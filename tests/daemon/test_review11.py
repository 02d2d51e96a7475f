"""Review 11: the control socket's thread, attacked from outside."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devicectl import control
from devicectl.control import STOP_LANE_CLIENTS, call_daemon, stop_socket_path
from devicectl.simlink import compose
from devicectl.users import UserStore
from tests.daemon.conftest import OPERATOR, Driver, _settings


async def test_sigterm_during_a_pin_check_makes_the_laser_safe_without_waiting_for_it(
    tmp_path: Path, policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PIN check is a thread's argon2 run: shutting down must not wait for it before the
    laser is made safe (the STOP on the way out never waits on the control socket)."""
    entered, release = threading.Event(), threading.Event()
    verify = UserStore.verify

    def slow_verify(self: UserStore, user_id: str, pin: str) -> Any:
        if pin == "000000":
            entered.set()
            release.wait(20)
        return verify(self, user_id, pin)

    monkeypatch.setattr(UserStore, "verify", slow_verify)
    daemon = compose(_settings(tmp_path, policy_file, "sim"))
    with capture_logs() as logs:
        await daemon.__aenter__()
        await _shut_down_during_a_pin_check(daemon, entered, release)
    events = [entry["event"] for entry in logs]
    assert "shutdown_over_budget" not in events, "the shut-down waited for the PIN check"


async def _shut_down_during_a_pin_check(
    daemon: Any, entered: threading.Event, release: threading.Event
) -> None:
    closing: asyncio.Future[None] | None = None
    checking: asyncio.Future[dict[str, Any]] | None = None
    try:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        await drv.emitting_session()
        assert drv.board.state.name == "EMITTING"
        checking = asyncio.create_task(
            drv.call("arm", auth={"user": OPERATOR["user"], "pin": "000000"})
        )
        assert await asyncio.to_thread(entered.wait, 10)
        closing = asyncio.create_task(daemon.__aexit__(None, None, None))
        await asyncio.wait_for(asyncio.shield(closing), 10)
        # the daemon is down, the laser safe, while the PIN check is still running
        assert not release.is_set()
        assert drv.board.state.name not in ("READY", "EMITTING")
    finally:
        release.set()
        await asyncio.gather(
            *(task for task in (closing, checking) if task is not None), return_exceptions=True
        )


async def test_a_control_thread_that_stops_answering_stops_the_daemon(
    tmp_path: Path, policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sockets, the stop lane too, are served on the control thread, and the systemd
    watchdog watches the daemon's loop only: a control thread alive but stuck (here a call on
    it that never returns) must stop the daemon, laser made safe, as a dead one does."""
    stuck, release = threading.Event(), threading.Event()
    parse = control.parse_request

    def parse_or_hang(line: bytes) -> Any:
        if b"hang" in line:
            stuck.set()
            release.wait(30)  # blocks the control thread's loop
        return parse(line)

    monkeypatch.setattr(control, "parse_request", parse_or_hang)
    monkeypatch.setattr(control, "CONTROL_STALL_S", 0.5)
    daemon = compose(_settings(tmp_path, policy_file, "sim"))
    await daemon.__aenter__()
    hanging: asyncio.Future[dict[str, Any]] | None = None
    try:
        drv = Driver(daemon)
        await drv.until(lambda: daemon.link is not None and daemon.link.connected.is_set())
        await drv.emitting_session()
        hanging = asyncio.ensure_future(drv.raw(b'{"command": "status", "hang": 1}\n'))
        assert await asyncio.to_thread(stuck.wait, 10)
        await asyncio.wait_for(daemon.wait_stopped(), 20)
        assert daemon.failure is not None and "has not answered" in daemon.failure
        with capture_logs() as logs:
            await asyncio.wait_for(daemon.__aexit__(None, None, None), 20)
        assert not release.is_set()
        assert drv.board.state.name not in ("READY", "EMITTING")
        assert "shutdown_over_budget" not in [entry["event"] for entry in logs]
    finally:
        release.set()
        if hanging is not None:
            await asyncio.gather(hanging, return_exceptions=True)


async def test_devicectl_stop_gets_through_a_stop_lane_held_by_idle_connections(
    driver: Driver,
) -> None:
    """Any process that may connect could hold the stop lane: 8 connections were served at once
    (each closed after 1 s without a request) and 128 waited in the kernel's backlog; beyond,
    a non-blocking connect on a Unix socket fails at once (EAGAIN, not EINPROGRESS), so
    `devicectl stop` (call_daemon) reported the daemon unreachable within milliseconds, while
    the laser went on emitting. Now the lane closes the oldest connection without a request
    to make room, and the client tries a full queue again until its timeout."""
    drv = driver
    await drv.emitting_session()
    stop_path = stop_socket_path(drv.path)
    held: list[socket.socket] = []
    try:
        for _ in range(STOP_LANE_CLIENTS + 200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(stop_path))
            except BlockingIOError:  # the backlog is full: held enough
                sock.close()
                break
            held.append(sock)
        result = await asyncio.to_thread(call_daemon, stop_path, {"command": "stop"})
        assert result["stopped"] is True
    finally:
        for sock in held:
            sock.close()
    assert drv.board.state.name not in ("READY", "EMITTING")
