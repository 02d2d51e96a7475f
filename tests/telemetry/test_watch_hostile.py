"""``devicectl watch`` against a hostile publisher, as a user runs it: a real process on a real
pseudo-terminal, a real mosquitto. Each attack of issue 17 — terminal escapes, rich markup, wrong
shapes, deep JSON, a 5,000-digit seq, a forged seq/boot, a look-alike device id — then the real
device's FAULT and critical alert must be drawn, and nothing from a payload may reach the terminal
raw. ``--lines`` (the default when stdout is not a terminal) is exercised through a pipe."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Broker
from tests.dashboard.conftest import FakeDevice

pytestmark = pytest.mark.system

WAIT_S = 20.0  # generous: a broker, a publisher and the watcher share two cores
TITLE_ATTACK = "\x1b]0;PWNED\x07"
CLEAR_ATTACK = "\x1b[2J\x1b[31;5m"
MARKUP_ATTACK = "[/][bold red]fake[/bold red]"


class Terminal:
    """A child process on a pty; everything it writes is collected by a reader thread."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)
        env = os.environ | {"TERM": "xterm-256color", "COLUMNS": "240", "LINES": "60"}
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self.output += chunk

    def text(self) -> bytes:
        with self._lock:
            return bytes(self.output)

    async def shows(self, *needles: bytes, since: int = 0) -> float:
        """Wait until every needle has been written after offset ``since``; the time it took."""
        start = time.monotonic()
        while time.monotonic() - start < WAIT_S:
            seen = self.text()[since:]
            if all(needle in seen for needle in needles):
                return time.monotonic() - start
            assert self.process.poll() is None, f"watch exited: {self.text()[-2000:]!r}"
            await asyncio.sleep(0.01)
        raise AssertionError(f"not shown: {needles!r} in {self.text()[-3000:]!r}")

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self.master)
        self._reader.join(5)
        return self.process.returncode


@pytest.fixture
def device(mosquitto: Broker) -> Iterator[FakeDevice]:
    publisher = FakeDevice(mosquitto)
    try:
        yield publisher
    finally:
        publisher.close()


def watch_command(broker: Broker, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "devicectl"), "watch", "--mqtt", broker.url, *extra]


STATE: dict[str, Any] = {
    "interlocks": [],
    "faults": [],
    "params": None,
    "armed": True,
    "session": None,
    "daemon_version": "1",
}


async def attack(device: FakeDevice) -> None:
    """Every attack on ``watch`` in issue 17, from a client allowed to publish under lasers/#."""
    await device.send("state", state=CLEAR_ATTACK + TITLE_ATTACK, **STATE)
    await device.send("state", state=MARKUP_ATTACK, **STATE)
    await device.send(
        "alerts", severity="critical", code=TITLE_ATTACK, message=CLEAR_ATTACK + MARKUP_ATTACK
    )
    await device.raw("session", json.dumps({"session": 123}).encode())
    await device.raw("state", b"[" * 100_000)
    await device.raw("state", b'{"v":1,"seq":' + b"9" * 5000 + b"}")
    forged = {"v": 1, "ts": "2099-01-01T00:00:00Z", "device": "laser-01"}
    await device.raw("state", json.dumps(forged | STATE | {"seq": 10**15, "boot": 10**15,
                                                          "state": "READY"}).encode())  # fmt: skip
    assert device.client is not None
    look_alike = {"v": 1, "ts": "2026-11-25T10:00:00Z", "device": "laser-01\u200b", "seq": 1,
                  "boot": 1, "severity": "critical", "code": "x", "message": "m"}  # fmt: skip
    info = device.client.publish(
        "lasers/clinic-a/laser-01\u200b/alerts", json.dumps(look_alike).encode(), qos=1
    )
    await asyncio.to_thread(info.wait_for_publish, 5.0)


async def real_alarm(device: FakeDevice) -> None:
    await device.send("state", **(STATE | {"state": "FAULT", "armed": False,
                                           "faults": ["INTERLOCK_OPENED"]}))  # fmt: skip
    await device.send("alerts", severity="critical", code="door_REAL", message="door opened")


async def test_watch_on_a_terminal_survives_every_attack_and_draws_the_real_alarm(
    mosquitto: Broker, device: FakeDevice
) -> None:
    terminal = Terminal(watch_command(mosquitto, "--table"))
    try:
        await terminal.shows(b"devicectl watch")
        await device.send("state", state="EMITTING", **STATE)
        await terminal.shows(b"EMITTING")
        await attack(device)
        await asyncio.sleep(0.5)  # let the watcher take every attack before the real alarm
        mark = len(terminal.text())
        await real_alarm(device)
        took = await terminal.shows(b"FAULT", b"door_REAL", since=mark)
        print(f"watch drew the real FAULT and alert {took * 1000:.0f} ms after they were sent")
        shown = terminal.text()
        assert TITLE_ATTACK.encode() not in shown  # the window title was never set
        assert b"\x1b[2J" not in shown  # the screen was never cleared
        assert b"\x1b[31;5m" not in shown
        assert b"\\x1b]0;PWNED\\x07" in shown  # shown, as the characters it is
        assert b"unreadable" in shown
        assert b"invalid ids" in shown
        assert b"laser-01\xe2\x80\x8b" not in shown  # the look-alike is never a device
        assert terminal.process.poll() is None
    finally:
        code = terminal.close()
    assert code == 0


async def test_watch_lines_through_a_pipe(mosquitto: Broker, device: FakeDevice) -> None:
    process = await asyncio.create_subprocess_exec(
        *watch_command(mosquitto), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []

        async def until(text: str) -> str:
            async with asyncio.timeout(WAIT_S):
                while True:
                    assert process.stdout is not None
                    line = (await process.stdout.readline()).decode()
                    assert line, "watch ended"
                    lines.append(line)
                    if text in line:
                        return line

        await until("watching lasers/#")
        await device.send("session", summary={"session": "S-1", "zone": "forehead", "pulses": 40,
                                              "energy_uj": 1, "energy_uj_by_zone": {}})  # fmt: skip
        await until("session S-1 zone forehead")
        await device.send("metrics", rate_hz=10.0, skin_temp_c=33.5, head_temp_c=30.0)
        assert "10.0 Hz, 33.5 C, 30.0 C" in await until("metrics")
        await device.raw("session", b"", retain=True)
        await until("no session open")
        await attack(device)
        await real_alarm(device)
        assert "INTERLOCK_OPENED" in await until("state FAULT")
        await until("door_REAL")
        assert all("\x1b" not in line for line in lines)
        assert all(line.count("\n") == 1 for line in lines)
        assert any("unreadable" in line for line in lines)
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await process.wait()
