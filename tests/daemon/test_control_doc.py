"""docs/control-api.md against the daemon: every request it shows parses, every request field and
every status field the daemon answers is documented, and the replies have the documented keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

from devicectl.control import ControlRequest, parse_request
from tests.daemon.conftest import Driver

DOC = (Path(__file__).resolve().parents[2] / "docs" / "control-api.md").read_text(encoding="utf-8")


def _requests_in_doc() -> list[dict[str, Any]]:
    """Every JSON object in the page that has a "command"."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, re.DOTALL)
    inline = re.findall(r"`(\{\"command\".*?\})`", DOC, re.DOTALL)
    return [json.loads(text) for text in blocks + inline if '"command"' in text]


def test_every_request_shown_parses() -> None:
    shown = _requests_in_doc()
    assert len(shown) >= 9
    for request in shown:
        parse_request(json.dumps(request).encode())


def test_every_command_and_field_is_documented() -> None:
    union = get_args(get_args(ControlRequest)[0])
    for model in union:
        command = get_args(model.model_fields["command"].annotation)[0]
        assert f"`{command}`" in DOC, command
        for field in model.model_fields:
            assert f"`{field}`" in DOC, (command, field)


async def test_the_documented_status_fields_are_the_daemons(driver: Driver) -> None:
    status = await driver.ok("status")
    table = DOC[DOC.index("### `status`") : DOC.index("### `session_start`")]
    documented = set(re.findall(r"^\| `(\w+)`", table, re.MULTILINE))
    documented |= {"skin_temp_c"}  # shares a row with head_temp_c
    assert documented == set(status)
    for counter in status["link"]:
        assert f"`{counter}`" in table, counter


async def test_replies_have_the_documented_keys(driver: Driver) -> None:
    from tests.daemon.conftest import SESSION

    started = await driver.ok(**SESSION)
    assert set(started) == {"session", "warnings", "active_ingredient", "preset"}
    zone = await driver.ok("session_zone", zone="forehead")
    assert {"session", "zone", "energy_limit_uj"} <= set(zone)
    params = await driver.ok("params_set", energy_uj=2000, width_us=500, rate_hz=20, spot_um=300)
    assert set(params) == {"params", "fluence_j_cm2"}
    assert set(params["params"]) == {"energy_uj", "width_us", "rate_hz", "spot_um"}
    assert set(await driver.ok("arm")) == {"armed", "lease_ms"}
    assert set(await driver.ok("disarm")) == {"armed"}
    assert set(await driver.ok("stop")) == {"stopped", "state"}
    refused = await driver.call("fault_ack", operator="OP-7", reason="nothing latched")
    assert refused["ok"] is False and refused["kind"] == "refused"
    summary = await driver.ok("session_end", post_care=["sunscreen"])
    section = DOC[DOC.index("### `session_end`") : DOC.index("## Example")]
    for key in summary:
        assert f"`{key}`" in section, key
