"""The host side of the device link (docs/protocol.md): handshake, commands, events, supervision.

:class:`DeviceLink` is an async context manager owning a TaskGroup of named tasks:

``device-link-connection``
    connects through a :class:`~drivers.TransportFactory`, reconnecting forever with jittered
    exponential backoff (0.1 s doubling to a 5 s cap), one log line per failure naming the port
    and the cause. On every connection, and again after every BOOT event, it writes a 0x00, sends
    HELLO (proto 1), checks IDENT's proto (a mismatch is logged and disconnects), then sends
    SET_REPORTING and GET_STATUS, sets :attr:`DeviceLink.connected` and calls ``on_connected``.
``device-link-supervision``
    no STATUS for 3 reporting periods: the link is lost (``on_link_lost(reason)``), reconnect.
``device-link-heartbeat``
    while :meth:`DeviceLink.start_heartbeats` is in force: HEARTBEAT every lease/3.

Commands (:meth:`DeviceLink.request`): one in flight at a time; SEQ +1 (8-bit, wrapping, skipping
nothing) per new command; unanswered after 50 ms it is re-sent with the same SEQ, at most 4 sends in
all, then :class:`~devicectl.errors.LinkLost` and a reconnect. NAK raises
:class:`~devicectl.errors.DeviceRefused`. A reply whose SEQ is not the one in flight is counted
(``stale_replies``) and ignored. Retransmission is driven by loop timers, not by the caller's
coroutine, so that :meth:`DeviceLink.stop_now` can cancel it synchronously.

STOP, refining docs/protocol.md. :meth:`DeviceLink.stop_now` is synchronous: it writes STOP at once,
ahead of anything queued, and re-sends it (same SEQ) until ACKed. A command in flight at that moment
is *abandoned*, never re-sent: the device only remembers the last command it answered, so an ARM
re-sent after the STOP would be executed afresh and re-arm the laser. Its caller gets
:class:`SupersededByStop` — it cannot know whether the device executed it before the STOP, and the
STOP has undone it either way. Commands that were *waiting* to be sent when STOP was called are
abandoned the same way (sent after the STOP, a queued ARM would undo it); commands issued after
``stop_now()`` returns go out normally, after the STOP's ACK. STOP also ends heartbeats.
If the link is lost before the ACK, the STOP is sent again right after IDENT on the next connection,
before anything else. Heartbeats also end when the link is lost or the device reboots: arming again
is the daemon's explicit decision.

Replies are handed to ``on_reply(command TYPE, reply)``, synchronously and in wire order too,
before the caller of :meth:`DeviceLink.request` resumes, so that the daemon's notion of "armed"
flips exactly at the ACK of ARM, STOP or DISARM relative to the PULSE events around it.

Events (PULSE, STATUS, FAULT, INPUT, BOOT) are handed synchronously, in wire order, to
``on_event(seq, message)`` from inside the transport's receive callback, so a handler can call
:meth:`DeviceLink.stop_now` and have STOP written before the next chunk is read. Nothing is logged
or allocated there beyond the decoded frame. A handler that raises is a bug the laser cannot be
supervised through: the link logs it and calls :meth:`DeviceLink.stop_now`. Lost events are counted
from gaps in the 8-bit event SEQ (BOOT restarts it at 0; the first event of a connection sets it).

The PULSE fast path (issue 16): given ``on_pulse(seq, pulse_no, t_us, energy_uj)``, PULSE events go
there as plain ints, decoded without a ``Pulse`` or ``Frame`` object each, in the same place in wire
order (every other event still goes to ``on_event``, every reply to ``on_reply``); and
``on_chunk_end()`` runs once after each received chunk's frames have all been handed over (also
when a handler raised), so a caller can hand a chunk's pulses on in one piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Self

import structlog
from structlog.typing import FilteringBoundLogger

from devicectl.errors import DevicectlError, DeviceRefused, LinkError, LinkLost
from drivers import Transport, TransportError, TransportFactory
from protocols import (
    PROTO_VERSION,
    Ack,
    Boot,
    Command,
    Frame,
    GetStatus,
    Heartbeat,
    Hello,
    HostCodec,
    Ident,
    Message,
    MessageType,
    Nak,
    NakReason,
    RawPulse,
    Reply,
    SetReporting,
    StatusEvent,
    StatusReply,
    Stop,
)
from protocols.errors import RemoteProtocolError

__all__ = [
    "DEFAULT_STATUS_PERIOD_MS",
    "MAX_SENDS",
    "REPLY_TIMEOUT_S",
    "ConnectedHandler",
    "DeviceLink",
    "DeviceRebooted",
    "EventHandler",
    "LinkLostHandler",
    "ProtocolMismatch",
    "PulseHandler",
    "ReplyHandler",
    "SupersededByStop",
    "backoff_delay",
]

EventHandler = Callable[[int, Message], None]
# (event SEQ, pulse_no, t_us, energy_uj): the PULSE fast path, plain ints, in wire order.
PulseHandler = Callable[[int, int, int, int], None]
# (command TYPE, its reply): called synchronously, in wire order, before the caller resumes.
ReplyHandler = Callable[[int, Message], None]
LinkLostHandler = Callable[[str], None]
ConnectedHandler = Callable[[Ident, StatusReply], Awaitable[None]]

REPLY_TIMEOUT_S: Final = 0.050
MAX_SENDS: Final = 4
DEFAULT_STATUS_PERIOD_MS: Final = 100
_EVENT_MIN_TYPE: Final = 0xA0
# Commands answered by a typed reply rather than ACK (NAK is possible for any command).
_TYPED_REPLIES: Final[dict[int, type[Message]]] = {
    MessageType.HELLO: Ident,
    MessageType.GET_STATUS: StatusReply,
}


class SupersededByStop(DevicectlError):
    """A command was abandoned because STOP was sent while it was in flight or queued; it is never
    re-sent. Not a LinkError: the link is fine, and the command must not be retried on its own."""

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__(f"{command} was superseded by STOP and abandoned (not re-sent)")


class DeviceRebooted(LinkError):
    """The device rebooted (BOOT event) while a command was in flight; the command is abandoned."""

    def __init__(self, command: str, reason: int) -> None:
        self.command, self.reason = command, reason
        super().__init__(f"the device rebooted (BOOT reason {reason}) before answering {command}")


class ProtocolMismatch(RemoteProtocolError):
    """IDENT carried a protocol version this host does not speak; the host disconnects."""

    def __init__(self, port: str, device_proto: int) -> None:
        self.port, self.device_proto, self.host_proto = port, device_proto, PROTO_VERSION
        super().__init__(
            f"device on {port} speaks ICD protocol {device_proto}, this host speaks {PROTO_VERSION}"
        )


_RETRYING: Final = "until the device answers or the daemon stops, waiting 0.1 s doubling to 5 s"


def backoff_delay(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before connection attempt ``attempt + 1`` (``attempt`` ≥ 1 failures so far).

    Exponential (``base`` doubling to ``cap``) with "equal jitter": between half and all of it, so
    many devices restarting together do not retry in lockstep, and no wait collapses to zero.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto


def _name(type_: int) -> str:
    try:
        return MessageType(type_).name
    except ValueError:
        return f"TYPE 0x{type_:02x}"


class _Pending:
    """The command in flight: its frame (re-sent byte for byte) and its caller's future."""

    __slots__ = ("frame", "future", "name", "sends", "seq", "timer", "type")

    def __init__(self, seq: int, command: Command, frame: bytes, future: asyncio.Future[Reply]):
        self.seq = seq
        self.type = command.TYPE
        self.name = _name(command.TYPE)
        self.frame = frame
        self.future = future
        self.sends = 0
        self.timer: asyncio.TimerHandle | None = None


class _Disconnect(Exception):
    """Leave the current connection (link lost, proto mismatch); carries the reason."""


class DeviceLink:
    """The host end of one device link. ``async with DeviceLink(...) as link:``.

    ``connect`` opens a transport (``functools.partial(drivers.open_serial, url, baudrate=...)``
    or ``MemoryLink(...).connect``); ``port`` names it in logs and errors.
    """

    def __init__(
        self,
        connect: TransportFactory,
        *,
        port: str,
        on_event: EventHandler | None = None,
        on_reply: ReplyHandler | None = None,
        on_link_lost: LinkLostHandler | None = None,
        on_connected: ConnectedHandler | None = None,
        on_pulse: PulseHandler | None = None,
        on_chunk_end: Callable[[], None] | None = None,
        status_period_ms: int = DEFAULT_STATUS_PERIOD_MS,
        reply_timeout: float = REPLY_TIMEOUT_S,
        max_sends: int = MAX_SENDS,
        backoff: Callable[[int], float] = backoff_delay,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        if status_period_ms != 0 and not 10 <= status_period_ms <= 10_000:
            raise ValueError(f"status_period_ms={status_period_ms} is not 0 or 10..10000")
        self._connect = connect
        self.port = port
        self._on_event: EventHandler = on_event or (lambda _seq, _msg: None)
        self._on_reply_hook: ReplyHandler | None = on_reply
        self._on_link_lost = on_link_lost
        self._on_connected = on_connected
        self._on_pulse = on_pulse
        self._on_chunk_end = on_chunk_end
        self.status_period_ms = status_period_ms
        self._reply_timeout = reply_timeout
        self._max_sends = max_sends
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._log: FilteringBoundLogger = log or structlog.get_logger("devicectl.link")

        self.ident: Ident | None = None
        self.status: StatusReply | None = None  # the GET_STATUS reply of the last handshake
        self.connected = asyncio.Event()

        self._transport: Transport | None = None
        self._codec = HostCodec(raw_pulses=on_pulse is not None)
        self._codec_totals: dict[str, int] = {}
        self._seq = 0
        self._pending: _Pending | None = None
        self._idle = asyncio.Event()  # set while no command is in flight
        self._idle.set()
        self._turn = asyncio.Lock()  # one caller at a time waits for _idle
        self._stop_wanted = False  # STOP requested and not yet ACKed
        self._stop_done: asyncio.Future[None] | None = None
        self._stops = 0  # stop_now() calls so far: commands queued before one are abandoned
        self._next_event_seq = -1  # -1: unknown (new connection)
        self._last_status = 0.0
        self._wake = asyncio.Event()  # the connection task has something to do
        self._lost_reason: str | None = None
        self._boot_reason: int | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False

        self.frames_events = 0
        self.retries = 0
        self.timeouts = 0
        self.lost_events = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.naks = 0
        self.stale_replies = 0
        self.superseded = 0
        self.handler_errors = 0
        self.commands = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._tasks = [
            self._tg.create_task(self._run_connection(), name="device-link-connection"),
            self._tg.create_task(self._supervise(), name="device-link-supervision"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._heartbeat is not None and self.connected.is_set():
            # Leaving while armed: stop emission before letting go of the link.
            with contextlib.suppress(DevicectlError, TimeoutError):
                async with asyncio.timeout(self._reply_timeout * (self._max_sends + 1)):
                    await self.stop()
        self._closing = True
        self.stop_heartbeats()
        for task in self._tasks:
            task.cancel()
        assert self._tg is not None
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            await self._drop_transport()
            closed = LinkError(f"the link to {self.port} was closed")
            self._fail_pending(closed)
            if self._stop_done is not None and not self._stop_done.done():
                self._stop_done.set_exception(closed)
                self._stop_done.exception()

    # ------------------------------------------------------------------ commands

    async def request(self, command: Command) -> Reply:
        """Send ``command`` and return its reply (ACK, IDENT or STATUS).

        Raises LinkError when not connected, LinkLost after 4 unanswered sends, DeviceRefused on
        NAK, SupersededByStop if stop_now() abandoned it, DeviceRebooted if a BOOT came first.
        """
        if type(command) is Stop:
            await self.stop()
            return Ack(MessageType.STOP)
        if not self.connected.is_set():
            raise LinkError(f"the device on {self.port} is not connected")
        return await self._exchange(command)

    def stop_now(self) -> None:
        """Write STOP at once (no await), abandon the command in flight, retransmit until ACKed."""
        self.stop_heartbeats()
        pending = self._pending
        if pending is not None and pending.type == MessageType.STOP:
            return  # a STOP is already going out, and being retransmitted
        self._stop_wanted = True
        self._stops += 1
        if self._stop_done is None or self._stop_done.done():
            self._stop_done = asyncio.get_running_loop().create_future()
        if pending is not None:
            self._abandon(pending, SupersededByStop(pending.name))
            self.superseded += 1
        if self._transport is not None and self._transport.is_open:
            self._start(Stop())
        # Not connected: the STOP goes out first thing after IDENT on the next connection.

    async def stop(self) -> None:
        """:meth:`stop_now`, then wait for the ACK (across reconnections)."""
        self.stop_now()
        if self._stop_done is not None:
            await asyncio.shield(self._stop_done)

    def start_heartbeats(self, lease_ms: int) -> None:
        """Send HEARTBEAT(lease_ms) every lease/3 until stop_heartbeats(), STOP, or a lost link."""
        if not 50 <= lease_ms <= 5000:
            raise ValueError(f"lease_ms={lease_ms} is outside 50..5000")
        self.stop_heartbeats()
        if self._tg is None or self._closing:
            raise LinkError(f"the link to {self.port} is not running")
        self._heartbeat = self._tg.create_task(
            self._heartbeats(lease_ms), name="device-link-heartbeat"
        )

    def stop_heartbeats(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    @property
    def stop_pending(self) -> bool:
        """A STOP was asked for and the device has not acknowledged it yet."""
        return self._stop_wanted

    @property
    def heartbeating(self) -> bool:
        return self._heartbeat is not None

    @property
    def stats(self) -> dict[str, int]:
        """Plain counters: frames and drops by cause (from the codec), retries, timeouts, ..."""
        return self._codec_sum() | {
            "events": self.frames_events,
            "commands": self.commands,
            "retries": self.retries,
            "timeouts": self.timeouts,
            "lost_events": self.lost_events,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "naks": self.naks,
            "stale_replies": self.stale_replies,
            "superseded": self.superseded,
            "handler_errors": self.handler_errors,
        }

    # ------------------------------------------------------------------ command engine

    async def _exchange(self, command: Command, *, handshake: bool = False) -> Reply:
        stops = self._stops
        async with self._turn:
            while self._pending is not None:  # a STOP jumped in
                self._idle.clear()
                await self._idle.wait()
            if self._stops != stops and not handshake:
                # Queued before a STOP that has gone out since: sending it now could undo the STOP.
                self.superseded += 1
                raise SupersededByStop(_name(command.TYPE))
            transport = self._transport
            if (
                transport is None
                or not transport.is_open
                or self._lost_reason is not None
                or not (handshake or self.connected.is_set())
            ):
                raise LinkError(f"the device on {self.port} is not connected")
            pending = self._start(command)
        try:
            reply = await pending.future
        except asyncio.CancelledError:
            if self._pending is pending:
                self._abandon(pending, None)
            raise
        if type(reply) is Nak:
            raise DeviceRefused(pending.name, _reason(reply.reason))
        return reply

    def _start(self, command: Command) -> _Pending:
        self._seq = seq = (self._seq + 1) & 0xFF
        loop = asyncio.get_running_loop()
        pending = _Pending(seq, command, self._codec.send(seq, command), loop.create_future())
        self._pending = pending
        self._idle.clear()
        self.commands += 1
        self._send(pending)
        return pending

    def _send(self, pending: _Pending) -> None:
        pending.sends += 1
        assert self._transport is not None
        self._transport.write(pending.frame)
        pending.timer = asyncio.get_running_loop().call_later(
            self._reply_timeout, self._on_timeout, pending
        )

    def _on_timeout(self, pending: _Pending) -> None:
        if self._pending is not pending:
            return
        if pending.sends < self._max_sends:
            self.retries += 1
            self._send(pending)
            return
        self.timeouts += 1
        reason = f"no reply to {pending.name} after {pending.sends} sends"
        # A STOP keeps _stop_wanted: it goes out again right after IDENT on the next connection.
        self._abandon(pending, LinkLost(f"{reason} (device on {self.port})"))
        self._lose(reason)

    def _finish(self, pending: _Pending) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
        self._pending = None
        self._idle.set()

    def _abandon(self, pending: _Pending, error: Exception | None) -> None:
        """Forget ``pending`` for good (its timer too); its caller, if any, gets ``error``.

        Never cancel a future a task may await for a reply: the CancelledError would end that
        task (the connection task awaits the handshake's STOP)."""
        self._finish(pending)
        if not pending.future.done():
            if error is None:
                pending.future.cancel()  # only for a caller that was itself cancelled
            else:
                pending.future.set_exception(error)
                pending.future.exception()  # retrieved: stop_now's STOP has no caller

    def _fail_pending(self, error: Exception) -> None:
        if self._pending is not None:
            self._abandon(self._pending, error)

    def _on_reply(self, seq: int, reply: Message) -> None:
        pending = self._pending
        kind = type(reply)
        if pending is None or seq != pending.seq:
            self.stale_replies += 1
            return
        if kind is Ack or kind is Nak:
            fits = reply.command == pending.type and (  # type: ignore[attr-defined]
                kind is Nak or pending.type not in _TYPED_REPLIES
            )
        else:
            fits = _TYPED_REPLIES.get(pending.type) is kind
        if not fits:  # the right SEQ but not an answer to this command: a stale wrap-around
            self.stale_replies += 1
            return
        if kind is Nak:
            self.naks += 1
        elif kind is StatusReply:
            self._last_status = self._clock()
        self._finish(pending)
        if pending.type == MessageType.STOP:
            self._stop_wanted = False
            if self._stop_done is not None and not self._stop_done.done():
                self._stop_done.set_result(None)
        if self._on_reply_hook is not None:
            # Before any later frame of this chunk is handled: the daemon's "armed" flips exactly
            # at ARM's ACK and at the ACK of STOP or DISARM (docs/safety-model.md, rule 1).
            try:
                self._on_reply_hook(pending.type, reply)
            except Exception:  # noqa: BLE001 - a handler bug must not leave the laser unsupervised
                self.handler_errors += 1
                self._log.exception("reply_handler_failed", port=self.port, seq=seq)
                self.stop_now()
        if not pending.future.done():
            pending.future.set_result(reply)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ receive path

    def _on_data(self, data: bytes) -> None:
        codec = self._codec
        codec.receive_data(data)
        items = codec.take()
        if not items:
            return
        try:
            self._hand_over(items)
        finally:
            if self._on_chunk_end is not None:
                try:
                    self._on_chunk_end()
                except Exception:  # noqa: BLE001 - a handler bug must not end supervision unseen
                    self.handler_errors += 1
                    self._log.exception("chunk_handler_failed", port=self.port)
                    self.stop_now()

    def _hand_over(self, items: list[Frame[Message] | RawPulse]) -> None:
        on_event = self._on_event
        on_pulse = self._on_pulse
        for item in items:
            if type(item) is tuple:  # a PULSE, plain ints (on_pulse is set)
                seq, pulse_no, t_us, energy_uj = item  # type: ignore[misc]
                self.frames_events += 1
                expected = self._next_event_seq
                if expected >= 0 and seq != expected:
                    self.lost_events += (seq - expected) & 0xFF
                self._next_event_seq = (seq + 1) & 0xFF
                try:
                    on_pulse(seq, pulse_no, t_us, energy_uj)  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - a handler bug must not end supervision unseen
                    self.handler_errors += 1
                    self._log.exception("event_handler_failed", port=self.port, seq=seq)
                    self.stop_now()
                continue
            frame: Frame[Message] = item  # type: ignore[assignment]
            seq = frame.seq
            message = frame.message
            if message.TYPE < _EVENT_MIN_TYPE:
                self._on_reply(seq, message)
                continue
            self.frames_events += 1
            kind = type(message)
            expected = self._next_event_seq
            if kind is Boot:
                self._next_event_seq = 1
            else:
                if expected >= 0 and seq != expected:
                    self.lost_events += (seq - expected) & 0xFF
                self._next_event_seq = (seq + 1) & 0xFF
                if kind is StatusEvent:
                    self._last_status = self._clock()
            try:
                on_event(seq, message)
            except Exception:  # noqa: BLE001 - a handler bug must not end supervision unseen
                self.handler_errors += 1
                self._log.exception("event_handler_failed", port=self.port, seq=seq)
                self.stop_now()
            if kind is Boot:
                self._on_boot(message.reason)  # type: ignore[attr-defined]

    def _on_boot(self, reason: int) -> None:
        self.stop_heartbeats()
        pending = self._pending
        if pending is not None:
            self._fail_pending(DeviceRebooted(pending.name, reason))
        self.connected.clear()
        self._boot_reason = reason
        self._wake.set()

    def _on_transport_lost(self, error: TransportError) -> None:
        self._lose(str(error))

    def _lose(self, reason: str) -> None:
        """The link is gone (from a callback): fail the command in flight, wake the task."""
        if self._lost_reason is not None or self._transport is None:
            return
        self._lost_reason = reason
        self.connected.clear()
        self.stop_heartbeats()
        self._fail_pending(LinkLost(f"link to {self.port} lost: {reason}"))
        self._wake.set()

    # ------------------------------------------------------------------ tasks

    async def _run_connection(self) -> None:
        failures = 0
        while True:
            try:
                transport = await self._connect(
                    on_data=self._on_data, on_lost=self._on_transport_lost
                )
            except (TransportError, OSError) as exc:
                failures += 1
                self.connect_failures += 1
                cause = exc.cause if isinstance(exc, TransportError) else str(exc)
                delay = self._backoff(failures)
                self._log.warning(
                    "device_connect_failed",
                    port=self.port,
                    cause=cause,
                    attempt=failures,
                    retry_in_s=round(delay, 2),
                    retrying=_RETRYING,
                )
                await self._sleep(delay)
                continue
            reason = await self._serve(transport)
            if reason is None:
                failures = 0  # the handshake had succeeded: start the backoff afresh
                continue
            failures += 1
            await self._sleep(self._backoff(failures))

    async def _serve(self, transport: Transport) -> str | None:
        """Run one connection until it ends. Returns None if it had been up, else the failure."""
        self._transport = transport
        self._next_event_seq = -1
        self._lost_reason = None
        self._boot_reason = None
        self._wake.clear()
        was_up = False
        try:
            while True:
                if self._lost_reason is None:
                    self._wake.clear()
                try:
                    await self._handshake(transport)
                except DeviceRebooted:
                    continue  # a BOOT came during the handshake: start it over
                except (_Disconnect, LinkError) as exc:
                    if was_up:
                        self._notify_lost(str(exc))
                        return None
                    self._log.warning("device_handshake_failed", port=self.port, cause=str(exc))
                    return str(exc)
                if self._boot_reason is not None:
                    continue  # a BOOT came between handshake steps: start it over
                was_up = True
                self.connected.set()
                self._log.info(
                    "device_connected",
                    port=self.port,
                    serial=f"{self.ident.serial:08X}" if self.ident else None,  # as the device id
                    proto=PROTO_VERSION,
                )
                if self._on_connected is not None and self.ident and self.status:
                    try:
                        await self._on_connected(self.ident, self.status)
                    except Exception as exc:  # noqa: BLE001 - the daemon's hook must not end the link
                        self._log.exception("on_connected_failed", port=self.port, cause=str(exc))
                await self._wake.wait()
                self._wake.clear()
                if self._lost_reason is not None:
                    self._notify_lost(self._lost_reason)
                    return None
                self._log.warning("device_rebooted", port=self.port, reason=self._boot_reason)
        finally:
            self.connected.clear()
            await self._drop_transport()

    def _notify_lost(self, reason: str) -> None:
        self.reconnects += 1
        self._log.warning("device_link_lost", port=self.port, cause=reason)
        if self._on_link_lost is not None:
            try:
                self._on_link_lost(reason)
            except Exception:  # noqa: BLE001 - the daemon's hook must not end the link
                self._log.exception("on_link_lost_failed", port=self.port)

    async def _handshake(self, transport: Transport) -> None:
        self._boot_reason = None
        transport.write(b"\x00")
        ident = await self._handshake_step(Hello(PROTO_VERSION))
        if not isinstance(ident, Ident):
            raise LinkLost(f"device on {self.port} answered HELLO with {type(ident).__name__}")
        if ident.proto != PROTO_VERSION:
            mismatch = ProtocolMismatch(self.port, ident.proto)
            self._log.error(
                "device_protocol_mismatch",
                port=self.port,
                device_proto=ident.proto,
                host_proto=PROTO_VERSION,
            )
            raise _Disconnect(str(mismatch))
        self.ident = ident
        if self._stop_wanted:
            await self._handshake_step(Stop())
            self._stop_wanted = False
            if self._stop_done is not None and not self._stop_done.done():
                self._stop_done.set_result(None)
        await self._handshake_step(SetReporting(self.status_period_ms))
        status = await self._handshake_step(GetStatus())
        if not isinstance(status, StatusReply):
            raise LinkLost(f"device on {self.port} answered GET_STATUS with {status!r}")
        self.status = status
        self._last_status = self._clock()

    async def _handshake_step(self, command: Command) -> Reply:
        while True:
            try:
                return await self._exchange(command, handshake=True)
            except SupersededByStop:
                continue  # stop_now() went first; handshake commands are safe to send again
            except DeviceRefused as exc:
                raise LinkLost(
                    f"device on {self.port} refused {exc.command} during the handshake"
                ) from exc
            except LinkError:
                if self._lost_reason is not None:
                    raise _Disconnect(self._lost_reason) from None
                raise

    async def _drop_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            self._fail_pending(LinkLost(f"link to {self.port} closed"))
            self._codec_totals = self._codec_sum()
            self._codec = HostCodec(raw_pulses=self._on_pulse is not None)
            transport.close()
            await transport.wait_closed()

    def _codec_sum(self) -> dict[str, int]:
        """Framing counters summed over every connection so far (each has its own codec)."""
        totals = dict(self._codec_totals)
        for name, value in self._codec.counters.as_dict().items():
            totals[name] = totals.get(name, 0) + value
        return totals

    async def _supervise(self) -> None:
        """No STATUS for 3 reporting periods: the link is lost. Judged a quarter period after
        the third period since the last STATUS ends — not on a fixed tick, which took up to a
        fourth period, and not on the dot, where a third STATUS a millisecond late after two
        lost to line noise would end a healthy link."""
        while True:
            await self.connected.wait()
            period = self.status_period_ms / 1000
            if period == 0:
                return
            limit = 3.25 * period
            await self._sleep(max(0.0, self._last_status + limit - self._clock()))
            if self.connected.is_set() and self._clock() - self._last_status >= limit:
                self._lose(f"no STATUS for 3 periods ({3 * self.status_period_ms} ms)")

    async def _heartbeats(self, lease_ms: int) -> None:
        interval = lease_ms / 3000
        due = self._clock() + interval
        while True:
            await self._sleep(max(0.0, due - self._clock()))
            late = self._clock() - due
            if late > interval / 4:
                # said long before the lease could run down to its "nearly out" margin: a busy
                # host, not the device, when this precedes a lease_nearly_out breach
                self._log.warning(
                    "heartbeat_late",
                    port=self.port,
                    late_ms=round(late * 1000, 1),
                    interval_ms=round(interval * 1000, 1),
                    lease_ms=lease_ms,
                )
            due += interval
            try:
                await self.request(Heartbeat(lease_ms))
            except DeviceRefused as exc:
                self._log.warning("heartbeat_refused", port=self.port, reason=exc.reason)
                break
            except SupersededByStop:
                break
            except LinkError as exc:
                self._log.warning("heartbeat_failed", port=self.port, cause=str(exc))
                break
        if self._heartbeat is asyncio.current_task():
            self._heartbeat = None


def _reason(code: int) -> str:
    try:
        return NakReason(code).name
    except ValueError:
        return f"reason {code}"
