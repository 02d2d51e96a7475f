"""End to end in a real headless Chromium, nothing faked: the real daemon on its in-process
simulator publishes to a real mosquitto, the real dashboard serves the page, and the page follows
the device live — online, pulses counting up, the page's stop reaching the daemon, the breach alert
within a second of the daemon's STOP, offline once the daemon has shut down. Uses Debian's
/usr/bin/chromium through playwright; never downloads a browser.

The screenshot is kept at ``artifacts/dashboard.png`` (README, "Telemetry"), for CI to keep.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    BrowserContext,
    Locator,
    Page,
    Playwright,
    ViewportSize,
    async_playwright,
    expect,
)

from devicectl.sessionlog import reader, store
from tests.brokers import Broker
from tests.conftest import require_tool
from tests.daemon.conftest import ACK, END, OPERATOR, Driver
from tests.dashboard.conftest import dashboard_config, running_daemon, running_dashboard

pytestmark = pytest.mark.system

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TABLET: ViewportSize = {"width": 800, "height": 1280}
WAIT_MS = 15_000  # generous: a daemon, a broker, a server and a browser share two cores
BREACH = "energy_out_of_tolerance"

expect.set_options(timeout=WAIT_MS)

# Stamps (page clock, Unix ms) the moment the banner is shown with the given alert code.
WATCH_BANNER = """(code) => {
  window.bannerShownAt = null;
  const banner = document.getElementById("alert-banner");
  const check = () => {
    if (window.bannerShownAt === null && !banner.hidden && banner.textContent.includes(code)) {
      window.bannerShownAt = Date.now();
    }
  };
  new MutationObserver(check).observe(banner,
    { attributes: true, childList: true, subtree: true, characterData: true });
  check();
}"""


async def launch(pw: Playwright, profile: Path) -> BrowserContext:
    """The system Chromium on a fresh profile (playwright takes the user data dir this way)."""
    context = await pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=require_tool("chromium"),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport=TABLET,
    )
    context.set_default_timeout(WAIT_MS)
    return context


async def open_page(context: BrowserContext, url: str) -> Page:
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(url)
    await expect(page.get_by_test_id("stream")).to_have_text("page: live")
    await expect(page.get_by_test_id("broker")).to_have_text("broker: connected")
    setattr(page, "js_errors", errors)  # noqa: B010 - read back by the test
    return page


def serial(driver: Driver) -> str:
    """The device's name on MQTT: its serial from IDENT."""
    assert driver.daemon.ident is not None
    return f"{driver.daemon.ident.serial:08X}"


async def pulses_above(card: Locator, floor: int) -> int:
    """Wait until the page shows more than ``floor`` pulses; return the count shown."""
    shown = card.get_by_test_id("pulses")
    await shown.wait_for_function("(el, floor) => Number(el.textContent) > floor", arg=floor)
    return int(await shown.inner_text())


async def logged_events(driver: Driver, event: str) -> list[dict[str, Any]]:
    """The open session's ``event`` records in the daemon's session log (seq, at_ns, body)."""
    log, treatment = driver.daemon.sessionlog, driver.daemon.treatment
    assert log is not None and treatment is not None
    await log.flush_async()
    conn = store.connect(log.path, readonly=True)
    try:
        record = reader.load_session(conn, treatment.id)
    finally:
        conn.close()
    assert record is not None
    return [r for r in record.records if r["kind"] == "event" and r["body"]["event"] == event]


async def stop_from_the_page(page: Page, card: Locator, driver: Driver) -> None:
    """A confirmation first; cancel sends nothing; confirm reaches the daemon over cmd/stop."""
    await card.get_by_test_id("stop-button").click()
    dialog = page.get_by_test_id("stop-dialog")
    await expect(dialog).to_be_visible()
    # The device's serial and its site, exactly as the card shows them.
    await expect(page.get_by_test_id("stop-device")).to_have_text(serial(driver))
    await expect(page.get_by_test_id("stop-site")).to_have_text("clinic-a")
    await page.get_by_test_id("stop-cancel").click()
    await expect(dialog).to_be_hidden()
    await card.get_by_test_id("stop-button").click()
    await page.get_by_test_id("stop-confirm").click()
    await expect(card.get_by_test_id("stop-result")).to_contain_text("Stop sent")
    await driver.until(lambda: not driver.daemon.armed, timeout=WAIT_MS / 1000)
    # One stop, over MQTT: the cancelled one, had it been sent, would have been logged first.
    stops = await logged_events(driver, "stop")
    assert [s["body"]["actor"] for s in stops] == ["mqtt"], stops


async def test_the_page_follows_the_real_daemon(mosquitto: Broker, tmp_path: Path) -> None:
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server, async_playwright() as pw:
        context = await launch(pw, tmp_path / "chromium-profile")
        try:
            page = await open_page(context, server.url)
            await expect(page.get_by_test_id("empty")).to_be_visible()

            async with running_daemon(mosquitto, tmp_path / "daemon") as driver:
                card = page.get_by_test_id(f"device-clinic-a-{serial(driver)}")
                await expect(card.get_by_test_id("availability")).to_have_text("ONLINE")
                await expect(card).to_have_attribute("data-availability", "online")
                await expect(card.get_by_test_id("session")).to_have_text("No session open.")

                # A session on the forehead at 50 Hz: the count shown rises without a reload.
                await driver.emitting_session(zone="forehead", rate_hz=50.0)
                await expect(card.get_by_test_id("armed")).to_be_visible()
                await expect(card.get_by_test_id("operator")).to_have_text(OPERATOR["user"])
                await expect(card.get_by_test_id("zone")).to_have_text("forehead")
                await pulses_above(card, await pulses_above(card, await pulses_above(card, 0)))
                forehead = card.locator("[data-testid=zone-bar][data-zone=forehead]")
                await expect(forehead).to_contain_text("/ 60 J")
                await expect(card.get_by_test_id("skin-temp")).to_have_text(re.compile(r"\d °C$"))
                await expect(card.locator("[data-testid=skin-chart] polyline")).to_have_count(1)

                await stop_from_the_page(page, card, driver)

                # Emitting again, then the board's energy drifts 30 % high: the supervisor
                # writes STOP, and the page shows the alert within a second of it.
                await driver.ok("arm")
                driver.sim("footswitch up")
                driver.sim("footswitch down")
                await driver.until(lambda: driver.daemon.armed, timeout=WAIT_MS / 1000)
                await pulses_above(card, int(await card.get_by_test_id("pulses").inner_text()))
                await page.evaluate(WATCH_BANNER, BREACH)
                driver.sim("fault energy-drift 1.3")
                supervisor = driver.daemon.supervisor
                assert supervisor is not None
                await driver.until(lambda: supervisor.latched is not None, timeout=WAIT_MS / 1000)
                banner = page.get_by_test_id("alert-banner")
                await expect(banner).to_be_visible()
                await expect(banner).to_contain_text(BREACH)
                # Recorded in the same synchronous step that wrote STOP (Daemon._on_event).
                breaches = await logged_events(driver, "breach")
                assert breaches and breaches[0]["body"]["detail"]["code"] == BREACH, breaches
                stopped_at_ms = breaches[0]["at_ns"] / 1e6
                shown_at_ms = await page.evaluate("window.bannerShownAt")
                assert shown_at_ms - stopped_at_ms < 1000, (shown_at_ms, stopped_at_ms)

                await expect(banner).to_contain_text(f"CRITICAL — {serial(driver)} (clinic-a)")
                items = page.get_by_test_id("alert-list").locator("li")
                await expect(items.first).to_contain_text(BREACH)
                await expect(card).to_have_class("device alerting")
                await expect(card.get_by_test_id("armed")).to_have_count(0)

                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # The banner can be acknowledged on this screen.
                await page.get_by_test_id("alert-ack").click()
                await expect(banner).to_be_hidden()

                # The operator acknowledges the breach and ends the session.
                driver.sim("clear-faults")
                await driver.ok("fault_ack", **ACK)
                await driver.ok("session_end", **END)
                await expect(card.get_by_test_id("session")).to_have_text("No session open.")

            # The daemon has shut down in order: the page greys the device out.
            await expect(card.get_by_test_id("availability")).to_have_text("OFFLINE")
            await expect(card.get_by_test_id("stale-note")).to_contain_text("Offline since")
            await expect(card).to_have_attribute("data-availability", "offline")
            await expect(card.get_by_test_id("stop-button")).to_be_disabled()
            await expect(card.locator("header")).not_to_contain_text("null")
            await expect(card.locator("header")).not_to_contain_text("undefined")

            # A page opened now starts from the snapshot: the retained offline, the alert.
            late = await open_page(context, server.url)
            late_card = late.locator(f"[data-key='{await card.get_attribute('data-key')}']")
            await expect(late_card.get_by_test_id("availability")).to_have_text("OFFLINE")
            await expect(late.get_by_test_id("alert-list")).to_contain_text(BREACH)

            assert getattr(page, "js_errors") == []  # noqa: B009
            assert getattr(late, "js_errors") == []  # noqa: B009
        finally:
            await context.close()


async def test_the_page_shows_the_daemon_disarmed_after_its_stop(
    mosquitto: Broker, tmp_path: Path
) -> None:
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server, async_playwright() as pw:
        context = await launch(pw, tmp_path / "chromium-profile")
        try:
            page = await open_page(context, server.url)
            async with running_daemon(mosquitto, tmp_path / "daemon") as driver:
                card = page.get_by_test_id(f"device-clinic-a-{serial(driver)}")
                await driver.emitting_session(zone="forehead", rate_hz=50.0)
                await expect(card.get_by_test_id("armed")).to_be_visible()
                await stop_from_the_page(page, card, driver)
                await expect(card.get_by_test_id("armed")).to_have_count(0)
                await expect(card.get_by_test_id("state")).not_to_have_text("EMITTING")
        finally:
            await context.close()


async def test_without_stop_credentials_there_is_no_stop_button(
    mosquitto: Broker, tmp_path: Path
) -> None:
    async with running_dashboard(dashboard_config(mosquitto)) as server, async_playwright() as pw:
        context = await launch(pw, tmp_path / "chromium-profile")
        try:
            page = await open_page(context, server.url)
            async with running_daemon(mosquitto, tmp_path / "daemon") as driver:
                card = page.get_by_test_id(f"device-clinic-a-{serial(driver)}")
                await expect(card.get_by_test_id("availability")).to_have_text("ONLINE")
                await expect(card.get_by_test_id("stop-section")).to_have_count(0)
                await expect(page.locator("[data-testid=stop-button]")).to_have_count(0)
        finally:
            await context.close()
