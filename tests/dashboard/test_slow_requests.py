"""Connections that never finish a request cannot exhaust the dashboard's descriptors.

uvicorn has no deadline for a request's headers: a client that sends part of a request and then a
byte now and then (slowloris) held its connection, and a file descriptor, for ever. A few hundred
such connections made ``accept`` fail with ``EMFILE`` (a ``devicectl dashboard`` limited to 256
descriptors answered neither a page nor ``/healthz`` while 300 were open). Here, against the real
uvicorn server: one address opens more partial requests than it may hold and keeps dribbling
header bytes into them; the ones beyond the cap per address are closed at once, the rest once
nothing has been written to them for ``quiet_timeout_s``; a request body that never ends is closed
the same way; meanwhile a real Chromium page from another address is served and shows a real FAULT
and critical alert, and is kept, because its stream is written to with every ping. And a real
``devicectl dashboard`` process with 320 descriptors, sent 600 partial requests from ten
addresses, still answers ``/healthz`` and delivers a critical alert to a new stream (before the
guard it accepted nothing more: the request timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import pytest
from playwright.async_api import async_playwright, expect

from devicectl.dashboard.connections import ConnectionGuard, GuardedProtocol, client_key
from tests.brokers import Broker
from tests.dashboard.conftest import (
    EventStream,
    FakeDevice,
    dashboard_config,
    http,
    running_dashboard,
)
from tests.dashboard.test_browser import launch, open_page
from tests.dashboard.test_hostile_publisher import STATE, real_alarm

ALARM_WITHIN_MS = 5000  # the issue asks for a second; generous for two shared cores


def partial_request(
    url: str, source: str, head: bytes, *, timeout: float | None = None
) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    sock = socket.create_connection(
        (parts.hostname, parts.port), timeout=timeout, source_address=(source, 0)
    )
    sock.sendall(head)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed it (it never answers an unfinished request, so readable = closed)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def dribble(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed by the server: that is the point
        sock.send(b"x")


@pytest.mark.system
async def test_unfinished_requests_are_closed_and_never_keep_an_alarm_off_a_page(
    mosquitto: Broker, tmp_path: Path
) -> None:
    config = dashboard_config(mosquitto, keepalive_s=0.5, quiet_timeout_s=3.0)
    device = FakeDevice(mosquitto)
    slow: list[socket.socket] = []
    try:
        async with running_dashboard(config) as server, async_playwright() as pw:
            guard = server.connections
            assert guard.per_address == 2 * config.max_browsers_per_address + 24
            head = f"GET / HTTP/1.1\r\nhost: {urlsplit(server.url).netloc}\r\nx-slow: ".encode()
            count = guard.per_address + 10
            slow = [partial_request(server.url, "127.0.0.2", head) for _ in range(count)]
            body = partial_request(
                server.url,
                "127.0.0.3",
                f"POST /events/ack HTTP/1.1\r\nhost: {urlsplit(server.url).netloc}\r\n"
                "content-type: application/json\r\ncontent-length: 1000\r\n\r\n{".encode(),
            )
            slow.append(body)
            # Those beyond the cap per address are closed as they arrive.
            async with asyncio.timeout(10):
                while guard.refused < 10:  # noqa: ASYNC110 - the guard's own counter
                    await asyncio.sleep(0.05)
            status, _, _ = await http(server.url, "GET", "/healthz")
            assert status == 200

            context = await launch(pw, tmp_path / "chromium-profile")
            try:
                await device.raw("availability", b"online", retain=True)
                await device.send("state", **(STATE | {"state": "EMITTING"}))
                page = await open_page(context, server.url)
                card = page.locator("[data-key='clinic-a/laser-01']")
                await expect(card).to_have_attribute("data-state", "EMITTING")
                took_ms = await real_alarm(page, device, "door_slowloris", 1)
                assert took_ms < ALARM_WITHIN_MS

                # A byte now and then does not keep a request alive: all are closed.
                async with asyncio.timeout(30):
                    while not all(closed_by_server(s) for s in slow):
                        for sock in slow:
                            dribble(sock)
                        await asyncio.sleep(0.5)
                assert guard.closed_quiet >= guard.per_address
                # The page reads its stream, which is written to with every ping: it is kept.
                await asyncio.sleep(config.quiet_timeout_s + 1)
                await expect(page.get_by_test_id("stream")).to_have_text("page: live")
                assert server.dashboard.pages.open == 1
                assert server.dashboard.pages.evicted + server.dashboard.pages.dropped == 0
                await page.get_by_test_id("alert-ack").click()
                await device.send("state", at_s=2, **(STATE | {"state": "EMITTING"}))
                await expect(card).to_have_attribute("data-state", "EMITTING")
                took_ms = await real_alarm(page, device, "door_after", 3)
                assert took_ms < ALARM_WITHIN_MS
                assert getattr(page, "js_errors") == []  # noqa: B009
            finally:
                await context.close()
    finally:
        for sock in slow:
            sock.close()
        device.close()


@pytest.mark.system
async def test_an_upgrade_request_is_answered_as_http_and_its_connection_counted_out(
    mosquitto: Broker,
) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        guard = server.connections
        netloc = urlsplit(server.url).netloc
        for _ in range(3):
            status, _, _ = await http(
                server.url,
                "GET",
                "/healthz",
                headers={
                    "connection": "upgrade, close",
                    "upgrade": "websocket",
                    "sec-websocket-version": "13",
                    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "host": netloc,
                },
            )
            assert status != 101
        async with asyncio.timeout(5):
            while guard.open > 0:  # noqa: ASYNC110 - the guard's own count
                await asyncio.sleep(0.05)


# The real process, with 320 descriptors (the guard keeps 256 of them for itself and a burst of
# accepts, so it holds 64 connections).
_LIMITED_DASHBOARD = (
    "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (320, 320)); "
    "from devicectl.cli import main; main()"
)


@pytest.mark.system
async def test_unfinished_requests_from_many_addresses_never_exhaust_the_descriptors(
    mosquitto: Broker,
) -> None:
    # Before the guard, these made every accept fail (EMFILE): /healthz timed out.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LIMITED_DASHBOARD, "dashboard", "--mqtt", mosquitto.url,
        "--listen", "127.0.0.1:0",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    device = FakeDevice(mosquitto)
    slow: list[socket.socket] = []
    page: EventStream | None = None
    try:
        assert process.stdout is not None
        url = (await process.stdout.readline()).decode().strip()
        head = f"GET / HTTP/1.1\r\nhost: {urlsplit(url).netloc}\r\nx-slow: ".encode()
        for n in range(600):
            try:
                slow.append(partial_request(url, f"127.0.1.{1 + n // 60}", head, timeout=5.0))
            except TimeoutError:  # the backlog is full: nothing is accepted any more
                break
        async with asyncio.timeout(20):
            status, _, content = await http(url, "GET", "/healthz")
        # It answers, and does not say "ok" while connections are being closed to make room.
        health = json.loads(content)
        assert status == 503, content
        assert health["reader"]["connected"] is True
        assert health["pages"]["saturated"] is False
        assert health["connections"]["saturated"] is True
        assert health["connections"]["evicted"] > 0
        page = EventStream(url)
        async with asyncio.timeout(20):
            assert await page.open() == 200
            assert (await page.next_event())[0] == "snapshot"
            await device.send("alerts", severity="critical", code="door_fds", message="door")
            while True:
                event, data = await page.next_event()
                assert event, "the stream ended"
                if event == "delta" and "door_fds" in json.dumps(data):
                    break
    finally:
        if page is not None:
            await page.close()
        for sock in slow:
            sock.close()
        device.close()
        process.terminate()
        async with asyncio.timeout(10):
            await process.wait()


class _Connection:
    """What ConnectionGuard reads of a connection, without a socket."""

    def __init__(self, client: str, at: float) -> None:
        self.client, self.last_write = client, at
        self.answered = False
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _guarded(connection: _Connection) -> GuardedProtocol:
    return cast(GuardedProtocol, connection)


def test_a_full_server_makes_room_first_among_unanswered_connections_then_fairly() -> None:
    now = [0.0]
    guard = ConnectionGuard(per_address=2, total=3, quiet_timeout_s=10.0, clock=lambda: now[0])
    page = _Connection("10.0.0.9", 0.0)
    page.answered = True
    first, second = _Connection("10.0.0.1", 0.0), _Connection("10.0.0.2", 0.0)
    for connection in (page, first, second):
        assert guard.admit(_guarded(connection))
    newcomer = _Connection("10.0.0.3", 0.0)
    assert guard.admit(_guarded(newcomer))
    assert first.aborted and not page.aborted and not second.aborted
    # Every connection answered (in use): a client holding two fewer than the most takes the
    # place of that client's least recently written one; one holding as many is refused.
    guard = ConnectionGuard(per_address=10, total=4, quiet_timeout_s=10.0, clock=lambda: now[0])
    crowd = [_Connection("10.0.0.1", float(n)) for n in range(3)]
    tablet = _Connection("10.0.0.2", 0.0)
    for connection in (*crowd, tablet):
        connection.answered = True
        assert guard.admit(_guarded(connection))
    newcomer = _Connection("10.0.0.3", 5.0)
    assert guard.admit(_guarded(newcomer))
    assert crowd[0].aborted and not any(c.aborted for c in (*crowd[1:], tablet))
    assert guard.status()["saturated"]  # /healthz says 503 while the server is full
    newcomer.answered = True
    assert not guard.admit(_guarded(_Connection("10.0.0.1", 6.0)))
    assert not guard.admit(_guarded(_Connection("10.0.0.2", 6.0)))
    assert guard.status()["evicted"] == 1
    now[0] = 61.0
    guard.leave(_guarded(newcomer))
    assert not guard.status()["saturated"]  # a minute on, with room again
    # A third from one address is refused, whatever room there is; that is no saturation.
    now[0] = 0.0
    guard = ConnectionGuard(per_address=2, total=100, quiet_timeout_s=10.0, clock=lambda: now[0])
    same = [_Connection("10.0.0.1", 0.0) for _ in range(3)]
    assert [guard.admit(_guarded(c)) for c in same] == [True, True, False]
    assert not guard.status()["saturated"]
    # Nothing written for quiet_timeout_s: closed; written lately: kept.
    now[0] = 11.0
    same[1].last_write = 5.0
    guard.sweep()
    assert same[0].aborted and not same[1].aborted
    assert guard.status()["closed_quiet"] == 1
    # A reverse proxy on this machine connects from loopback for all its clients: not capped.
    proxied = [_Connection("127.0.0.1", 11.0) for _ in range(5)]
    assert all(guard.admit(_guarded(c)) for c in proxied)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::99", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::1"),
        ("unknown", "unknown"),
    ],
)
def test_one_ipv6_host_counts_as_one_client(address: str, key: str) -> None:
    assert client_key(address) == key
