"""`devicectl demo` records to the embedded store; its dashboard shows the session in history."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devicectl.demo import DemoOptions, DemoStack

pytestmark = pytest.mark.system


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


async def test_the_demo_session_appears_in_the_dashboards_history(tmp_path: Path) -> None:
    async with DemoStack(DemoOptions(duration_s=8, data_dir=tmp_path / "demo")) as stack:
        result = await stack.play()
        assert result.ok, result.reason
        url = f"{stack.dashboard_url}/history/api/sessions"
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            sessions = await asyncio.to_thread(_get_json, url)
            if sessions and sessions[0]["ended"] is not None:
                break
            assert asyncio.get_running_loop().time() < deadline, sessions
            await asyncio.sleep(0.2)
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{stack.dashboard_url}/history", timeout=5).read()
        )
    assert len(sessions) == 1
    recorded = sessions[0]
    assert recorded["session"] == str(result.session_id)
    assert result.summary is not None
    assert recorded["pulses"] == result.summary["pulses"]
    assert recorded["recorded_pulses"] == recorded["pulses"]  # every batch reached the recorder
    assert f"/history/sessions/{recorded['device']}/{recorded['session']}".encode() in page
