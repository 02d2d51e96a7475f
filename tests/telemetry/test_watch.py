"""``devicectl watch``: the live view follows a real publisher; an unreachable broker exits 3."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.telemetry import Telemetry
from devicectl.telemetry.watch import FleetView, watch
from tests.brokers import Broker, free_port
from tests.telemetry.helpers import config, until

pytestmark = pytest.mark.system


async def test_watch_shows_a_publishing_device(mosquitto: Broker, tmp_path: Path) -> None:
    view = FleetView()
    console = Console(file=io.StringIO(), width=160)
    watcher = asyncio.create_task(watch(mosquitto.host, mosquitto.port, view=view, console=console))
    try:
        async with Telemetry(config(mosquitto.url, tmp_path)) as tm:
            await until(lambda: tm.connected)
            tm.publish_state(state="EMITTING", armed=True, session="S-5")
            tm.publish_session({"session": "S-5", "pulses": 40, "energy_uj": 80_000,
                                "energy_uj_by_zone": {"forehead": 80_000}})  # fmt: skip
            tm.publish_alert("critical", "skin_temp", "skin 41.5 C over 41.0 C", 41.5, 41.0, "S-5")
            await until(
                lambda: (
                    ("clinic1", "SN42") in view.devices and view.devices[("clinic1", "SN42")].alerts
                ),
                what="the view to catch up",
            )
        await until(lambda: view.devices[("clinic1", "SN42")].availability == "offline")
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    device = view.devices[("clinic1", "SN42")]
    assert (device.state, device.armed, device.session, device.pulses) == (
        "EMITTING",
        True,
        "S-5",
        40,
    )
    assert device.energy_uj_by_zone == {"forehead": 80_000}
    assert "skin_temp" in device.alerts[0]


def test_watch_cli_names_an_unreachable_broker() -> None:
    port = free_port()
    result = CliRunner().invoke(app, ["watch", "--mqtt", f"mqtt://127.0.0.1:{port}"])
    assert result.exit_code == 3
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in result.output


def test_watch_cli_rejects_a_bad_url() -> None:
    result = CliRunner().invoke(app, ["watch", "--mqtt", "http://broker"])
    assert result.exit_code == 2
    assert "mqtt.url" in result.output
