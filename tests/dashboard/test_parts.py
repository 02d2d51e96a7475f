"""The dashboard's small parts: topic and payload reading, browser fan-out, page admission,
backoff, limits."""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from devicectl.dashboard import Backoff, Update, UpdateHub, allowed_hosts_for, load_display_limits
from devicectl.dashboard.contract import (
    MalformedPayload,
    TopicRef,
    parse_topic,
    read_alert,
    read_availability,
    read_json_object,
    read_metrics,
    read_pulse_batch,
    read_session,
    read_status,
)
from devicectl.dashboard.hub import Goodbye, Resync
from devicectl.dashboard.pages import PageSlots, Refused, Slot
from devicectl.dashboard.server import parse_listen
from devicectl.errors import ConfigError


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("lasers/a/d1/state", TopicRef("a", "d1", "state")),
        ("lasers/a/d1/availability", TopicRef("a", "d1", "availability")),
        ("lasers/a/d1/sessions/S9/events", TopicRef("a", "d1", "events", "S9")),
        ("lasers/a/d1/cmd/stop", TopicRef("a", "d1", "cmd")),
        ("lasers/a/d1/sessions//events", None),
        ("lasers/a/d1/state/extra", None),
        ("lasers/a/d1", None),
        ("lasersX/a/d1/state", None),
    ],
)
def test_topics(topic: str, expected: TopicRef | None) -> None:
    assert parse_topic("lasers", topic) == expected


def test_a_multi_level_prefix() -> None:
    assert parse_topic("acme/lasers", "acme/lasers/a/d1/pulses") == TopicRef("a", "d1", "pulses")


def test_availability_words() -> None:
    assert read_availability(b"online") == "online"
    assert read_availability(b'"offline"\n') == "offline"
    with pytest.raises(MalformedPayload, match="neither online nor offline"):
        read_availability(b"1")


def test_json_objects_only() -> None:
    assert read_json_object(b'{"a": 1}') == {"a": 1}
    for payload, cause in ((b"\xff", "not JSON"), (b"[]", "not an object"), (b"", "not JSON")):
        with pytest.raises(MalformedPayload, match=cause):
            read_json_object(payload)


def test_other_spellings_and_units_of_the_same_fields() -> None:
    status = read_status(
        {"device_state": "emitting", "interlocks": {"door": "open", "key": False}, "faults": [3]}
    )
    assert (status.state, status.interlocks_open, status.faults) == (
        "EMITTING",
        ("door",),
        ("OVERTEMP_HEAD",),
    )
    flat = read_session(
        {
            "id": "S2",
            "operator_id": "op",
            "current_zone": {"name": "neck"},
            "pulse_count": 3,
            "zones": [{"zone": "neck", "energy_j": 1.5, "limit_j": 60}],
        }
    )
    assert (flat.session_id, flat.operator, flat.zone, flat.pulses) == ("S2", "op", "neck", 3)
    assert (flat.zones[0].energy_j, flat.zones[0].limit_j) == (1.5, 60.0)
    batch = read_pulse_batch({"first": 5, "last": 7, "energy_sum_mj": 18.0})
    assert batch.count == 3
    assert batch.energy_sum_j == pytest.approx(0.018)
    from_list = read_pulse_batch({"pulses": [[1, 0, 6000], [2, 100, 6000]]})
    assert from_list.count == 2
    assert from_list.energy_sum_j == pytest.approx(0.012)
    metrics = read_metrics({"skin_temp_cdeg": 3421, "temperatures": {"head_c": 30.5}})
    assert metrics.skin_temp_c == pytest.approx(34.21)
    assert metrics.head_temp_c == 30.5
    assert read_metrics({"skin_temp_c": 0.0}).skin_temp_c == 0.0


def test_wrong_types_read_as_unknown_not_as_numbers() -> None:
    status = read_status({"state": True, "armed": "yes", "interlocks": "door", "faults": None})
    assert (status.state, status.armed, status.interlocks_open, status.faults) == (
        None,
        None,
        None,
        (),
    )
    metrics = read_metrics({"skin_temp_c": "hot", "rate_hz": float("nan"), "counters": [1]})
    assert (metrics.skin_temp_c, metrics.rate_hz, metrics.counters) == (None, None, {})
    alert = read_alert({})
    assert (alert.severity, alert.rank, alert.code) == ("warning", 1, None)


def update(n: int) -> Update:
    return Update({"op": "device", "key": "a/d", "fields": {"n": n}})


async def test_a_browser_receives_updates_in_order() -> None:
    hub = UpdateHub(dict, queue_size=10)
    async with hub.subscribe() as browser:
        assert hub.browsers == 1
        hub.publish([update(1), update(2)])
        assert [await browser.next(), await browser.next()] == [update(1), update(2)]
    assert hub.browsers == 0


async def test_a_browser_that_falls_behind_is_resynced_not_buffered() -> None:
    hub = UpdateHub(dict, queue_size=3)
    async with hub.subscribe() as slow, hub.subscribe() as fast:
        for n in range(5):
            hub.publish([update(n)])
            assert await fast.next() == update(n)
        items = []
        while not slow.queue.empty():
            items.append(slow.queue.get_nowait())
        # Its backlog was dropped for one Resync (a fresh snapshot covers update 4 too).
        assert len(items) == 1
        assert isinstance(items[0], Resync)
        hub.publish([update(5)])
        assert await slow.next() == update(5)


async def test_closing_the_hub_ends_every_stream() -> None:
    hub = UpdateHub(dict, queue_size=2)
    async with hub.subscribe() as browser:
        hub.publish([update(1), update(2), update(3)])  # full: resync pending
        hub.close()
        seen = [await browser.next() for _ in range(browser.queue.qsize())]
        assert seen[-1] is None
    async with hub.subscribe() as late:
        assert await asyncio.wait_for(late.next(), 1) is None


async def test_a_stream_told_to_end_gets_nothing_more_than_why() -> None:
    hub = UpdateHub(dict, queue_size=3)
    async with hub.subscribe() as browser:
        hub.publish([update(1), update(2)])
        browser.end("evicted")
        hub.publish([update(3), update(4), update(5), update(6)])  # would overflow: not queued
        assert await browser.next() == Goodbye("evicted")
        assert browser.queue.empty()


def slots(max_pages: int = 3, max_per_address: int = 2) -> PageSlots:
    return PageSlots(max_pages=max_pages, max_per_address=max_per_address, ack_timeout_s=10.0)


def admitted(pages: PageSlots, address: str, now: float) -> Slot:
    slot = pages.admit(address, now)
    assert isinstance(slot, Slot), slot
    return slot


def answer(pages: PageSlots, slot: Slot, now: float) -> None:
    assert pages.ack(pages.ping(slot, now), now + 0.01)


def test_a_new_page_evicts_the_stream_with_the_oldest_sign_of_life_not_proven_to_read() -> None:
    pages = slots()
    ended: list[str] = []
    reads = admitted(pages, "10.0.0.1", 0)
    answer(pages, reads, 0)
    idle_old = admitted(pages, "10.0.0.2", 1)
    idle_old.end = ended.append
    idle_new = admitted(pages, "10.0.0.3", 2)
    idle_new.end = lambda reason: ended.append("wrong one")
    pages.ping(idle_old, 1)
    pages.ping(idle_new, 2)
    assert pages.saturated(3)  # full: the next page will need room
    newcomer = admitted(pages, "10.0.0.4", 3)
    assert len(ended) == 1
    assert "evicted" in ended[0]
    assert (pages.open, pages.evicted) == (3, 1)
    assert idle_old not in pages and idle_new in pages and reads in pages
    assert pages.ack(next(iter(idle_new.tokens)), 3)  # the one still open can answer
    assert not pages.ack(next(iter(idle_old.tokens), "gone"), 3)  # the evicted one cannot
    # Now every open stream has answered, except the newcomer: it is the one to make room.
    newest = admitted(pages, "10.0.0.5", 4)
    assert newcomer not in pages and newest in pages and reads in pages
    assert pages.evicted == 2


def test_when_every_stream_reads_a_new_page_is_refused_and_saturation_is_reported() -> None:
    pages = slots(max_pages=2)
    for n, address in enumerate(("10.0.0.1", "10.0.0.2")):
        answer(pages, admitted(pages, address, n), n)
    refused = pages.admit("10.0.0.3", 5)
    assert isinstance(refused, Refused)
    assert "at most 2" in refused.reason
    status = pages.status(5)
    assert (status["saturated"], status["refused"], status["open"]) == (True, 1, 2)
    assert "pages full" in status["detail"]


def test_one_address_makes_room_among_its_own_streams_only() -> None:
    pages = slots(max_pages=10, max_per_address=2)
    other = admitted(pages, "10.0.0.9", 0)
    first = admitted(pages, "10.0.0.1", 1)
    first.end = lambda reason: None
    admitted(pages, "10.0.0.1", 2)
    admitted(pages, "10.0.0.1", 3)  # evicts `first`, its address's oldest, not `other`
    assert pages.open == 3
    assert first not in pages and other in pages
    assert pages.evicted == 1
    assert not pages.saturated(3)  # one address churning its own slots does not fill the page cap
    status = pages.status(3)
    assert status["detail"] == (
        "3 of 10 pages open; 1 evicted to make room, 0 dropped for not reading"
    )


def test_one_address_refused_beyond_its_own_cap_does_not_make_the_dashboard_unhealthy() -> None:
    # One client opening one page more than its address may hold, once a minute, had /healthz
    # answer 503 "pages full in the last minute" for ever, while every other address's page
    # was admitted: a monitor (or a liveness probe restarting the service) believed it.
    pages = slots(max_pages=10, max_per_address=2)
    for n in range(2):
        answer(pages, admitted(pages, "10.0.0.1", n), n)
    assert isinstance(pages.admit("10.0.0.1", 5), Refused)
    status = pages.status(5)
    assert (status["saturated"], status["refused"], status["open"]) == (False, 1, 2)
    assert "1 refused" in status["detail"]
    assert isinstance(pages.admit("10.0.0.2", 6), Slot)


def test_a_crowd_of_readers_cannot_take_a_new_page_back_before_it_can_answer() -> None:
    # Five addresses hold every slot with streams that read. A page from a sixth takes the place
    # of one of them (the fair share); that address reconnects at once, on its "bye", and its new
    # stream evicted the page, which had been sent its snapshot and ping but whose answer was
    # still on its way: the crowd kept every new page out by reconnecting faster than a page
    # answers.
    pages = slots(max_pages=10, max_per_address=5)
    for n in range(10):
        slot = admitted(pages, f"10.0.0.{n // 5}", 0)
        slot.end = lambda reason: None
        answer(pages, slot, 0)
    ended: list[str] = []
    page = admitted(pages, "10.0.9.9", 1.0)
    page.end = ended.append
    pages.ping(page, 1.0)
    assert isinstance(pages.admit("10.0.0.0", 1.005), Refused)
    assert page in pages and ended == []
    assert pages.ack(next(iter(page.tokens)), 1.02)


def test_a_stream_that_never_answers_is_made_room_of_by_any_page_once_its_chance_has_passed() -> (
    None
):
    pages = slots(max_pages=3, max_per_address=5)  # ack_timeout_s=10
    idle = admitted(pages, "10.0.0.1", 0)
    idle.end = lambda reason: None
    pages.ping(idle, 0)
    for _ in range(2):
        answer(pages, admitted(pages, "10.0.0.2", 0), 0)
    # Within its chance, a page from an address holding more cannot take its place ...
    assert isinstance(pages.admit("10.0.0.2", 5), Refused)
    # ... a page from an address holding no more can (a burst of sockets that never read) ...
    assert isinstance(pages.admit("10.0.0.3", 6), Slot)
    assert idle not in pages
    # ... and once its chance has passed, any page can.
    late = admitted(pages, "10.0.0.4", 7)
    late.end = lambda reason: None
    pages.ping(late, 7)
    assert isinstance(pages.admit("10.0.0.2", 18), Slot)
    assert late not in pages


def test_when_every_stream_reads_the_page_cap_is_shared_fairly_between_addresses() -> None:
    pages = slots(max_pages=4, max_per_address=4)
    crowd = [admitted(pages, "10.0.0.1", n) for n in range(3)]
    tablet = admitted(pages, "10.0.0.2", 3)
    for n, slot in enumerate([*crowd, tablet]):
        answer(pages, slot, 10 + n)
    # An address with no page takes the place of the crowded address's least recently active one.
    newcomer = admitted(pages, "10.0.0.3", 20)
    assert crowd[0] not in pages and newcomer in pages and tablet in pages
    answer(pages, newcomer, 20)
    # The crowded address, one page fewer, cannot take it back (it would swap for ever) ...
    assert isinstance(pages.admit("10.0.0.1", 21), Refused)
    # ... nor can the tablet take a page from an address holding only one more than it.
    assert isinstance(pages.admit("10.0.0.2", 22), Refused)
    assert (pages.open, pages.evicted, pages.refused) == (4, 1, 2)


def test_a_ping_left_unanswered_too_long_is_overdue_however_many_pings_follow() -> None:
    pages = PageSlots(max_pages=5, max_per_address=5, ack_timeout_s=2.0)
    slot = admitted(pages, "10.0.0.1", 0)
    for second in range(5):
        pages.ping(slot, second)
        assert pages.overdue(slot, second) == (second > 2)
    answer(pages, slot, 5)  # answering the last ping clears every earlier one
    assert not pages.overdue(slot, 5.5)
    assert not pages.ack("a token never sent", 6)
    pages.drop(slot)
    assert (pages.open, pages.dropped) == (0, 1)


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    backoff = Backoff(base_s=0.25, cap_s=30.0)
    assert backoff.delay(0, rng=lambda: 0.0) == 0.125
    assert backoff.delay(0, rng=lambda: 1.0) == 0.25
    assert backoff.delay(3, rng=lambda: 1.0) == 2.0
    assert backoff.delay(100, rng=lambda: 1.0) == 30.0
    assert backoff.delay(100, rng=lambda: 0.0) == 15.0


def _packaged_policy() -> str:
    return (resources.files("devicectl") / "defaults" / "policy.toml").read_text(encoding="utf-8")


def test_limits_from_a_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    text = _packaged_policy().replace("session_energy_j = 300.0", "session_energy_j = 250.0")
    policy.write_text(
        text.replace("forehead = { energy_j = 60.0 }", "forehead = { energy_j = 55 }")
    )
    limits = load_display_limits(policy)
    assert (limits.session_energy_j, limits.zone_energy_j["forehead"]) == (250.0, 55.0)
    assert limits.zone_energy_j["neck"] == 60.0
    assert load_display_limits().skin_temp_max_c == 41.0


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        # The dashboard uses the daemon's loader: what `devicectl run` refuses, it refuses.
        (("skin_temp_max_c = 41.0", "skin_temp_max_c = inf"), "policy.skin_temp_max_c"),
        (("skin_temp_max_c = 41.0", "skin_temp_max_c = nan"), "policy.skin_temp_max_c"),
        (("VI = 12.0", "VI = 50.0"), "policy.max_fluence_j_cm2.VI"),
        (("hands = { energy_j = 50.0 }", "hands = { energy_j = 50.0 }\nknees = { energy_j = 1 }"),
         "policy.zones.knees"),
        (("[zones]", "zones = ["), "valid TOML"),
    ],
)  # fmt: skip
def test_a_policy_the_daemon_refuses_is_refused_by_the_dashboard(
    tmp_path: Path, change: tuple[str, str], cause: str
) -> None:
    policy = tmp_path / "policy.toml"
    text = _packaged_policy()
    assert change[0] in text
    policy.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError, match=re.escape(cause)):
        load_display_limits(policy)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:99999", "host:http"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(text)


def test_updates_are_json() -> None:
    assert json.loads(json.dumps(update(1).data)) == update(1).data


def test_allowed_hosts_follow_the_bound_address() -> None:
    assert allowed_hosts_for(("127.0.0.1", 8080)) >= {"127.0.0.1:8080", "localhost:8080", "[::1]"}
    assert "127.0.0.1:8080" in allowed_hosts_for(("localhost", 8080))
    assert "[::1]:8080" in allowed_hosts_for(("::1", 8080))
    lan = allowed_hosts_for(("192.168.1.20", 8080), ["dash.clinic.lan", "proxy.example:443"])
    assert lan >= {"192.168.1.20:8080", "dash.clinic.lan", "dash.clinic.lan:8080"}
    assert "proxy.example:443" in lan
    assert "localhost:8080" not in lan
    assert "dash.clinic.lan:9999" not in lan
