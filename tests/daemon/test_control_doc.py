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
    from tests.daemon.conftest import SESSION, SUPERVISOR

    started = await driver.ok(
        "session_start", **{k: v for k, v in SESSION.items() if k != "command"}
    )
    assert set(started) == {
        "session",
        "course",
        "warnings",
        "course_source",
        "active_ingredient",
        "preset",
    }
    section = DOC[DOC.index("### `session_start`") : DOC.index("### `session_zone`")]
    for key in [*started, *started["course"]]:
        assert f"`{key}`" in section, key
    zone = await driver.ok("session_zone", zone="forehead")
    assert {"session", "zone", "energy_limit_uj"} <= set(zone)
    params = await driver.ok("params_set", energy_uj=2000, width_us=500, rate_hz=20, spot_um=300)
    assert set(params) == {"params", "fluence_j_cm2"}
    assert set(params["params"]) == {"energy_uj", "width_us", "rate_hz", "spot_um"}
    assert set(await driver.ok("arm")) == {"armed", "lease_ms"}
    assert set(await driver.ok("disarm")) == {"armed"}
    assert set(await driver.ok("stop")) == {"stopped", "state"}
    signoff = SUPERVISOR | {"reason_code": "handpiece_checked", "reason": "nothing is latched"}
    refused = await driver.call("fault_ack", signoff=signoff)
    assert refused["ok"] is False and refused["kind"] == "refused"
    assert "nothing to acknowledge" in refused["error"]  # the sign-off held; the state said no
    note = await driver.ok("session_note", text="patient tolerated well")
    assert note == {"session": started["session"], "recorded": "note", "by": "OP-7"}
    summary = await driver.ok("session_end", post_care=["sunscreen"])
    section = DOC[DOC.index("### `session_end`") : DOC.index("## Example")]
    for key in summary:
        assert f"`{key}`" in section, key
