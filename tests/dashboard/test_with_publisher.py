"""The dashboard against the project's own publisher (devicectl.telemetry.Telemetry) through a real
mosquitto: every field the page shows is read from what the daemon really sends, and the page's
stop reaches the daemon's ``on_stop``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devicectl.telemetry import Telemetry, TelemetryConfig
from tests.brokers import Broker
from tests.dashboard.conftest import dashboard_config, http, running_dashboard

pytestmark = pytest.mark.system


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling the injected state, not the clock) until ``check()`` holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def test_the_dashboard_reads_what_the_daemon_publishes(
    mosquitto: Broker, tmp_path: Path
) -> None:
    stops: list[int] = []
    telemetry_config = TelemetryConfig(
        url=mosquitto.url,
        site="clinic-a",
        device="laser-01",
        data_dir=tmp_path,
        batch_interval_s=0.05,
    )
    config = dashboard_config(mosquitto, stop_username="staff", stop_password="s3cret")
    async with running_dashboard(config) as server:
        fleet = server.dashboard.fleet

        def view() -> dict[str, Any]:
            found = fleet.device_view("clinic-a", "laser-01")
            return found if found is not None else {}

        async with Telemetry(telemetry_config, on_stop=lambda: stops.append(1)) as telemetry:
            await eventually(lambda: telemetry.connected)
            telemetry.publish_state(
                state="READY",
                interlocks=0b00010,
                faults=0b1,
                params={"energy_uj": 6000, "width_us": 1000, "rate_mhz": 10000, "spot_um": 300},
                armed=True,
                session="S1",
            )
            telemetry.publish_session(
                {
                    "session": "S1",
                    "operator": "op-7",
                    "patient": "P-0042",
                    "skin_type": "III",
                    "zone": "cheeks",
                    "pulses": 0,
                    "energy_uj": 30_000_000,
                    "energy_uj_by_zone": {"forehead": 30_000_000},
                }
            )
            for n in range(1, 21):
                telemetry.offer_pulse(n, n * 100_000, 6000, "cheeks", "S1")
            telemetry.publish_metrics(
                rate_hz=10.0, avg_power_w=0.06, skin_temp_c=34.2, head_temp_c=28.0, counters={}
            )
            telemetry.publish_alert(
                "critical", "ZONE_ENERGY", "zone cheeks over its limit", 81.0, 80.0, "S1"
            )
            telemetry.publish_session_event("S1", "zone", zone="cheeks")

            await eventually(
                lambda: (
                    bool(view())
                    and view()["session"] is not None
                    and view()["session"]["pulses"] == 20
                    and bool(view()["alerts"])
                    and bool(view()["events"])
                    and view()["metrics"] is not None
                    and view()["state"] is not None
                )
            )
            current = view()
            assert current["availability"] == "online"
            assert current["state"]["state"] == "READY"
            assert current["state"]["armed"] is True
            assert current["state"]["interlocks_open"] == ["door"]
            assert current["state"]["faults"] == ["LEASE_EXPIRED"]
            assert current["state"]["params"]["energy_mj"] == 6.0
            assert current["state"]["params"]["rate_hz"] == 10.0
            session = current["session"]
            assert (session["id"], session["operator"], session["zone"]) == ("S1", "op-7", "cheeks")
            zones = {z["zone"]: z for z in session["zones"]}
            assert zones["forehead"]["energy_j"] == pytest.approx(30.0)
            assert zones["cheeks"]["energy_j"] == pytest.approx(20 * 6000e-6)
            assert current["metrics"]["skin_temp_c"] == 34.2
            assert current["skin_temp"][-1][1] == 34.2
            [alert] = current["alerts"]
            assert (alert["severity"], alert["rank"], alert["value"], alert["limit"]) == (
                "critical",
                3,
                81.0,
                80.0,
            )
            assert current["events"][0]["event"] == "zone"
            assert current["missed"] == {}
            assert current["malformed"] == 0

            # The page's Stop reaches the daemon.
            status, _, content = await http(
                server.url, "POST", "/api/devices/clinic-a/laser-01/stop", {"confirm": True}
            )
            assert status == 200, content
            await eventually(lambda: stops == [1])

            telemetry.publish_session(None)
            await eventually(lambda: view()["session"] is None)

        # An orderly exit publishes offline.
        await eventually(lambda: view()["availability"] == "offline")
        assert json.loads((await http(server.url, "GET", "/healthz"))[2])["devices"] == 1
