"""The dashboard's history view over the recorder's database (both engines), called as an ASGI
app: the list with its filters, a session's page with its plot rebuilt from the recorded pulses,
a course across devices, the JSON twins, and escaping of what devices sent."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from starlette.applications import Starlette

from devicectl.dashboard.history import history_mount
from devicectl.recorder.intake import utc_text
from devicectl.recorder.store import open_store
from tests.recorder.helpers import T0, FakeDevice, accepted, patient_key

pytestmark = pytest.mark.system


async def _get(app: Starlette, path: str, query: str = "") -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, body


@pytest.fixture
async def history(db_url: str) -> Starlette:
    a, b = FakeDevice("laser-a"), FakeDevice("laser-b")
    key = patient_key("PT-1")
    messages = a.treatment("1", key, T0, batches=4, per_batch=10)
    messages += b.treatment("1", key, T0 + timedelta(days=9))
    messages += a.treatment("2", patient_key("PT-2"), T0 + timedelta(days=1))
    # What a device sends is shown escaped, never as markup.
    messages.append(b.event("9", "started", T0 - timedelta(days=1), operator="<i>x</i>"))
    async with await open_store(db_url) as store:
        await store.write([accepted(t, p) for t, p in messages], [], utc_text(T0))
    return Starlette(routes=[history_mount(db_url)])


async def test_the_list_filters_by_device_patient_and_date(history: Starlette) -> None:
    status, headers, body = await _get(history, "/history/")
    assert status == 200
    assert "script-src 'none'" in headers["content-security-policy"]
    page = body.decode()
    assert page.count("/history/sessions/") == 4
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "<i>x</i>" not in page
    _, _, body = await _get(history, "/history/api/sessions", "device=laser-a")
    assert [s["session"] for s in json.loads(body)] == ["2", "1"]
    _, _, body = await _get(history, "/history/api/sessions", f"patient={patient_key('PT-1')}")
    assert [s["device"] for s in json.loads(body)] == ["laser-b", "laser-a"]
    _, _, body = await _get(history, "/history/api/sessions", "since=2026-11-03&until=2026-11-04")
    assert [s["patient"] for s in json.loads(body)] == [patient_key("PT-2")]


async def test_a_sessions_page_is_rebuilt_from_recorded_telemetry(history: Starlette) -> None:
    status, _, body = await _get(history, "/history/sessions/laser-a/1")
    assert status == 200
    page = body.decode()
    assert "<polyline" in page  # the energy-per-pulse plot, from the pulse batches
    assert "Rebuilt from recorded telemetry" in page
    assert "started" in page and "ended" in page
    _, _, body = await _get(history, "/history/api/sessions/laser-a/1")
    detail = json.loads(body)
    assert detail["pulses"] == 40 == len(detail["pulse_list"])
    assert detail["zones"] == [
        {"zone": "cheeks", "batches": 4, "pulses": 40,
         "energy_uj": sum(p[2] for p in detail["pulse_list"]), "dropped": 0}
    ]  # fmt: skip
    status, _, _ = await _get(history, "/history/api/sessions/laser-a/99")
    assert status == 404


async def test_a_course_page_shows_both_devices(history: Starlette) -> None:
    key = patient_key("PT-1")
    status, _, body = await _get(history, f"/history/courses/{quote(key)}")
    assert status == 200
    page = body.decode()
    assert "2 of 6 given" in page
    assert "on laser-a, laser-b" in page
