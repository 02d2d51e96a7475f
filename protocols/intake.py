"""Reading telemetry as a consumer must: every message hostile, every message on its own. Sans-I/O.

The one place where a consumer of the MQTT contract (docs/mqtt.md) — the dashboard, ``devicectl
watch``, the fleet recorder — turns a received (topic, payload) into something it may use:

    reading = read_message(prefix, topic, payload)   # Reading | None; raises Unreadable
    verdict = order.check(key, reading.envelope)     # StreamOrder: duplicates, gaps, restarts

:func:`read_message` checks, in this order and before anything walks the payload: the topic is
under ``prefix`` and of the contract (else ``None``: not telemetry, ignore it); the site, device
and session ids are :data:`~protocols.mqtt.ID_PATTERN` (else :class:`Unreadable` with
``invalid_id``: never shown as a device); the payload's size (:data:`MAX_PAYLOAD_BYTES`), UTF-8,
nesting depth (:data:`MAX_DEPTH`), finite numbers and bounded integers
(:func:`protocols.bounded.loads_json`); then the published JSON Schema of its topic (the pydantic
model :func:`protocols.mqtt.json_schemas` exports) and that the envelope's ``device`` (and a
session event's ``session``) is the topic's. Anything else is :class:`Unreadable` with a one-line
``reason``: count it against ``(site, device)``, show it, and read the next message.

:class:`StreamOrder` is the sequence rule of docs/mqtt.md ("Sequence numbers, for consumers"): a
message is only ever *not applied* when it is an exact repeat of one already seen, or a late
``historical`` message of an older run on a latest-value stream; a new ``boot``, a ``seq`` that
goes back or jumps beyond :data:`PLAUSIBLE_GAP` is shown as a restart and applied. Alerts and
session events are always applied, marked.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from protocols.bounded import BoundedInputError, clip, loads_json
from protocols.errors import DevicectlError
from protocols.mqtt import STREAMS, Envelope, Stream, is_valid_id

__all__ = [
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "PLAUSIBLE_GAP",
    "Order",
    "Reading",
    "StreamOrder",
    "Unreadable",
    "Verdict",
    "read_message",
]

# The largest valid payload is a pulse batch: 100 ms at the wire's 5,100 pulses/s is ~510 entries
# of ~30 bytes. Four times that leaves room; a megabyte of JSON is never telemetry.
MAX_PAYLOAD_BYTES = 64 * 1024
# The deepest valid payload is a session event whose details hold a small object: 4 levels.
MAX_DEPTH = 8
# A same-boot seq jump larger than this is not a gap (messages lost) but a reset or a forgery.
PLAUSIBLE_GAP = 100_000
_TOPIC_CLIP = 120
_LATEST_VALUE = frozenset({Stream.STATE, Stream.SESSION, Stream.METRICS})


class Unreadable(DevicectlError):
    """A message under the prefix that cannot be used. ``site``/``device`` are None when the ids
    themselves are invalid (``invalid_id``); ``reason`` is one short printable line."""

    def __init__(
        self,
        reason: str,
        *,
        site: str | None = None,
        device: str | None = None,
        stream: Stream | None = None,
        invalid_id: bool = False,
    ) -> None:
        self.reason, self.site, self.device, self.stream = reason, site, device, stream
        self.invalid_id = invalid_id
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Reading:
    """One message that passed every check.

    ``envelope`` is the validated payload model (a :class:`~protocols.mqtt.StatePayload`, ...),
    None for ``availability`` and for the empty ``session`` (no session open); ``body`` is the same
    payload as parsed JSON (an object that matches the schema), ``text`` the availability word.
    """

    site: str
    device: str
    stream: Stream
    session: str | None
    envelope: Envelope | None
    body: dict[str, Any] | None
    text: str | None = None

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"


_KINDS = {
    "availability": Stream.AVAILABILITY,
    "state": Stream.STATE,
    "session": Stream.SESSION,
    "pulses": Stream.PULSES,
    "metrics": Stream.METRICS,
    "alerts": Stream.ALERTS,
}


def _route(prefix: str, topic: str) -> tuple[str, str, Stream, str | None] | None:
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    if len(levels) < 3:
        return None
    site, device, rest = levels[0], levels[1], levels[2:]
    match rest:
        case [kind] if kind in _KINDS:
            return site, device, _KINDS[kind], None
        case ["sessions", session, "events"]:
            return site, device, Stream.SESSION_EVENTS, session
        case ["cmd", *_]:
            return site, device, Stream.CMD, None
    return None


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return clip(f"{where}: {first['msg']}", 160)


def read_message(prefix: str, topic: str, payload: bytes) -> Reading | None:
    """One received message checked against the contract; None if it is not telemetry (another
    prefix, a topic the contract does not name, a ``cmd/*``). Raises :class:`Unreadable`."""
    route = _route(prefix, topic)
    if route is None or route[2] is Stream.CMD:
        return None
    site, device, stream, session = route
    if not (is_valid_id(site) and is_valid_id(device)):
        raise Unreadable(
            f"invalid site/device id in topic {clip(topic, _TOPIC_CLIP)}", invalid_id=True
        )

    def refuse(reason: str) -> Unreadable:
        return Unreadable(reason, site=site, device=device, stream=stream)

    if session is not None and not is_valid_id(session):
        raise Unreadable(f"invalid session id in topic {clip(topic, _TOPIC_CLIP)}", invalid_id=True)
    if stream is Stream.AVAILABILITY:
        word = payload.strip()
        if word not in (b"online", b"offline"):
            raise refuse(f"availability {clip(payload[:80])} is not online/offline")
        return Reading(site, device, stream, None, None, None, word.decode())
    if stream is Stream.SESSION and not payload.strip():
        return Reading(site, device, stream, None, None, None)  # no session open
    try:
        body = loads_json(payload, max_bytes=MAX_PAYLOAD_BYTES, max_depth=MAX_DEPTH)
    except BoundedInputError as exc:
        raise refuse(f"{stream.value}: {exc.reason}") from None
    if not isinstance(body, dict):
        raise refuse(f"{stream.value}: a JSON {type(body).__name__}, not an object")
    model = STREAMS[stream].model
    assert model is not None  # every stream but availability and cmd has one
    try:
        envelope = model.model_validate_json(payload)  # bounded and finite: checked above
    except ValidationError as exc:
        raise refuse(f"{stream.value}: {_first_problem(exc)}") from None
    if envelope.device != device:
        raise refuse(
            f"{stream.value}: device {clip(envelope.device, 80)} in a message on {device}'s topic"
        )
    if session is not None and body.get("session") != session:
        raise refuse(f"{stream.value}: session differs from the topic's")
    return Reading(site, device, stream, session, envelope, body)


# ------------------------------------------------------------------------------------------------
# Sequence numbers


class Order(StrEnum):
    """How a message stands to the ones seen before it on the same topic."""

    FIRST = "first"  # nothing seen on this topic yet
    NEXT = "next"  # seq + 1: the normal case
    GAP = "gap"  # seq jumped by at most PLAUSIBLE_GAP: ``missed`` messages were lost
    DUPLICATE = "duplicate"  # the same (boot, seq, ts) again: an MQTT redelivery
    RESTART = "restart"  # new boot, seq back, or an implausible jump: counters were reset
    LATE = "late"  # historical, from an older boot than the one followed


@dataclass(frozen=True, slots=True)
class Verdict:
    order: Order
    missed: int = 0
    detail: str = ""

    def applies_to(self, stream: Stream) -> bool:
        """Whether a consumer should let this message change what it shows for ``stream``.

        A duplicate never (its content is already applied); a late historical message not on a
        latest-value stream (``state``, ``session``, ``metrics``: it would show the past as now).
        Everything else applies, alerts and events always except exact duplicates.
        """
        if self.order is Order.DUPLICATE:
            return False
        return not (self.order is Order.LATE and stream in _LATEST_VALUE)


@dataclass(slots=True)
class _Mark:
    boot: int
    seq: int
    recent: deque[tuple[int, int, str]] = field(default_factory=lambda: deque(maxlen=32))


class StreamOrder:
    """Follows ``(boot, seq)`` per topic for at most ``max_topics`` topics (least recent forgotten).

    The rule (docs/mqtt.md): an exact repeat of a recently seen ``(boot, seq, ts)`` is a
    DUPLICATE; a historical message of an older boot is LATE; on the followed boot, ``seq + 1`` is
    NEXT and a forward jump up to :data:`PLAUSIBLE_GAP` a GAP; anything else — a newer or an older
    boot that is not historical, a seq that goes back, a larger jump — is a RESTART, and the
    message becomes the one followed. So a forged message can cause one restart mark, never the
    loss of the real messages after it.
    """

    def __init__(self, max_topics: int = 4096) -> None:
        self.max_topics = max_topics
        self._marks: OrderedDict[str, _Mark] = OrderedDict()

    def forget(self, topic: str) -> None:
        self._marks.pop(topic, None)

    def __len__(self) -> int:
        return len(self._marks)

    def check(self, topic: str, envelope: Envelope) -> Verdict:
        boot, seq, ts = envelope.boot, envelope.seq, envelope.ts.isoformat()
        mark = self._marks.get(topic)
        if mark is None:
            mark = self._marks[topic] = _Mark(boot, seq)
            mark.recent.append((boot, seq, ts))
            while len(self._marks) > self.max_topics:
                self._marks.popitem(last=False)
            return Verdict(Order.FIRST)
        self._marks.move_to_end(topic)
        if (boot, seq, ts) in mark.recent:
            return Verdict(Order.DUPLICATE, detail=f"boot {boot} seq {seq} again")
        mark.recent.append((boot, seq, ts))
        if boot < mark.boot and envelope.historical:
            return Verdict(Order.LATE, detail=f"historical, boot {boot} before {mark.boot}")
        verdict: Verdict
        if boot != mark.boot:
            verdict = Verdict(Order.RESTART, detail=f"boot {mark.boot} -> {boot}")
        elif seq == mark.seq + 1:
            verdict = Verdict(Order.NEXT)
        elif mark.seq + 1 < seq <= mark.seq + PLAUSIBLE_GAP:
            verdict = Verdict(Order.GAP, missed=seq - mark.seq - 1)
        else:
            verdict = Verdict(Order.RESTART, detail=f"seq {mark.seq} -> {seq} on boot {boot}")
        mark.boot, mark.seq = boot, seq
        return verdict
