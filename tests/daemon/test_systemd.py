"""sd_notify: READY=1 once supervising, WATCHDOG=1 at half the interval, STOPPING=1 at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicectl.config import load_settings
from devicectl.daemon import run_daemon
from devicectl.simlink import device_for
from devicectl.systemd import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_outside_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.ready()
    notifier.stopping()


def test_watchdog_interval_is_half_of_systemds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SystemdNotifier("/nowhere").watchdog_interval_s == 2.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert SystemdNotifier("/nowhere").watchdog_interval_s is None


async def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path,
    policy_file: Path,
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    settings = load_settings(
        None, port="sim", data_dir=tmp_path / "d", control=tmp_path / "c.sock", policy=policy_file
    )
    ready = asyncio.Event()
    task = asyncio.create_task(
        run_daemon(settings, device=device_for(settings), ready=lambda _daemon: ready.set())
    )
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.5)  # at least two watchdog pings at 0.2 s
    messages = _drain(notify_socket)
    assert any("READY=1" in m for m in messages), messages
    assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
    os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: an orderly stop
    assert await asyncio.wait_for(task, 5) == 0
    assert any("STOPPING=1" in m for m in _drain(notify_socket))
