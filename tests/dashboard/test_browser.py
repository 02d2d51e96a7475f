"""End to end in a real headless Chromium: a device publishes to a real mosquitto as devicectl
would, and the page follows it live — online, pulses counting up, the alert, the stop command,
offline. Uses Debian's /usr/bin/chromium through playwright; never downloads a browser.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from tests.brokers import Broker
from tests.conftest import require_tool
from tests.dashboard.conftest import FakeDevice, dashboard_config, running_dashboard

pytestmark = pytest.mark.system

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TABLET: ViewportSize = {"width": 800, "height": 1280}
CARD = "device-clinic-a-laser-01"
METRIC_POINTS = 60


def skin_temp(second: int) -> float:
    """Skin under the handpiece warming toward a plateau, as the simulator's physics does."""
    return round(32.5 + 3.5 * (1 - math.exp(-second / 20)), 2)


async def open_page(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport=TABLET)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(url)
    await expect(page.get_by_test_id("stream")).to_have_text("page: live")
    await expect(page.get_by_test_id("broker")).to_have_text("broker: connected")
    page.set_default_timeout(5000)
    setattr(page, "js_errors", errors)  # noqa: B010 - read back by the test
    return page


async def play_session_start(device: FakeDevice) -> None:
    await device.raw("availability", b"online", retain=True)
    await device.send(
        "state",
        retain=True,
        state="READY",
        interlocks=[],
        faults=[],
        params={"energy_uj": 6000, "width_us": 1000, "rate_mhz": 10000, "spot_um": 300},
        armed=True,
        session="S-0001",
        daemon_version="0.1.0",
    )
    await device.send(
        "session",
        retain=True,
        summary={
            "session": "S-0001",
            "operator": "op-7",
            "patient": "P-0042",
            "skin_type": "III",
            "zone": "cheeks",
            "pulses": 0,
            "energy_uj": 41_000_000,
            "energy_uj_by_zone": {"forehead": 41_000_000, "cheeks": 0},
        },
    )
    for i in range(METRIC_POINTS):
        await device.send(
            "metrics",
            at_s=i,
            rate_hz=10.0,
            avg_power_w=0.06,
            skin_temp_c=skin_temp(i),
            head_temp_c=27.5,
            counters={},
        )


async def send_pulse_batch(device: FakeDevice, first: int, count: int) -> None:
    await device.send(
        "pulses",
        session="S-0001",
        zone="cheeks",
        first_pulse_no=first,
        last_pulse_no=first + count - 1,
        count=count,
        energy_uj_sum=6_000_000 * count,
        energy_uj_min=5_900_000,
        energy_uj_max=6_100_000,
        pulses=[[first + i, 100_000 * i, 6_000_000] for i in range(count)],
    )


async def test_the_page_follows_a_device_live(mosquitto: Broker, fake_device: FakeDevice) -> None:
    chromium = require_tool("chromium")
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await open_page(browser, server.url)
            await expect(page.get_by_test_id("empty")).to_be_visible()

            await play_session_start(fake_device)
            card = page.get_by_test_id(CARD)
            await expect(card.get_by_test_id("availability")).to_have_text("ONLINE")
            await expect(card.get_by_test_id("state")).to_have_text("READY")
            await expect(card.get_by_test_id("armed")).to_be_visible()
            await expect(card.get_by_test_id("operator")).to_have_text("op-7")
            await expect(card.get_by_test_id("zone")).to_have_text("cheeks")
            last = skin_temp(METRIC_POINTS - 1)
            await expect(card.get_by_test_id("skin-temp")).to_have_text(f"{last:.1f} °C")
            await expect(card.locator("[data-testid=skin-chart] polyline")).to_have_count(1)

            # Pulses count up on the page as batches arrive, without a reload.
            seen = []
            for n in range(1, 6):
                await send_pulse_batch(fake_device, first=(n - 1) * 3 + 1, count=3)
                await expect(card.get_by_test_id("pulses")).to_have_text(str(3 * n))
                seen.append(await card.get_by_test_id("pulses").inner_text())
            assert seen == ["3", "6", "9", "12", "15"]
            cheeks = card.locator("[data-testid=zone-bar][data-zone=cheeks]")
            await expect(cheeks).to_contain_text("90.0 / 80 J")  # 15 × 6 J over the 80 J limit
            await expect(cheeks.locator(".bar")).to_have_class("bar over")
            forehead = card.locator("[data-testid=zone-bar][data-zone=forehead]")
            await expect(forehead).to_contain_text("41.0 / 60 J")

            # A breach: the banner shows it within a second, newest first in the list.
            await fake_device.send(
                "alerts",
                severity="warning",
                code="SKIN_TEMP_NEAR",
                message="skin temperature 40.2 °C, limit 41.0 °C",
                value=40.2,
                limit=41.0,
                session="S-0001",
            )
            await fake_device.send(
                "alerts",
                severity="critical",
                code="ZONE_ENERGY",
                message="zone cheeks above its energy limit: emission stopped",
                value=90.0,
                limit=80.0,
                session="S-0001",
            )
            banner = page.get_by_test_id("alert-banner")
            await expect(banner).to_be_visible(timeout=1000)
            await expect(banner).to_contain_text("CRITICAL — laser-01 (clinic-a)", timeout=1000)
            await expect(banner).to_contain_text("ZONE_ENERGY")
            await expect(banner).to_contain_text("+1 more")
            items = page.get_by_test_id("alert-list").locator("li")
            await expect(items).to_have_count(2)
            await expect(items.first).to_contain_text("ZONE_ENERGY")
            await expect(items.nth(1)).to_contain_text("SKIN_TEMP_NEAR")
            await expect(card).to_have_class("device alerting")

            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # Stop emission: a confirmation first; cancel sends nothing.
            await card.get_by_test_id("stop-button").click()
            dialog = page.get_by_test_id("stop-dialog")
            await expect(dialog).to_be_visible()
            await expect(dialog).to_contain_text("clinic-a/laser-01")
            await page.get_by_test_id("stop-cancel").click()
            await expect(dialog).to_be_hidden()
            await card.get_by_test_id("stop-button").click()
            await page.get_by_test_id("stop-confirm").click()
            await expect(card.get_by_test_id("stop-result")).to_contain_text("Stop sent")
            topic, _payload = await asyncio.to_thread(fake_device.commands.get, True, 5.0)
            assert topic == "lasers/clinic-a/laser-01/cmd/stop"
            assert fake_device.commands.empty()  # the cancelled one was never sent
            # The daemon obeys: its next state says so, and the page follows.
            await fake_device.send(
                "state",
                retain=True,
                state="STANDBY",
                interlocks=["contact"],
                faults=[],
                params=None,
                armed=False,
                session="S-0001",
                daemon_version="0.1.0",
            )
            await expect(card.get_by_test_id("state")).to_have_text("STANDBY")
            await expect(card.get_by_test_id("armed")).to_have_count(0)
            await expect(card.get_by_test_id("interlocks")).to_contain_text("contact OPEN")

            # The banner can be acknowledged on this screen; a new alert brings it back.
            await page.get_by_test_id("alert-ack").click()
            await expect(banner).to_be_hidden()

            # The session ends (empty retained session), then the daemon goes away.
            await fake_device.raw("session", b"", retain=True)
            await expect(card.get_by_test_id("session")).to_have_text("No session open.")
            await fake_device.raw("availability", b"offline", retain=True)
            await expect(card.get_by_test_id("availability")).to_have_text("OFFLINE")
            await expect(card.get_by_test_id("stale-note")).to_contain_text("Offline since")
            await expect(card).to_have_attribute("data-availability", "offline")
            await expect(card.get_by_test_id("stop-button")).to_be_disabled()
            await expect(card.locator("header")).not_to_contain_text("null")
            await expect(card.locator("header")).not_to_contain_text("undefined")

            # A page opened now starts from the snapshot: the retained offline, the alerts.
            late = await open_page(browser, server.url)
            late_card = late.get_by_test_id(CARD)
            await expect(late_card.get_by_test_id("availability")).to_have_text("OFFLINE")
            await expect(late.get_by_test_id("alert-list").locator("li")).to_have_count(2)

            assert getattr(page, "js_errors") == []  # noqa: B009
            assert getattr(late, "js_errors") == []  # noqa: B009
        finally:
            await browser.close()


async def test_without_stop_credentials_there_is_no_stop_button(
    mosquitto: Broker, fake_device: FakeDevice
) -> None:
    chromium = require_tool("chromium")
    async with running_dashboard(dashboard_config(mosquitto)) as server, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await open_page(browser, server.url)
            await fake_device.raw("availability", b"online", retain=True)
            card = page.get_by_test_id(CARD)
            await expect(card.get_by_test_id("availability")).to_have_text("ONLINE")
            await expect(card.get_by_test_id("stop-section")).to_have_count(0)
            await expect(page.locator("[data-testid=stop-button]")).to_have_count(0)
        finally:
            await browser.close()
