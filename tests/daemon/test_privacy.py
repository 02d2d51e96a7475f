"""Patient data stays on the device: MQTT carries a keyed pseudonym of the patient reference, or
nothing, or (only when configured so) the reference itself. Checked on everything a plain
subscriber to ``lasers/#`` receives from a real mosquitto during a whole session."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from devicectl.privacy import patient_key
from devicectl.simlink import compose
from tests.brokers import Broker
from tests.daemon.conftest import END, SESSION, Driver, _settings
from tests.telemetry.helpers import recorder, until

SECRET = "site-secret-of-clinic1-0123456789"
REF = str(SESSION["patient_ref"]).encode()


def test_the_pseudonym_is_hmac_sha256_of_the_reference_keyed_with_the_site_secret() -> None:
    # The wire agreement with the fleet recorder, written out independently.
    expected = hmac.new(SECRET.encode(), b"PT-0042", hashlib.sha256).hexdigest()
    assert patient_key(SECRET, "PT-0042") == expected
    assert len(expected) == 64 and expected == expected.lower()
    assert patient_key(SECRET, "PT-0042") != patient_key(SECRET + "x", "PT-0042")


@pytest.mark.system
@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        ({"privacy__patient_key_secret": SECRET}, patient_key(SECRET, "PT-0042")),
        ({}, None),
        ({"privacy__publish_patient_ref": True}, "PT-0042"),
    ],
    ids=["pseudonym", "nothing", "reference-by-setting"],
)
async def test_what_of_the_patient_reaches_the_broker(
    tmp_path: Path,
    policy_file: Path,
    mosquitto: Broker,
    privacy: dict[str, Any],
    expected: str | None,
) -> None:
    settings = _settings(
        tmp_path, policy_file, "sim", mqtt__url=mosquitto.url, mqtt__site="clinic1", **privacy
    )
    with recorder(mosquitto.port, client_id="dashboard") as rec:
        async with compose(settings) as daemon:
            drv = Driver(daemon)
            await drv.until(lambda: daemon.telemetry is not None and daemon.telemetry.connected)
            await drv.ok(**SESSION)
            await drv.ok("session_zone", zone="forehead")
            await until(lambda: rec.on("session"), what="a session summary")
            await drv.ok("session_end", **END)
            await until(lambda: _event(rec.snapshot(), "ended"), what="the ended event")
        messages = rec.snapshot()
    started = _event(messages, "started")
    assert started is not None and started["details"]["patient"] == expected
    assert "patient_ref" not in started["details"]
    summaries = [
        m.json()["summary"] for m in messages if m.topic.endswith("/session") and m.payload
    ]
    assert summaries and all(s["patient"] == expected for s in summaries)
    ended = _event(messages, "ended")
    assert ended is not None and ended["summary"]["patient"] == expected
    carrying = [m.topic for m in messages if REF in m.payload]
    if expected == "PT-0042":
        assert carrying  # the explicit setting, honoured
    else:
        assert carrying == [], carrying  # the reference never reached the broker


def _event(messages: list[Any], kind: str) -> dict[str, Any] | None:
    for m in messages:
        if m.topic.endswith("/events"):
            body: dict[str, Any] = json.loads(m.payload)
            if body.get("event") == kind:
                return body
    return None


def test_the_privacy_and_clinic_settings_read_from_the_environment_and_hide_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from devicectl.config import load_settings
    from devicectl.errors import ConfigError

    monkeypatch.setenv("DEVICECTL_PRIVACY__PATIENT_KEY_SECRET", SECRET)
    monkeypatch.setenv("DEVICECTL_CLINIC__TIME_ZONE", "Europe/Paris")
    settings = load_settings(None, data_dir=tmp_path)
    assert settings.privacy.patient_key_secret is not None
    assert settings.privacy.patient_key_secret.get_secret_value() == SECRET
    assert settings.privacy.publish_patient_ref is False
    shown = settings.redacted_dict()
    assert shown["privacy"]["patient_key_secret"] == "***"
    assert SECRET not in json.dumps(shown)
    assert shown["clinic"]["time_zone"] == "Europe/Paris"
    monkeypatch.setenv("DEVICECTL_CLINIC__TIME_ZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match=r"clinic\.time_zone"):
        load_settings(None, data_dir=tmp_path)
    monkeypatch.delenv("DEVICECTL_CLINIC__TIME_ZONE")
    monkeypatch.setenv("DEVICECTL_PRIVACY__PATIENT_KEY_SECRET", "")
    with pytest.raises(ConfigError, match=r"privacy\.patient_key_secret"):
        load_settings(None, data_dir=tmp_path)
