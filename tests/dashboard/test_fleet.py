"""State aggregation: telemetry messages in, the dashboard's view model out (no I/O, no clock)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devicectl.dashboard import DisplayLimits, Fleet, Update

BASE = "lasers/clinic-a/laser-01"
T0 = 1_764_064_800.0  # receive times are passed in, like any clock


def env(seq: int, boot: int = 1, device: str = "laser-01", **fields: Any) -> bytes:
    return json.dumps(
        {"v": 1, "ts": "2026-11-25T10:00:00.000Z", "device": device, "seq": seq, "boot": boot}
        | fields
    ).encode()


def state(seq: int, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "state": "READY",
        "interlocks": [],
        "faults": [],
        "params": {"energy_uj": 6000, "width_us": 1000, "rate_mhz": 10000, "spot_um": 300},
        "armed": True,
        "session": "S1",
        "daemon_version": "0.1.0",
    }
    return env(seq, **(fields | overrides))


def session(seq: int, **summary: Any) -> bytes:
    fields = {
        "session": "S1",
        "operator": "op-7",
        "patient": "P-0042",
        "skin_type": "III",
        "zone": "forehead",
        "pulses": 0,
        "energy_uj": 0,
        "energy_uj_by_zone": {},
    }
    return env(seq, summary=fields | summary)


def pulses(seq: int, first: int, count: int, energy_uj: int = 6000, **fields: Any) -> bytes:
    batch = [[first + i, 1000 * i, energy_uj] for i in range(count)]
    body: dict[str, Any] = {
        "session": "S1",
        "zone": "forehead",
        "first_pulse_no": first,
        "last_pulse_no": first + count - 1,
        "count": count,
        "energy_uj_sum": energy_uj * count,
        "energy_uj_min": energy_uj,
        "energy_uj_max": energy_uj,
        "pulses": batch,
    }
    return env(seq, **(body | fields))


def fleet_view(fleet: Fleet, key: str = "clinic-a/laser-01") -> dict[str, Any]:
    site, device = key.split("/")
    view = fleet.device_view(site, device)
    assert view is not None
    return view


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(limits=DisplayLimits({"forehead": 60.0, "cheeks": 80.0}, 300.0, 41.0))


def test_a_device_appears_with_its_availability_and_state(fleet: Fleet) -> None:
    updates = fleet.apply(f"{BASE}/availability", b"online", T0)
    assert [u.data["op"] for u in updates] == ["device"]
    assert updates[0].data["fields"]["availability"] == "online"

    fleet.apply(f"{BASE}/state", state(1, interlocks=["door"], faults=["LEASE_EXPIRED"]), T0)
    view = fleet_view(fleet)
    assert view["availability"] == "online"
    assert view["state"]["state"] == "READY"
    assert view["state"]["armed"] is True
    assert view["state"]["interlocks_open"] == ["door"]
    assert view["state"]["faults"] == ["LEASE_EXPIRED"]
    assert view["state"]["params"] == {
        "energy_mj": 6.0,
        "width_ms": 1.0,
        "rate_hz": 10.0,
        "spot_um": 300.0,
    }
    assert view["state"]["version"] == "0.1.0"


def test_a_payload_outside_the_published_schema_is_unreadable_not_guessed(fleet: Fleet) -> None:
    # Bitmasks instead of the contract's lists: refused by the schema, counted, never shown.
    fleet.apply(f"{BASE}/state", env(1, state=3, interlocks=0b01001, faults=0b10), T0)
    view = fleet_view(fleet)
    assert view["state"] is None
    assert view["malformed"] == 1
    assert view["last_malformed"].startswith("state: ")


def test_offline_last_will_keeps_the_last_known_state(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/availability", b"online", T0)
    fleet.apply(f"{BASE}/state", state(1, state="EMITTING"), T0)
    updates = fleet.apply(f"{BASE}/availability", b"offline", T0 + 5)
    fields = updates[0].data["fields"]
    assert fields["availability"] == "offline"
    assert fields["availability_at"].startswith("2025-11-25T10:00:05")
    view = fleet_view(fleet)
    assert view["availability"] == "offline"
    assert view["state"]["state"] == "EMITTING"  # last known, shown greyed out by the page


def test_empty_retained_session_means_no_session(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1, pulses=10), T0)
    assert fleet_view(fleet)["session"]["operator"] == "op-7"

    updates = fleet.apply(f"{BASE}/session", b"", T0 + 1)
    assert updates[0].data["fields"]["session"] is None
    assert fleet_view(fleet)["session"] is None

    # Late pulses of the ended session do not bring it back.
    fleet.apply(f"{BASE}/pulses", pulses(1, first=11, count=5), T0 + 2)
    assert fleet_view(fleet)["session"] is None


def test_pulses_count_up_between_session_summaries(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1, pulses=0), T0)
    fleet.apply(f"{BASE}/pulses", pulses(1, first=1, count=10), T0 + 0.1)
    fleet.apply(f"{BASE}/pulses", pulses(2, first=11, count=10), T0 + 0.2)
    view = fleet_view(fleet)["session"]
    assert view["pulses"] == 20
    assert view["energy_j"] == pytest.approx(20 * 6000e-6)
    [forehead] = view["zones"]
    assert forehead["zone"] == "forehead"
    assert forehead["energy_j"] == pytest.approx(0.12)
    assert forehead["limit_j"] == 60.0  # from the policy: telemetry carries no limits
    assert forehead["current"] is True

    # The next summary is authoritative where it is ahead, and never takes the count back.
    fleet.apply(f"{BASE}/session", session(2, pulses=25, energy_uj=150_000), T0 + 1)
    view = fleet_view(fleet)["session"]
    assert view["pulses"] == 25
    assert view["energy_j"] == pytest.approx(0.15)
    fleet.apply(f"{BASE}/session", session(3, pulses=18), T0 + 1.1)  # stale figure
    assert fleet_view(fleet)["session"]["pulses"] == 20


def test_energy_per_zone_from_the_summary_and_the_current_zone(fleet: Fleet) -> None:
    fleet.apply(
        f"{BASE}/session",
        session(1, zone="cheeks", energy_uj_by_zone={"forehead": 30_000_000, "cheeks": 0}),
        T0,
    )
    zones = {z["zone"]: z for z in fleet_view(fleet)["session"]["zones"]}
    assert zones["forehead"]["energy_j"] == pytest.approx(30.0)
    assert zones["forehead"]["limit_j"] == 60.0
    assert zones["forehead"]["current"] is False
    assert zones["cheeks"]["current"] is True
    assert fleet_view(fleet)["session"]["energy_limit_j"] == 300.0


def test_gaps_in_seq_are_counted_per_topic(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1), T0)
    fleet.apply(f"{BASE}/pulses", pulses(5, first=1, count=1), T0)
    fleet.apply(f"{BASE}/pulses", pulses(6, first=2, count=1), T0)
    updates = fleet.apply(f"{BASE}/pulses", pulses(9, first=3, count=1), T0)  # 7 and 8 lost
    assert updates[0].data["fields"]["missed"] == {"pulses": 2}
    fleet.apply(f"{BASE}/metrics", env(1, skin_temp_c=33.0), T0)
    fleet.apply(f"{BASE}/metrics", env(4, skin_temp_c=33.1), T0 + 3)
    assert fleet_view(fleet)["missed"] == {"pulses": 2, "metrics": 2}


def test_a_duplicate_is_not_counted_twice(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1), T0)
    fleet.apply(f"{BASE}/pulses", pulses(1, first=1, count=10), T0)
    assert fleet.apply(f"{BASE}/pulses", pulses(1, first=1, count=10), T0) == [
        Update(
            {
                "op": "device",
                "key": "clinic-a/laser-01",
                "fields": {
                    "missed": {},
                    "restarts": 0,
                    "last_restart": None,
                    "last_seen": fleet_view(fleet)["last_seen"],
                },
            }
        )
    ]
    assert fleet_view(fleet)["session"]["pulses"] == 10
    assert fleet_view(fleet)["missed"] == {}


def test_a_daemon_whose_counters_were_reset_is_followed(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/state", state(50, boot=3), T0)
    fleet.apply(f"{BASE}/state", state(1, boot=4, state="STANDBY"), T0 + 1)
    assert fleet_view(fleet)["state"]["state"] == "STANDBY"
    assert fleet_view(fleet)["missed"] == {}


def test_missing_pulse_numbers_between_batches(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1), T0)
    fleet.apply(f"{BASE}/pulses", pulses(1, first=1, count=10), T0)
    updates = fleet.apply(f"{BASE}/pulses", pulses(2, first=15, count=10), T0)
    assert updates[0].data["fields"]["pulse_gaps"] == 4
    assert fleet_view(fleet)["missed"] == {}  # no message lost: the daemon skipped pulse numbers


def test_alerts_newest_first_for_the_device_and_the_fleet(fleet: Fleet) -> None:
    other = "lasers/clinic-a/laser-02"
    fleet.apply(f"{BASE}/alerts", env(1, severity="warning", code="SKIN_TEMP", message="a"), T0)
    updates = fleet.apply(
        f"{other}/alerts",
        env(
            1,
            device="laser-02",
            severity="critical",
            code="ENERGY_DEVIATION",
            message="b",
            value=7.8,
            limit=7.2,
        ),
        T0 + 1,
    )
    # A new device's first message is its whole view, plus the alert for the fleet's list.
    assert [u.data["op"] for u in updates] == ["device", "alert"]
    alert = updates[1].data["alert"]
    assert alert["rank"] == 3
    assert (alert["value"], alert["limit"]) == (7.8, 7.2)
    snapshot = fleet.snapshot()
    assert [a["code"] for a in snapshot["alerts"]] == ["ENERGY_DEVIATION", "SKIN_TEMP"]
    assert [a["message"] for a in fleet_view(fleet)["alerts"]] == ["a"]
    assert snapshot["alerts"][0]["id"] != snapshot["alerts"][1]["id"]


def test_metrics_feed_the_skin_temperature_chart(fleet: Fleet) -> None:
    for i in range(5):
        payload = json.dumps(
            {
                "v": 1,
                "ts": f"2026-11-25T10:00:0{i}Z",
                "device": "laser-01",
                "seq": i + 1,
                "boot": 1,
                "rate_hz": 10.0,
                "avg_power_w": 0.06,
                "skin_temp_c": 33.0 + i / 10,
                "head_temp_c": 28.0,
                "counters": {"pulses": 100 * i},
            }
        ).encode()
        updates = fleet.apply(f"{BASE}/metrics", payload, T0 + i)
    assert updates[-1].data["op"] == "skin_temp"
    view = fleet_view(fleet)
    assert [p[1] for p in view["skin_temp"]] == [33.0, 33.1, 33.2, 33.3, 33.4]
    assert view["skin_temp"][1][0] - view["skin_temp"][0][0] == 1000.0
    assert view["metrics"]["head_temp_c"] == 28.0
    assert view["skin_temp_limit_c"] == 41.0


def test_the_chart_keeps_only_its_window() -> None:
    fleet = Fleet(history_s=10.0)
    for i in range(30):
        fleet.apply(f"{BASE}/metrics", env(i + 1, skin_temp_c=33.0), T0 + i)
    points = fleet_view(fleet)["skin_temp"]
    assert points[-1][0] - points[0][0] <= 10_000.0


def test_malformed_payloads_are_counted_not_fatal(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/state", b"{not json", T0)
    fleet.apply(f"{BASE}/availability", b"maybe", T0)
    fleet.apply(f"{BASE}/pulses", b"[1, 2]", T0)
    view = fleet_view(fleet)
    assert view["malformed"] == 3
    assert "not an object" in view["last_malformed"]
    assert view["availability"] == "unknown"


def test_foreign_topics_and_commands_are_ignored(fleet: Fleet) -> None:
    assert fleet.apply("other/clinic-a/laser-01/state", state(1), T0) == []
    assert fleet.apply(f"{BASE}/cmd/stop", b"{}", T0) == []
    assert fleet.apply(f"{BASE}/firmware", b"x", T0) == []
    assert fleet.apply("lasers/clinic-a", b"x", T0) == []
    assert fleet.snapshot()["devices"] == []


def test_session_events_are_listed(fleet: Fleet) -> None:
    fleet.apply(
        f"{BASE}/sessions/S1/events",
        env(1, session="S1", event="zone", details={"zone": "neck"}),
        T0,
    )
    [event] = fleet_view(fleet)["events"]
    assert event == {
        "ts": "2026-11-25T10:00:00.000Z",
        "session": "S1",
        "event": "zone",
        "zone": None,
        "detail": "zone=neck",
        "order": "first",
    }


def test_reconnecting_to_the_broker_forgets_retained_topics(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/availability", b"online", T0)
    fleet.apply(f"{BASE}/state", state(7), T0)
    fleet.apply(f"{BASE}/session", session(3, pulses=5), T0)
    fleet.apply(f"{BASE}/alerts", env(1, severity="critical", code="X", message="m"), T0)
    fleet.broker_link(False, T0 + 1, "connection lost")
    assert fleet.snapshot()["broker"]["connected"] is False

    updates = fleet.broker_link(True, T0 + 2)
    assert [u.data["op"] for u in updates] == ["broker", "device"]
    view = fleet_view(fleet)
    # The session ended while we were away: the broker replays no session, so none is shown.
    assert (view["availability"], view["state"], view["session"]) == ("unknown", None, None)
    assert len(view["alerts"]) == 1  # history is kept
    # The replay of the same retained state (same seq) is applied again.
    fleet.apply(f"{BASE}/state", state(7), T0 + 2)
    assert fleet_view(fleet)["state"]["state"] == "READY"


# ------------------------------------------------------------------------- hostile telemetry


def at(seq: int, boot: int, second: int, **fields: Any) -> bytes:
    """A state message with its own ts, as a real device's messages each have."""
    body = json.loads(state(seq, **fields))
    body |= {"boot": boot, "ts": f"2026-11-25T10:00:{second:02d}.000Z"}
    return json.dumps(body).encode()


def test_one_deep_or_huge_message_cannot_freeze_the_view(fleet: Fleet) -> None:
    for payload in (b"[" * 100_000, b'{"seq": ' + b"9" * 5000 + b"}"):
        fleet.apply(f"{BASE}/state", payload, T0)
    fleet.apply(f"{BASE}/state", state(1, state="FAULT", faults=["INTERNAL"]), T0 + 1)
    fleet.apply(f"{BASE}/alerts", env(1, severity="critical", code="X", message="m"), T0 + 1)
    view = fleet_view(fleet)
    assert view["state"]["state"] == "FAULT"
    assert view["malformed"] == 2
    assert fleet.snapshot()["alerts"][0]["rank"] == 3


def test_infinite_energies_never_reach_the_snapshot(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/session", session(1), T0)
    for seq in (1, 2):
        fleet.apply(f"{BASE}/pulses", pulses(seq, 1, 1).replace(b"6000,", b"1.7e308,", 1), T0)
    json.dumps(fleet.snapshot(), allow_nan=False)
    assert fleet_view(fleet)["malformed"] == 2


def test_a_forged_seq_and_boot_do_not_hide_the_real_fault_and_alerts(fleet: Fleet) -> None:
    for seq in range(1, 4):
        fleet.apply(f"{BASE}/state", at(seq, 3, seq, state="EMITTING"), T0 + seq)
    fleet.apply(f"{BASE}/state", at(10**15, 10**15, 10, state="READY"), T0 + 10)
    fleet.apply(
        f"{BASE}/alerts", env(10**15, boot=10**15, severity="info", code="F", message="f"), T0
    )
    fleet.apply(f"{BASE}/state", at(4, 3, 11, state="FAULT", faults=["INTERNAL"]), T0 + 11)
    for seq in (1, 2):
        alert = env(seq, boot=3, severity="critical", code=f"C{seq}", message="real")
        fleet.apply(f"{BASE}/alerts", alert, T0 + 12)
    view = fleet_view(fleet)
    assert view["state"]["state"] == "FAULT"
    assert [a["code"] for a in view["alerts"][:2]] == ["C2", "C1"]
    assert view["restarts"] >= 2
    assert view["missed"] == {}


def test_a_reprovisioned_device_is_followed_and_its_alerts_kept(fleet: Fleet) -> None:
    fleet.apply(f"{BASE}/state", at(800, 9, 1, state="EMITTING"), T0)
    fleet.apply(f"{BASE}/alerts", env(300, boot=9, severity="warning", code="old", message="m"), T0)
    fleet.apply(f"{BASE}/state", at(1, 1, 30, state="FAULT"), T0 + 30)
    fleet.apply(f"{BASE}/alerts", env(1, boot=1, severity="critical", code="new", message="m"), T0)
    view = fleet_view(fleet)
    assert view["state"]["state"] == "FAULT"
    assert view["alerts"][0]["code"] == "new"
    assert view["alerts"][0]["order"] == "restart"
    assert "boot 9 -> 1" in view["last_restart"]


def test_a_repeated_alert_is_shown_marked_never_dropped(fleet: Fleet) -> None:
    alert = env(5, severity="critical", code="X", message="m")
    fleet.apply(f"{BASE}/alerts", alert, T0)
    fleet.apply(f"{BASE}/alerts", alert, T0 + 1)
    orders = [a["order"] for a in fleet_view(fleet)["alerts"]]
    assert orders == ["duplicate", "first"]


def test_look_alike_and_control_character_ids_are_never_devices(fleet: Fleet) -> None:
    alert = env(1, device="laser-01\u200b", severity="critical", code="X", message="m")
    updates = fleet.apply("lasers/clinic-a/laser-01\u200b/alerts", alert, T0)
    assert [u.data["op"] for u in updates] == ["invalid"]
    fleet.apply("lasers/clinic-a/laser\x1b[2J/state", state(1), T0)
    snapshot = fleet.snapshot()
    assert snapshot["devices"] == []
    assert snapshot["alerts"] == []
    assert snapshot["invalid"]["count"] == 2
    assert "\\u200b" in updates[0].data["invalid"]["last"]
    assert "\x1b" not in snapshot["invalid"]["last"]


def test_devices_are_bounded_the_least_recently_heard_evicted() -> None:
    fleet = Fleet(max_devices=3)
    for n in range(3):
        fleet.apply(f"lasers/s/d{n}/availability", b"online", T0 + n)
    fleet.apply("lasers/s/d0/availability", b"online", T0 + 5)  # d0 heard again: d1 is oldest
    updates = fleet.apply("lasers/s/d9/availability", b"online", T0 + 6)
    assert updates[0].data == {"op": "remove", "key": "s/d1"}
    assert [d["key"] for d in fleet.snapshot()["devices"]] == ["s/d0", "s/d2", "s/d9"]


def test_a_flood_of_new_devices_evicts_quiet_ones_before_an_alarm() -> None:
    fleet = Fleet(max_devices=3)
    fleet.apply(f"{BASE}/state", state(1, state="FAULT", faults=["INTERNAL"]), T0)
    for n in range(50):
        fleet.apply(f"lasers/flood/d{n}/availability", b"online", T0 + 1 + n)
    keys = [d["key"] for d in fleet.snapshot()["devices"]]
    assert "clinic-a/laser-01" in keys
    assert len(keys) == 3


def test_alert_text_and_lists_are_bounded(fleet: Fleet) -> None:
    for seq in range(1, 300):
        message = "x" * 60_000
        fleet.apply(f"{BASE}/alerts", env(seq, severity="critical", code="X", message=message), T0)
    snapshot = fleet.snapshot()
    assert len(snapshot["alerts"]) == 100
    assert len(fleet_view(fleet)["alerts"]) == 20
    assert len(json.dumps(snapshot)) < 200_000


def test_session_churn_keeps_a_few_sessions_per_device(fleet: Fleet) -> None:
    for n in range(1, 2000):
        batch = pulses(n, first=1, count=1, session=f"S{n}")
        fleet.apply(f"{BASE}/pulses", batch, T0)
    device = fleet._devices["clinic-a/laser-01"]
    assert len(device.live) <= 4
