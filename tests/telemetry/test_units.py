"""Broker-free behaviour: the outbox, the contract's helpers, config, batching, the watch view."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from devicectl.errors import ConfigError
from devicectl.telemetry import Outbox, Telemetry, parse_broker_url
from devicectl.telemetry.watch import FleetView
from protocols.mqtt import (
    AlertPayload,
    SessionEventPayload,
    Stream,
    TopicBase,
    encode_payload,
    mark_historical,
    parse_topic,
)
from tests.telemetry.helpers import config

NOW = datetime(2026, 11, 25, 10, 0, 0, 123000, tzinfo=UTC)


def _alert(seq: int) -> bytes:
    return encode_payload(
        AlertPayload(
            v=1, ts=NOW, device="SN42", seq=seq, boot=1, severity="info", code="c", message="m"
        )
    )


# -- outbox -------------------------------------------------------------------------------------


def test_outbox_keeps_seq_boot_and_messages_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    assert outbox.start_boot() == 1
    assert [outbox.enqueue("t/a", "alerts", _alert)[0] for _ in range(3)] == [1, 2, 3]
    assert outbox.enqueue("t/b", "alerts", _alert)[0] == 1
    assert outbox.next_seq("t/metrics") == 1
    rows = outbox.fetch(0, 10)
    outbox.ack(rows[0].id)
    outbox.close()

    again = Outbox(path)
    assert again.start_boot() == 2
    assert again.depth == 3
    assert [json.loads(r.payload)["seq"] for r in again.fetch(0, 10)] == [2, 3, 1]
    assert again.enqueue("t/a", "alerts", _alert)[0] == 4
    assert again.next_seq("t/metrics") == 2
    assert again.fetch(0, 10)[-1].boot == 2
    again.close()


def test_outbox_bound_drops_oldest_pulses_then_superseded_state_never_alerts(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_bytes=4096)
    outbox.start_boot()
    blob = b"x" * 500
    outbox.enqueue("b/alerts", "alerts", lambda _s: blob)
    outbox.enqueue("b/sessions/s/events", "session-events", lambda _s: blob)
    outbox.enqueue("b/state", "state", lambda _s: blob)
    for _ in range(4):
        outbox.enqueue("b/pulses", "pulses", lambda _s: blob)
    outbox.enqueue("b/state", "state", lambda _s: blob)
    seq, report = outbox.enqueue("b/pulses", "pulses", lambda _s: blob)
    assert report is not None
    assert report.dropped_messages == 1
    assert not report.still_over
    streams = [r.stream for r in outbox.fetch(0, 100)]
    assert streams == ["alerts", "session-events", "state"] + ["pulses"] * 3 + ["state", "pulses"]
    assert seq == 5  # seq numbering is unaffected: the subscriber sees the gap

    for _ in range(6):
        _seq, report = outbox.enqueue("b/alerts", "alerts", lambda _s: blob)
    assert report is not None
    assert report.still_over  # only alerts/events/latest state left: kept, over the bound
    streams = [r.stream for r in outbox.fetch(0, 100)]
    assert "pulses" not in streams
    assert streams.count("alerts") == 7
    assert streams.count("session-events") == 1
    assert streams.count("state") == 1  # the superseded one went
    outbox.close()


def test_outbox_bound_drops_superseded_log_checkpoints_keeping_the_newest(tmp_path: Path) -> None:
    """The newest checkpoint covers everything the older ones did: they may go, never it."""
    outbox = Outbox(tmp_path / "o.sqlite", max_bytes=65536)
    outbox.start_boot()
    report = None
    for n in range(1, 201):
        _seq, report = outbox.enqueue(
            "b/log/checkpoint", "log-checkpoint", lambda _s, n=n: b"%03d" % n + b"c" * 497
        )
    assert report is not None and not report.still_over
    kept = outbox.fetch(0, 1000)
    assert {r.stream for r in kept} == {"log-checkpoint"}
    assert len(kept) < 200
    assert kept[-1].payload.startswith(b"200")  # the newest is there
    outbox.close()


def test_outbox_rejects_a_silly_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outbox_max_bytes"):
        Outbox(tmp_path / "o.sqlite", max_bytes=10)


async def test_outbox_full_raises_one_alert_and_keeps_publishing(tmp_path: Path) -> None:
    cfg = config("mqtt://127.0.0.1:1", tmp_path, outbox_max_bytes=8192)
    async with Telemetry(cfg) as tm:
        for n in range(2000):
            tm.offer_pulse(n + 1, n, 1000, "hands", "S")
            if n % 100 == 99:
                tm._flush_pulses()  # what the 100 ms batcher does
        stats = tm.stats
    assert stats.outbox_dropped > 0
    outbox = Outbox(cfg.outbox_path)
    alerts = [json.loads(r.payload) for r in outbox.fetch(0, 1000) if r.stream == "alerts"]
    outbox.close()
    assert [a["code"] for a in alerts] == ["telemetry_outbox_full"]


# -- pulse batching -----------------------------------------------------------------------------


async def test_pulses_batch_by_session_and_zone_and_count_handoff_drops(tmp_path: Path) -> None:
    cfg = config("mqtt://127.0.0.1:1", tmp_path, handoff_capacity=100)
    async with Telemetry(cfg) as tm:
        for n in range(1, 4):
            tm.offer_pulse(n, n * 10, 1000 + n, "cheeks", "S1")
        for n in range(4, 6):
            tm.offer_pulse(n, n * 10, 2000, "neck", "S1")
        tm._flush_pulses()
        for n in range(6, 200):  # 94 over capacity
            tm.offer_pulse(n, n * 10, 1500, "neck", "S1")
        tm._flush_pulses()
        stats = tm.stats
    assert stats.pulses_dropped == 94
    assert stats.pulses_offered == 105
    outbox = Outbox(cfg.outbox_path)
    batches = [json.loads(r.payload) for r in outbox.fetch(0, 100) if r.stream == "pulses"]
    outbox.close()
    assert [(b["zone"], b["first_pulse_no"], b["last_pulse_no"], b["count"]) for b in batches] == [
        ("cheeks", 1, 3, 3),
        ("neck", 4, 5, 2),
        ("neck", 6, 105, 100),
    ]
    assert (batches[0]["energy_uj_min"], batches[0]["energy_uj_max"]) == (1001, 1003)
    assert batches[0]["energy_uj_sum"] == 3006
    assert batches[2]["dropped"] == 94
    assert [b["seq"] for b in batches] == [1, 2, 3]


async def test_publishing_while_unreachable_never_raises_and_metrics_are_live_only(
    tmp_path: Path,
) -> None:
    async with Telemetry(config("mqtt://127.0.0.1:1", tmp_path)) as tm:
        tm.publish_metrics(rate_hz=1.0)
        tm.publish_state(state="FAULT", faults=["OVERTEMP_HEAD"])
        assert tm.stats.live_dropped == 1
        assert tm.stats.outbox_depth == 1
        with pytest.raises(ValueError, match="severity"):
            tm.publish_alert("catastrophic", "x", "y")  # type: ignore[arg-type]


# -- contract helpers, config -------------------------------------------------------------------


def test_mark_historical_adds_the_flag_once() -> None:
    payload = _alert(1)
    marked = mark_historical(payload)
    assert json.loads(marked)["historical"] is True
    assert mark_historical(marked) == marked
    assert mark_historical(b"") == b""
    assert "historical" not in json.loads(payload)


def test_mark_historical_is_not_fooled_by_the_word_elsewhere() -> None:
    """Only a top-level ``historical`` key, or the flag's own suffix, counts as marked."""
    in_text = encode_payload(
        AlertPayload(
            v=1, ts=NOW, device="SN42", seq=1, boot=1, severity="info", code="historical",
            message='replay of "historical" data', value=None, limit=None, session=None,
        )
    )  # fmt: skip
    event = encode_payload(
        SessionEventPayload(
            v=1, ts=NOW, device="SN42", seq=1, boot=1, session="S", event="zone",
            details={"historical": False, "mode": "historical"},
        )
    )  # fmt: skip
    for payload in (in_text, event):
        assert b'"historical"' in payload
        marked = mark_historical(payload)
        body = json.loads(marked)
        assert body["historical"] is True
        assert mark_historical(marked) == marked
    assert json.loads(mark_historical(event))["details"] == {
        "historical": False,
        "mode": "historical",
    }
    # already flagged by the model (not at the end): left alone, no duplicate key
    flagged = encode_payload(
        AlertPayload(
            v=1, ts=NOW, device="SN42", seq=1, boot=1, historical=True, severity="info",
            code="c", message="m",
        )
    )  # fmt: skip
    assert not flagged.endswith(b',"historical":true}')
    assert mark_historical(flagged) == flagged
    assert mark_historical(b"{}") == b'{"historical":true}'


@given(text=st.text(max_size=40), key=st.sampled_from(["historical", "x", "historic"]))
def test_mark_historical_always_adds_exactly_one_top_level_flag(text: str, key: str) -> None:
    payload = encode_payload(
        SessionEventPayload(
            v=1, ts=NOW, device="SN42", seq=1, boot=1, session="S", event="params",
            details={key: text, "note": text},
        )
    )  # fmt: skip
    marked = mark_historical(payload)
    assert json.loads(marked) == {**json.loads(payload), "historical": True}
    assert marked.count(b'"historical":true') == 1 + payload.count(b'"historical":true')
    assert mark_historical(marked) == marked


def test_topics() -> None:
    base = TopicBase("lasers", "clinic1", "SN42")
    assert base.topic(Stream.STATE) == "lasers/clinic1/SN42/state"
    assert base.topic(Stream.SESSION_EVENTS, "S-1") == "lasers/clinic1/SN42/sessions/S-1/events"
    assert base.topic(Stream.CMD) == "lasers/clinic1/SN42/cmd/#"
    with pytest.raises(ValueError, match="site"):
        TopicBase("lasers", "a/b", "SN42")
    with pytest.raises(ValueError, match="session id"):
        base.topic(Stream.SESSION_EVENTS, "S+1")
    assert parse_topic("lasers/c/d/sessions/S/events") == (
        "lasers", "c", "d", Stream.SESSION_EVENTS, "S"
    )  # fmt: skip
    assert parse_topic("lasers/c/d/cmd/arm") == ("lasers", "c", "d", Stream.CMD, "arm")
    assert parse_topic("lasers/c/d/unknown") is None
    assert parse_topic("lasers/c") is None


def test_broker_urls() -> None:
    plain = parse_broker_url("mqtt://broker.local")
    assert (plain.host, plain.port, plain.tls) == ("broker.local", 1883, False)
    secure = parse_broker_url("mqtts://dev%40clinic:s3cret@10.0.0.5")
    assert (secure.port, secure.tls, secure.username, secure.password) == (
        8883, True, "dev@clinic", "s3cret"
    )  # fmt: skip
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/topic"):
        with pytest.raises(ConfigError, match=r"mqtt\.url"):
            parse_broker_url(bad)


def test_credentials_come_from_the_environment_when_not_configured(tmp_path: Path) -> None:
    cfg = config("mqtt://h", tmp_path)
    address = cfg.address({"DEVICECTL_MQTT__USERNAME": "u", "DEVICECTL_MQTT__PASSWORD": "p"})
    assert (address.username, address.password) == ("u", "p")
    assert cfg.client_id == "devicectl-SN42"


# -- watch view ---------------------------------------------------------------------------------


def _message(seq: int, **fields: object) -> bytes:
    envelope = {"v": 1, "ts": "2026-11-25T10:00:00Z", "device": "SN42", "seq": seq, "boot": 1}
    return json.dumps(envelope | fields).encode()


def _feed_session(view: FleetView) -> None:
    base = "lasers/clinic1/SN42"
    view.feed(f"{base}/availability", b"online")
    view.feed(
        f"{base}/state",
        _message(1, state="EMITTING", armed=True, session="S-1", interlocks=[], faults=[],
                 params=None, daemon_version="1"),
    )  # fmt: skip
    view.feed(
        f"{base}/pulses",
        _message(1, session="S-1", zone="neck", first_pulse_no=1, last_pulse_no=20, count=20,
                 energy_uj_sum=40000, energy_uj_min=2000, energy_uj_max=2000, pulses=[]),
    )  # fmt: skip
    view.feed(f"{base}/alerts", _message(1, severity="critical", code="over_rate", message="fast"))
    view.feed(f"{base}/metrics", _message(1, rate_hz=20.0, skin_temp_c=33.4, head_temp_c=30.1))


def test_fleet_view_tracks_a_device() -> None:
    view = FleetView()
    _feed_session(view)
    device = view.devices[("clinic1", "SN42")]
    assert (device.availability, device.state, device.armed) == ("online", "EMITTING", True)
    assert (device.session, device.pulses, device.energy_uj_by_zone) == ("S-1", 20, {"neck": 40000})
    assert device.alerts[0] == "CRITICAL over_rate: fast"
    console = Console(record=True, width=200)
    console.print(view.render())
    text = console.export_text()
    assert "clinic1/SN42" in text
    assert "neck 40.0" in text
    assert "20.0 Hz, 33.4 C, 30.1 C" in text
    view.feed("lasers/clinic1/SN42/session", b"")
    assert device.session is None
    assert device.pulses == 0  # no stale count once the session has ended
    assert device.energy_uj_by_zone == {}


def test_fleet_view_resets_the_pulse_count_when_the_session_ends() -> None:
    view = FleetView()
    _feed_session(view)
    ended = _message(1, session="S-1", event="ended")
    lines = view.feed("lasers/clinic1/SN42/sessions/S-1/events", ended)
    assert lines == ["clinic1/SN42 session S-1 ended"]
    device = view.devices[("clinic1", "SN42")]
    assert (device.session, device.pulses) == (None, 0)
    # Late pulses of the ended session are not counted again.
    late = _message(
        2, session="S-1", zone="neck", first_pulse_no=21, last_pulse_no=21, count=1,
        energy_uj_sum=2000, energy_uj_min=2000, energy_uj_max=2000, pulses=[],
    )  # fmt: skip
    view.feed("lasers/clinic1/SN42/pulses", late)
    assert device.pulses == 0


@given(topic=st.text(max_size=60), payload=st.binary(max_size=200))
def test_fleet_view_survives_any_message(topic: str, payload: bytes) -> None:
    view = FleetView()
    view.feed(topic, payload)
    for stream in ("state", "session", "pulses", "alerts", "availability", "metrics"):
        view.feed(f"lasers/s/d/{stream}", payload)
    view.render()


async def test_without_a_broker_everything_waits_in_the_outbox(tmp_path: Path) -> None:
    for url in (None, ""):
        cfg = config(url, tmp_path / str(url))
        async with Telemetry(cfg) as tm:
            tm.publish_alert("warning", "no_broker", "kept for later")
            tm.offer_pulse(1, 0, 1000, "neck", "S")
            assert not tm.connected
        assert tm.stats.outbox_depth == 2
        assert tm.stats.connect_failures == 0


def _fixed(payload: bytes) -> Callable[[int], bytes]:
    return lambda _seq: payload


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["pulses", "state", "alerts", "session-events"]), st.integers(100, 900)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_outbox_bound_never_drops_alerts_or_events_and_keeps_order(
    entries: list[tuple[str, int]],
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "o.sqlite", max_bytes=4096)
        outbox.start_boot()
        for stream, size in entries:
            outbox.enqueue(f"b/{stream}", stream, _fixed(b"x" * size))
        rows = outbox.fetch(0, 1000)
        outbox.close()
    kept = [r.stream for r in rows]
    for stream in ("alerts", "session-events"):
        assert kept.count(stream) == sum(1 for s, _n in entries if s == stream)
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    latest_state = [i for i, (s, _n) in enumerate(entries) if s == "state"]
    if latest_state:
        assert "state" in kept  # the newest state is never superseded by nothing
    over = sum(len(r.payload) for r in rows) > 4096
    assert not over or set(kept) <= {"alerts", "session-events", "state"}


def test_checkpoint_folds_the_wal_into_the_database_file(tmp_path: Path) -> None:
    import shutil
    import sqlite3

    outbox = Outbox(tmp_path / "o.sqlite")
    outbox.start_boot()
    for _ in range(50):
        outbox.enqueue("b/alerts", "alerts", _alert)
    shutil.copy(tmp_path / "o.sqlite", tmp_path / "before.sqlite")  # the main file alone
    outbox.checkpoint()
    shutil.copy(tmp_path / "o.sqlite", tmp_path / "after.sqlite")
    outbox.close()

    def rows(name: str) -> int:
        db = sqlite3.connect(tmp_path / name)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # not even the table reached the main file yet
        finally:
            db.close()

    assert rows("before.sqlite") == 0  # everything was still only in the WAL
    assert rows("after.sqlite") == 50
