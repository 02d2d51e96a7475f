"""The dashboard's HTTP side against a real mosquitto: the event stream, the stop command and its
guards, a broker outage, and the ``devicectl dashboard`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from devicectl.cli import (
    app,
    commands,  # noqa: F401 - registers every command, as the script does
)
from devicectl.dashboard import Dashboard, DashboardConfig, DashboardServer
from devicectl.errors import ConfigError
from tests.brokers import Broker
from tests.conftest import require_tool
from tests.dashboard.conftest import (
    EventStream,
    FakeDevice,
    dashboard_config,
    http,
    never_reading_stream,
    running_dashboard,
    wait_until_subscribed,
)

pytestmark = pytest.mark.system
CONFIRM = {"confirm": True, "site": "clinic-a", "device": "laser-01"}


async def test_page_assets_health_and_read_only_stop(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        status, headers, page = await http(server.url, "GET", "/")
        assert status == 200
        assert b"/static/dashboard.js" in page
        assert "default-src 'self'" in headers["content-security-policy"]  # no CDN can load
        for asset in ("dashboard.js", "dashboard.css"):
            status, _, content = await http(server.url, "GET", f"/static/{asset}")
            assert (status, len(content) > 1000) == (200, True)

        await fake_device.raw("availability", b"online", retain=True)
        status, _, content = await http(server.url, "GET", "/healthz")
        assert status == 200
        assert json.loads(content)["broker_connected"] is True

        # Without stop credentials the dashboard is read-only.
        status, _, content = await http(
            server.url,
            "POST",
            "/api/devices/clinic-a/laser-01/stop",
            CONFIRM,
        )
        assert status == 403
        assert "no stop credentials" in json.loads(content)["error"]
        assert fake_device.commands.empty()


async def test_event_stream_sends_a_snapshot_then_deltas(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    await fake_device.raw("availability", b"online", retain=True)
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        stream = EventStream(server.url)
        try:
            assert await stream.open() == 200
            async with asyncio.timeout(10):
                event, snapshot = await stream.next_event()
                assert event == "snapshot"
                assert snapshot["stop_enabled"] is False
                assert snapshot["broker"]["connected"] is True
                assert snapshot["pages"]["open"] == 1
                if not snapshot["devices"]:  # the retained message may still be on its way
                    event, _ = await stream.next_event()
                await fake_device.send("alerts", severity="critical", code="X", message="breach")
                while True:
                    event, data = await stream.next_event()
                    assert event == "delta"
                    alerts = [op["alert"] for op in data if op["op"] == "alert"]
                    if alerts:
                        break
            assert alerts[0]["code"] == "X"
            assert alerts[0]["key"] == "clinic-a/laser-01"
            assert server.dashboard.hub.browsers == 1
            assert stream.pings >= 1  # and answered: a page that reads is kept
        finally:
            await stream.close()
        # A closed tab is noticed and its queue dropped.
        for _ in range(250):
            if server.dashboard.hub.browsers == 0:
                break
            await asyncio.sleep(0.02)
        assert server.dashboard.hub.browsers == 0
        assert server.dashboard.pages.open == 0


async def test_stop_is_confirmed_guarded_and_delivered(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server:
        path = "/api/devices/clinic-a/laser-01/stop"
        status, _, _ = await http(server.url, "POST", path, CONFIRM)
        assert status == 404  # the device has not been seen yet
        await fake_device.raw("availability", b"online", retain=True)
        for _ in range(250):
            if server.dashboard.fleet.knows("clinic-a", "laser-01"):
                break
            await asyncio.sleep(0.02)

        status, _, _ = await http(
            server.url,
            "POST",
            path,
            b"confirm=true",
            {"content-type": "application/x-www-form-urlencoded"},
        )
        assert status == 415  # a cross-site form post cannot stop anything
        status, _, _ = await http(server.url, "POST", path, {"confirm": False})
        assert status == 400
        assert fake_device.commands.empty()

        status, _, content = await http(server.url, "POST", path, CONFIRM)
        assert (status, json.loads(content)["topic"]) == (200, "lasers/clinic-a/laser-01/cmd/stop")
        topic, payload = await asyncio.to_thread(fake_device.commands.get, True, 5.0)
        assert topic == "lasers/clinic-a/laser-01/cmd/stop"
        assert json.loads(payload)["requested_by"].startswith("dashboard:staff@")


async def test_stop_refuses_other_sites_other_hosts_and_bodies_that_are_not_a_confirmation(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server:
        await fake_device.raw("availability", b"online", retain=True)
        for _ in range(250):
            if server.dashboard.fleet.knows("clinic-a", "laser-01"):
                break
            await asyncio.sleep(0.02)
        path = "/api/devices/clinic-a/laser-01/stop"
        own = urlsplit(server.url).netloc
        refusals = [
            ({"host": "attacker.example"}, CONFIRM),  # DNS rebinding: a foreign Host
            ({"origin": "http://attacker.example"}, CONFIRM),  # a foreign page
            ({"origin": "null"}, CONFIRM),
            ({"sec-fetch-site": "cross-site"}, CONFIRM),
        ]
        for headers, body in refusals:
            status, answer, _ = await http(server.url, "POST", path, body, headers)
            assert status == 403, headers
            assert answer["cache-control"] == "no-store"
        # The snapshot with its patient references is not readable from elsewhere either.
        status, _, _ = await http(
            server.url, "GET", "/api/snapshot", None, {"host": "attacker.example"}
        )
        assert status == 403
        bodies: list[Any] = [
            b"[" * 100_000,  # deep JSON: refused, never a 500
            b'{"confirm": true, "x": "' + b"a" * 5000 + b'"}',
            {"confirm": True, "site": "clinic-a", "device": "laser-01\u200b"},  # a look-alike
            {"confirm": True, "site": "clinic-b", "device": "laser-01"},
            {"confirm": 1},
        ]
        for body in bodies:
            headers = {"content-type": "application/json", "origin": f"http://{own}"}
            status, _, _ = await http(server.url, "POST", path, body, headers)
            assert status == 400, body
        status, _, _ = await http(
            server.url, "POST", "/api/devices/clinic-a/laser-01%E2%80%8B/stop", CONFIRM
        )
        assert status == 404
        assert fake_device.commands.empty()
        # The page's own origin is fine.
        status, _, _ = await http(server.url, "POST", path, CONFIRM, {"origin": f"http://{own}"})
        assert status == 200


async def test_every_answer_is_no_store_and_not_frameable(mosquitto: Broker) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        for path in ("/", "/api/snapshot", "/healthz", "/static/dashboard.js", "/nowhere"):
            _, headers, _ = await http(server.url, "GET", path)
            assert headers["cache-control"] == "no-store", path
            assert headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in headers["content-security-policy"]


async def test_allowed_hosts_default_to_the_bound_address_and_can_be_added(
    mosquitto: Broker,
) -> None:
    config = dashboard_config(mosquitto, allowed_hosts=("dashboard.clinic.lan",))
    async with running_dashboard(config) as server:
        port = urlsplit(server.url).port
        for host in ("localhost", f"127.0.0.1:{port}", f"dashboard.clinic.lan:{port}"):
            status, _, _ = await http(server.url, "GET", "/healthz", None, {"host": host})
            assert status == 200, host
        for host in ("dashboard.clinic.lan.attacker.example", "192.168.1.9", ""):
            status, _, _ = await http(server.url, "GET", "/healthz", None, {"host": host})
            assert status == 403, host


async def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling the dashboard's own counters
            await asyncio.sleep(0.02)


async def test_a_full_house_of_reading_pages_refuses_and_healthz_says_so(
    mosquitto: Broker,
) -> None:
    async with running_dashboard(dashboard_config(mosquitto, max_browsers=2)) as server:
        status, _, content = await http(server.url, "GET", "/healthz")
        assert (status, json.loads(content)["pages"]["saturated"]) == (200, False)
        readers = [EventStream(server.url) for _ in range(2)]
        follows = []
        try:
            for page in readers:
                assert await page.open() == 200
                follows.append(asyncio.create_task(page.follow()))
            await wait_for(lambda: all(page.pings >= 1 for page in readers))
            # Both pages showed that they read: the third is refused, not given their room.
            status, headers, content = await http(server.url, "GET", "/events")
            assert status == 503
            assert headers["retry-after"] == "5"
            assert "too many open pages" in json.loads(content)["error"]
            status, _, content = await http(server.url, "GET", "/healthz")
            health = json.loads(content)
            assert status == 503
            assert health["ok"] is False
            assert health["reader"]["running"] is True  # the reader is fine; the pages are not
            assert health["pages"] | {"detail": ""} == {
                "open": 2, "max": 2, "max_per_address": 20, "saturated": True, "evicted": 0,
                "dropped": 0, "refused": 1, "detail": "",
            }  # fmt: skip
            assert "pages full" in health["pages"]["detail"]
            assert all(not task.done() for task in follows)  # the readers were left alone
        finally:
            for page in readers:
                await page.close()
            await asyncio.gather(*follows, return_exceptions=True)


async def test_one_address_cannot_take_every_page(mosquitto: Broker) -> None:
    config = dashboard_config(mosquitto, max_browsers=10, max_browsers_per_address=3)
    async with running_dashboard(config) as server:
        pages = server.dashboard.pages
        hostile = [never_reading_stream(server.url, "127.0.0.2") for _ in range(8)]
        readers: list[EventStream] = []
        follows: list[asyncio.Task[None]] = []
        try:
            await wait_for(lambda: pages.evicted == 5)
            assert pages.open == 3  # the address's own streams made room for each other
            # Pages from other addresses get in; a fourth from one address that already has
            # three pages that read is refused (they are not evicted for it).
            for source in ("127.0.0.3", "127.0.0.4", "127.0.0.4", "127.0.0.4"):
                page = EventStream(server.url, source=source)
                readers.append(page)
                assert await page.open() == 200
                follows.append(asyncio.create_task(page.follow()))
            await wait_for(lambda: all(page.pings >= 1 for page in readers))
            assert pages.open == 7
            extra = EventStream(server.url, source="127.0.0.4")
            assert await extra.open() == 503
            await extra.close()
            assert (pages.open, pages.refused) == (7, 1)
            assert all(not task.done() for task in follows)
        finally:
            for sock in hostile:
                sock.close()
            for page in readers:
                await page.close()
            await asyncio.gather(*follows, return_exceptions=True)


async def test_pages_that_do_not_answer_their_pings_are_dropped(mosquitto: Broker) -> None:
    config = dashboard_config(mosquitto, keepalive_s=0.2, ack_timeout_s=1.0)
    async with running_dashboard(config) as server:
        mute = EventStream(server.url, answers=False)  # reads everything, never answers
        reader = EventStream(server.url)
        try:
            assert await mute.open() == 200
            assert await reader.open() == 200
            async with asyncio.timeout(15):
                following = asyncio.create_task(reader.follow())
                while True:
                    event, data = await mute.next_event()
                    if event in ("bye", ""):
                        break
            assert event == "bye"
            assert "did not answer its pings" in data["reason"]
            assert await mute.next_event() == ("", None)  # and the connection is closed
            assert server.dashboard.pages.dropped == 1
            assert server.dashboard.pages.open == 1
            assert reader.pings >= 3  # the page that answers is kept, pinged all along
            assert not following.done()
        finally:
            await mute.close()
            await reader.close()
            await asyncio.gather(following, return_exceptions=True)


async def test_a_browser_that_does_not_read_is_dropped(mosquitto: Broker) -> None:
    config = dashboard_config(mosquitto, send_timeout_s=0.5, browser_queue=10)
    async with running_dashboard(config) as server:
        dashboard = server.dashboard
        for n in range(300):  # a large view: each snapshot is hundreds of kilobytes
            message = f'{{"v":1,"ts":"2026-11-25T10:00:00Z","device":"d{n}","seq":1,"boot":1,'
            alert = message + '"severity":"warning","code":"c","message":"' + "m" * 250 + '"}'
            dashboard.hub.publish(dashboard.fleet.apply(f"lasers/s/d{n}/alerts", alert.encode(), 0))
        parts = urlsplit(server.url)
        assert parts.hostname is not None
        assert parts.port is not None
        _reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1024)
        try:
            writer.write(f"GET /events HTTP/1.1\r\nhost: {parts.netloc}\r\n\r\n".encode())
            await writer.drain()
            # Never read: the dashboard keeps trying to send snapshots until the socket is full.
            for _ in range(500):
                if dashboard.hub.browsers == 1:
                    break
                await asyncio.sleep(0.01)
            for _ in range(100):
                dashboard.hub.publish([dashboard.fleet.broker_link(True, 0.0)[0]] * 20)
                await asyncio.sleep(0.05)
                if dashboard.hub.browsers == 0:
                    break
            assert dashboard.hub.browsers == 0
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_healthz_reports_the_readers_liveness(mosquitto: Broker) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        status, _, content = await http(server.url, "GET", "/healthz")
        health = json.loads(content)
        assert status == 200
        assert health["reader"]["running"] is True
        assert health["ok"] is True
        await asyncio.to_thread(mosquitto.stop)
        for _ in range(250):
            status, _, content = await http(server.url, "GET", "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert status == 503
        assert json.loads(content)["broker_connected"] is False


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto where user ``staff`` has the password ``right``."""
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(
        [require_tool("mosquitto_passwd"), "-b", str(passwords), "staff", "right"],
        check=True,
        timeout=30,
    )
    passwords.chmod(0o644)
    with Broker(tmp_path / "mosquitto", extra_config=(f"password_file {passwords}",)) as broker:
        yield broker


async def test_stop_with_credentials_the_broker_refuses_is_reported(
    password_broker: Broker,
) -> None:
    broker = password_broker
    device = FakeDevice(broker)
    try:
        config = dashboard_config(broker, stop_username="staff", stop_password="wrong")
        async with running_dashboard(config) as server:
            await device.raw("availability", b"online", retain=True)
            for _ in range(250):
                if server.dashboard.fleet.knows("clinic-a", "laser-01"):
                    break
                await asyncio.sleep(0.02)
            status, _, content = await http(
                server.url,
                "POST",
                "/api/devices/clinic-a/laser-01/stop",
                CONFIRM,
            )
            assert status == 502
            assert "was not sent" in json.loads(content)["error"]
    finally:
        device.close()


async def test_a_broker_outage_is_shown_and_survived(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    await fake_device.send(
        "state",
        retain=True,
        state="STANDBY",
        interlocks=[],
        faults=[],
        params=None,
        armed=False,
        session=None,
        daemon_version="0.1.0",
    )
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        fleet = server.dashboard.fleet
        for _ in range(250):
            if fleet.knows("clinic-a", "laser-01"):
                break
            await asyncio.sleep(0.02)
        fake_device.close()  # the device's client goes with the broker; reconnecting is its job
        await asyncio.to_thread(mosquitto.stop)
        for _ in range(500):
            if not fleet.snapshot()["broker"]["connected"]:
                break
            await asyncio.sleep(0.02)
        assert fleet.snapshot()["broker"]["connected"] is False
        assert fleet.snapshot()["broker"]["detail"]

        await asyncio.to_thread(mosquitto.start)
        await wait_until_subscribed(server.dashboard, timeout_s=15)
        for _ in range(250):
            view = fleet.device_view("clinic-a", "laser-01")
            if view is not None and view["state"] is not None:
                break
            await asyncio.sleep(0.02)
        assert fleet.snapshot()["broker"]["connected"] is True
        view = fleet.device_view("clinic-a", "laser-01")
        assert view is not None
        assert view["state"]["state"] == "STANDBY"  # replayed by the broker, as retained


async def test_a_port_in_use_is_a_config_error(mosquitto: Broker) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server:
        parts = urlsplit(server.url)
        assert parts.port is not None
        second = DashboardServer(Dashboard(dashboard_config(mosquitto)), ("127.0.0.1", parts.port))
        with pytest.raises(ConfigError, match="--listen"):
            await second.__aenter__()


def test_bad_arguments_exit_2_with_one_line() -> None:
    runner = CliRunner()
    for args, cause in (
        (["dashboard", "--mqtt", "http://broker"], "mqtt://HOST"),
        (["dashboard", "--listen", "8080"], "HOST:PORT"),
        (["dashboard", "--stop-username", "staff"], "--stop-password"),
        (["dashboard", "--max-browsers-per-address", "0"], "max_browsers_per_address"),
        (["dashboard", "--policy", "/nonexistent/policy.toml"], "a readable TOML file"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert cause in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_bad_stop_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        DashboardConfig(stop_password="x")


def test_the_dashboard_process_serves_and_exits_0_on_sigterm(mosquitto: Broker) -> None:
    env = dict(os.environ, DEVICECTL_DASHBOARD_STOP_PASSWORD="s3cret")
    process = subprocess.Popen(
        [
            Path(sys.executable).parent / "devicectl",
            "dashboard",
            "--mqtt",
            mosquitto.url,
            "--listen",
            "127.0.0.1:0",
            "--stop-username",
            "staff",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:")
        status, _, content = asyncio.run(http(url, "GET", "/api/snapshot"))
        assert status == 200
        assert json.loads(content)["stop_enabled"] is True
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
