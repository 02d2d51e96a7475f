"""`devicectl log verify --witness DB_URL`: a device's log proven against the checkpoints the
fleet recorder archived from `log/checkpoint` (both engines)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devicectl.cli import app
from devicectl.recorder.intake import utc_text
from devicectl.recorder.store import open_store
from devicectl.sessionlog import DeviceKey
from tests.recorder.helpers import T0, accepted
from tests.sessionlog.tamper import first_pulse_seq, rewrite
from tests.sessionlog.test_checkpoints import DEVICE, _build, _edit_energy

pytestmark = pytest.mark.system


async def _archive(db_url: str, payloads: list[dict[str, object]]) -> None:
    topic = f"lasers/clinic1/{DEVICE}/log/checkpoint"
    batch = [accepted(topic, json.dumps(p).encode(), retained=True) for p in payloads]
    async with await open_store(db_url) as store:
        await store.write(batch, [], utc_text(T0))
        await store.write(batch, [], utc_text(T0))  # retained copies at a resubscription


def test_a_log_is_proven_by_the_recorders_checkpoints_and_an_edit_is_caught(
    db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "sessions.db"
    key = DeviceKey.generate()
    asyncio.run(_archive(db_url, _build(log, key)))
    runner = CliRunner()
    intact = runner.invoke(app, ["log", "verify", "--db", str(log), "--witness", db_url])
    assert intact.exit_code == 0, intact.output
    rewrite(log, _edit_energy(first_pulse_seq(log)))  # an energy changed on the device
    edited = runner.invoke(
        app, ["log", "verify", "--db", str(log), "--witness", db_url, "--device", DEVICE]
    )
    assert edited.exit_code == 1, edited.output
    assert "recorder" in edited.output  # the witness that shows it is named


def test_an_unreachable_witness_database_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "sessions.db"
    _build(log, DeviceKey.generate(), sessions=1)
    result = CliRunner().invoke(
        app, ["log", "verify", "--db", str(log), "--witness", str(tmp_path / "none.sqlite")]
    )
    assert result.exit_code == 3
    assert "no recorder database" in result.output
