"""The simulated laser controller board: the device end of ICD v1 (docs/protocol.md), sans-I/O.

Bytes from the host go in with :meth:`Board.receive_data`, time passes with :meth:`Board.advance`,
and the bytes the board writes come out of :meth:`Board.data_to_send`. Nothing here reads a clock,
sleeps or touches a socket: every call carries the time (µs, monotonic), so a test can drive hours
of treatment in milliseconds and a server can drive it in real time (see ``simulator.runner``).

What happens, in time order, inside :meth:`Board.advance` (each at its own scheduled instant)::

    pulse due ──► PULSE event (pulse_no, t_us = scheduled time, measured energy)
    lease runs out in READY/EMITTING ──► FAULT LEASE_EXPIRED
    head reaches 45.00 °C ──► FAULT OVERTEMP_HEAD
    status period ──► STATUS event
    a slow reply comes due ──► its bytes

Ordering guarantees: a command is handled only after the board has advanced to the moment it
arrived, so every PULSE fired before it precedes its reply; STOP and DISARM end the pulse train
before their ACK is written, so no PULSE follows that ACK -- except with the ``stuck-shutter``
injection, described below.

Pulse timing: the first pulse fires at the press (or one period after the previous pulse, after a
quick re-press), then one per period, each stamped with its scheduled time, so a caller that
advances late gets a burst with exact ``t_us``. A pulse more than 50 ms overdue is not made up: the
schedule shifts to the moment of the call (a real board would have been late), so pulses are never
closer than the period.

Fault injection (the names of docs/cli.md), all inside the board so that servers only move
bytes:

``energy-drift F``
    measured energy × F. The board's own ±50 % monitor raises ENERGY_MONITOR beyond that.
``stuck-shutter``
    STOP and DISARM are acknowledged and change the state as usual, but the pulse train does not
    stop: it goes on at the same period and energy (PULSE events after the ACK, pulse_no counting
    on), and the first such pulse raises FAULT SHUTTER_STUCK (detail 0). The runaway train then
    goes on whatever the state -- faults, footswitch and commands cannot stop it -- until the
    injection is removed (:meth:`Board.clear_faults`), the board reboots, or ``hang`` lets the
    hardware watchdog cut the laser. SHUTTER_STUCK persists (CLEAR_FAULT refused) while the
    injection is on. Faults and footswitch release before a STOP/DISARM stop emission normally.
``overheat``
    the head's thermal target rises 30 °C above ambient: it heats toward and past the 45.00 °C
    cut-off (OVERTEMP_HEAD, any state), and cools once the injection is removed.
``line-noise BER``
    every bit written or received is flipped with probability BER.
``drop-frames P``
    every frame, in either direction, is lost with probability P.
``slow-replies MS``
    replies (not events) leave MS ms after the command arrived.
``hang``
    the firmware stops: no frame in either direction, no timers, and the hardware watchdog cuts
    emission. Physical inputs are still recorded. :meth:`Board.clear_faults` then reboots the board
    with BOOT reason WATCHDOG; :meth:`Board.reboot` also ends the hang.

:meth:`Board.clear_faults` removes injected causes only: a latched FAULT still needs CLEAR_FAULT.
:meth:`Board.reboot` loses the state (params, lease, reply memory, latched faults, reporting period,
unsent bytes, event SEQ) but keeps the lifetime pulse counter, the physical inputs, the temperatures
and the injected faults other than ``hang``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Final

from protocols import (
    INTERLOCK_NAMES,
    LEASE_MAX_MS,
    LEASE_MIN_MS,
    PROTO_VERSION,
    Ack,
    Arm,
    BadCommand,
    Boot,
    BootReason,
    Command,
    DeviceCodec,
    DevicectlError,
    DeviceState,
    FaultCode,
    FaultEvent,
    Frame,
    Heartbeat,
    Ident,
    InputEvent,
    MessageType,
    Nak,
    NakReason,
    Pulse,
    Reply,
    SetParams,
    SetReporting,
    StatusEvent,
    StatusReply,
    encode_frame,
)
from simulator.physics import HEAD_CLEAR_C, HEAD_CUTOFF_C, ThermalModel, ThermalState

__all__ = [
    "BACKLOG_LIMIT_US",
    "DEFAULT_STATUS_PERIOD_MS",
    "ENERGY_SIGMA",
    "FAULT_NAMES",
    "SPOTS_UM",
    "Board",
    "BoardInputError",
    "LinkCounters",
    "period_us",
]

SPOTS_UM: Final = (120, 300, 1000, 3000)
FW_VERSION: Final = (1, 0, 0)
WAVELENGTH_NM: Final = 1550
MAX_ENERGY_UJ: Final = 60_000
MIN_WIDTH_US: Final = 100
MAX_WIDTH_US: Final = 20_000
DEFAULT_STATUS_PERIOD_MS: Final = 100
ENERGY_SIGMA: Final = 0.02  # measured energy noise, relative
ENERGY_CLIP: Final = 0.06
ENERGY_MONITOR: Final = 0.5  # the board's own monitor: ±50 % of the setpoint
BACKLOG_LIMIT_US: Final = 50_000  # a pulse later than this is not made up
TIME_MASK: Final = 0xFFFF_FFFF  # t_us wraps at 2**32
U32_MAX: Final = 0xFFFF_FFFF

# Injectable faults: name -> whether it takes a value.
FAULT_NAMES: Final[dict[str, bool]] = {
    "energy-drift": True,
    "stuck-shutter": False,
    "overheat": False,
    "line-noise": True,
    "drop-frames": True,
    "slow-replies": True,
    "hang": False,
}


class BoardInputError(DevicectlError, ValueError):
    """A control action named something the board does not have, or a value out of range."""


def period_us(rate_mhz: int) -> int:
    """The pulse period in µs for ``rate_mhz`` millihertz, rounded up (never closer than it)."""
    return -(-1_000_000_000 // rate_mhz)


class LinkCounters:
    """What crossed the board's end of the link, by direction and cause. Plain integers."""

    __slots__ = (
        "bits_flipped_in",
        "bits_flipped_out",
        "dropped_in",
        "dropped_out",
        "frames_in",
        "frames_out",
        "lost_in_hang",
        "naks",
        "replays",
    )

    def __init__(self) -> None:
        self.frames_in = 0  # command frames decoded (good CRC), before drop-frames
        self.frames_out = 0  # frames written, after drop-frames
        self.dropped_in = 0  # by drop-frames
        self.dropped_out = 0  # by drop-frames
        self.bits_flipped_in = 0  # by line-noise
        self.bits_flipped_out = 0
        self.naks = 0
        self.replays = 0  # remembered replies re-sent
        self.lost_in_hang = 0  # bytes received while hung

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Board:
    """The controller board. See the module docstring for behaviour and fault injection."""

    def __init__(
        self,
        *,
        serial: int = 0x5100_0001,
        rng: random.Random | None = None,
        now_us: int = 0,
        pulse_count: int = 0,
        max_rate_mhz: int = 500_000,
        boot_reason: BootReason = BootReason.POWER_ON,
        thermal: ThermalModel | None = None,
    ) -> None:
        if not 0 <= serial <= U32_MAX:
            raise BoardInputError(f"serial {serial} is outside 0..{U32_MAX}")
        if not 1 <= max_rate_mhz <= U32_MAX:
            raise BoardInputError(f"max_rate_mhz {max_rate_mhz} is outside 1..{U32_MAX}")
        if not 0 <= pulse_count <= U32_MAX:
            raise BoardInputError(f"pulse_count {pulse_count} is outside 0..{U32_MAX}")
        self._ident = Ident(
            PROTO_VERSION,
            FW_VERSION,
            serial,
            WAVELENGTH_NM,
            MAX_ENERGY_UJ,
            MIN_WIDTH_US,
            MAX_WIDTH_US,
            max_rate_mhz,
            SPOTS_UM,
        )
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 -- simulated noise, not secrets
        self._now = now_us
        self._pulse_count = pulse_count
        self._thermal = ThermalState(thermal, t_us=now_us)
        self._last_pulse_us = -(1 << 40)  # when the last pulse fired: pulses keep their spacing
        self.link = LinkCounters()
        # Physical inputs: survive reboots.
        self._interlocks = 0
        self._footswitch = False
        # Injected faults: survive reboots (except hang).
        self._drift = 1.0
        self._stuck_shutter = False
        self._overheat = False
        self._ber = 0.0
        self._drop_p = 0.0
        self._slow_us = 0
        self._hung = False
        self._deferred: list[Callable[[], None]] = []  # state changes that follow a reply
        self._boot(boot_reason)

    # ------------------------------------------------------------------ public API

    @property
    def ident(self) -> Ident:
        return self._ident

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def pulse_count(self) -> int:
        return self._pulse_count

    @property
    def hung(self) -> bool:
        return self._hung

    def receive_data(self, data: bytes, now_us: int) -> None:
        """Bytes from the host, arriving at ``now_us``; every command in them is answered."""
        self.advance(now_us)
        if self._hung:
            self.link.lost_in_hang += len(data)
            return
        if self._ber > 0.0:
            data, flipped = self._flip_bits(data)
            self.link.bits_flipped_in += flipped
        codec = self._codec
        codec.receive_data(data)
        for item in codec.events():
            self.link.frames_in += 1
            if self._drop_p > 0.0 and self._rng.random() < self._drop_p:
                self.link.dropped_in += 1
                continue
            self._on_command(item)

    def advance(self, now_us: int) -> None:
        """Let time pass until ``now_us``: fire due pulses, STATUS, lease expiry, heat."""
        if now_us <= self._now:
            return
        if self._hung:
            self._clock_to(now_us)
            return
        while True:
            due, action = self._next_action()
            if due > now_us:
                break
            if action == _ACT_PULSE and now_us - due > BACKLOG_LIMIT_US:
                self._next_pulse = now_us  # late: shift the schedule, do not make up
                continue
            if action == _ACT_STATUS and now_us - due > BACKLOG_LIMIT_US:
                self._next_status = now_us
                continue
            self._clock_to(due)
            if action == _ACT_PULSE:
                self._fire_pulse()
            elif action == _ACT_LEASE:
                self._raise_fault(FaultCode.LEASE_EXPIRED, 0)
            elif action == _ACT_HEAD:
                self._check_head()
            elif action == _ACT_STATUS:
                self._next_status += self._status_period_ms * 1000
                self._send_status_event()
            else:  # _ACT_REPLY
                self._release_delayed(due)
        self._clock_to(now_us)
        self._release_delayed(now_us)

    def data_to_send(self, now_us: int) -> bytes:
        """The bytes the board has written by ``now_us`` (each byte returned once)."""
        self.advance(now_us)
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        if self._ber > 0.0:
            data, flipped = self._flip_bits(data)
            self.link.bits_flipped_out += flipped
        return data

    def next_deadline_us(self) -> int | None:
        """When :meth:`advance` or :meth:`data_to_send` next has work; None if only an input can
        cause any. Bytes already waiting make it now."""
        if self._out:
            return self._now
        if self._hung:
            return None
        due, _ = self._next_action()
        return None if due == _NEVER else due

    def footswitch(self, down: bool, now_us: int) -> None:
        """The footswitch is pressed (``down``) or released at ``now_us``."""
        self.advance(now_us)
        if down == self._footswitch:
            return
        self._footswitch = down
        if self._hung:
            return
        self._send_event(InputEvent(int(down), self._interlocks))
        if down and self._state is DeviceState.READY:
            # Only a press seen in READY counts: one held while arming or clearing never does.
            self._set_state(DeviceState.EMITTING)
            if not self._pulsing:
                self._start_pulse_train()
        elif not down and self._state is DeviceState.EMITTING:
            self._stop_pulse_train(commanded=False)
            self._set_state(DeviceState.READY)

    def interlock(self, name: str, open_: bool, now_us: int) -> None:
        """Interlock ``name`` (estop door key contact cooling) opens or closes at ``now_us``."""
        bit = INTERLOCK_NAMES.get(name)
        if bit is None:
            raise BoardInputError(
                f"unknown interlock {name!r}: expected one of {', '.join(INTERLOCK_NAMES)}"
            )
        self.advance(now_us)
        bits = (self._interlocks | bit) if open_ else (self._interlocks & ~bit)
        if bits == self._interlocks:
            return
        self._interlocks = int(bits)
        if self._hung:
            return
        self._send_event(InputEvent(int(self._footswitch), self._interlocks))
        if open_ and self._state in _ARMED:
            self._raise_fault(FaultCode.INTERLOCK_OPENED, self._interlocks)

    def inject(self, fault: str, value: float | None, now_us: int) -> None:
        """Turn on an injected fault (docs/cli.md names); see the module docstring."""
        takes_value = FAULT_NAMES.get(fault)
        if takes_value is None:
            raise BoardInputError(
                f"unknown fault {fault!r}: expected one of {', '.join(FAULT_NAMES)}"
            )
        if takes_value and value is None:
            raise BoardInputError(f"fault {fault} needs a value")
        if not takes_value and value is not None:
            raise BoardInputError(f"fault {fault} takes no value (got {value})")
        if value is not None and not math.isfinite(value):
            raise BoardInputError(f"fault {fault}: value {value} is not a finite number")
        self.advance(now_us)
        if fault == "energy-drift":
            assert value is not None
            if value <= 0:
                raise BoardInputError(f"energy-drift factor {value} must be above 0")
            self._drift = value
        elif fault in ("line-noise", "drop-frames"):
            assert value is not None
            if not 0.0 <= value <= 1.0:
                raise BoardInputError(f"{fault} probability {value} is outside 0..1")
            if fault == "line-noise":
                self._ber = value
            else:
                self._drop_p = value
        elif fault == "slow-replies":
            assert value is not None
            if not 0 <= value <= 60_000:
                raise BoardInputError(f"slow-replies {value} ms is outside 0..60000")
            self._slow_us = round(value * 1000)
        elif fault == "stuck-shutter":
            self._stuck_shutter = True
        elif fault == "overheat":
            self._overheat = True
        else:  # hang
            self._hung = True
            self._pulsing = False  # the hardware watchdog cuts the laser
            self._runaway = False
            self._out.clear()
            self._delayed.clear()

    def clear_faults(self, now_us: int) -> None:
        """Remove every injected cause. A hung board reboots (BOOT reason WATCHDOG); a latched
        FAULT stays until the host sends CLEAR_FAULT."""
        self.advance(now_us)
        was_hung = self._hung
        self._drift = 1.0
        self._stuck_shutter = False
        self._overheat = False
        self._ber = 0.0
        self._drop_p = 0.0
        self._slow_us = 0
        self._hung = False
        if self._runaway:
            # The shutter closes at last.
            self._runaway = False
            self._pulsing = False
        if was_hung:
            self._boot(BootReason.WATCHDOG)

    def reboot(self, now_us: int, reason: BootReason = BootReason.POWER_ON) -> None:
        """Restart the board: BOOT event with ``reason``, state lost, pulse counter kept."""
        self.advance(now_us)
        self._hung = False
        self._boot(BootReason(reason))

    def status(self, now_us: int) -> dict[str, object]:
        """A JSON-able snapshot for the simulator's control socket."""
        self.advance(now_us)
        params = self._params
        injected: dict[str, float | None] = {}
        if self._drift != 1.0:
            injected["energy-drift"] = self._drift
        if self._stuck_shutter:
            injected["stuck-shutter"] = None
        if self._overheat:
            injected["overheat"] = None
        if self._ber:
            injected["line-noise"] = self._ber
        if self._drop_p:
            injected["drop-frames"] = self._drop_p
        if self._slow_us:
            injected["slow-replies"] = self._slow_us / 1000
        if self._hung:
            injected["hang"] = None
        return {
            "state": self._state.name,
            "serial": self._ident.serial,
            "interlocks": [name for name, bit in INTERLOCK_NAMES.items() if self._interlocks & bit],
            "footswitch": self._footswitch,
            "params": None
            if params is None
            else {
                "energy_uj": params.energy_uj,
                "width_us": params.width_us,
                "rate_mhz": params.rate_mhz,
                "spot_um": params.spot_um,
            },
            "lease_left_ms": self._lease_left_ms(),
            "status_period_ms": self._status_period_ms,
            "head_temp_c": round(self._thermal.head_c, 2),
            "skin_temp_c": round(self._thermal.skin_c, 2),
            "pulse_count": self._pulse_count,
            # The board's own clock, and when (by it) the last pulse fired: what a test needs to
            # bound emission after the host vanished without reading a wall clock.
            "clock_us": self._now,
            "last_pulse_us": self._last_pulse_us if self._pulse_count else None,
            "emitting": self._pulsing,
            "faults": [code.name for code in FaultCode if self._faults & code.bit],
            "injected": injected,
            "link": self.link.as_dict() | {"codec": self._codec.counters.as_dict()},
        }

    # ------------------------------------------------------------------ boot and time

    def _boot(self, reason: BootReason) -> None:
        self._state = DeviceState.BOOT
        self._codec = DeviceCodec()
        self._params: SetParams | None = None
        self._lease_deadline = _NEVER
        self._memory: tuple[int, int, bytes] | None = None  # (seq, type, reply bytes)
        self._faults = 0
        self._status_period_ms = DEFAULT_STATUS_PERIOD_MS
        self._next_status = self._now + DEFAULT_STATUS_PERIOD_MS * 1000
        self._event_seq = 0
        self._out = bytearray()
        self._delayed: list[tuple[int, int, bytes]] = []  # heap of (due, order, frame)
        self._order = 0
        self._deferred.clear()
        # The pulse train: running while EMITTING, or after STOP/DISARM with a stuck shutter.
        self._pulsing = False
        self._runaway = False
        self._next_pulse = _NEVER
        self._train_period_us = 0
        self._train_energy_uj = 0
        self._train_spot_um = SPOTS_UM[0]
        self._send_event(Boot(reason))
        self._set_state(DeviceState.STANDBY)
        if self._thermal.head_c >= HEAD_CUTOFF_C:
            # A reboot does not cool the head: the cut-off trips again at once.
            self._raise_fault(FaultCode.OVERTEMP_HEAD, self._head_cdeg())

    def _clock_to(self, t_us: int) -> None:
        self._now = max(self._now, t_us)
        self._thermal.advance_to(
            self._now, overheat=self._overheat, contact=not self._interlocks & _CONTACT
        )

    def _next_action(self) -> tuple[int, int]:
        """The earliest scheduled piece of work (an ``_ACT_*`` code) and its time (``_NEVER`` if
        none). At equal times the lease and the head cut-off come before a pulse: a pulse never
        fires at the instant its lease ran out."""
        due, action = _NEVER, _ACT_NONE
        if self._pulsing:
            due, action = self._next_pulse, _ACT_PULSE
        if self._state in _ARMED and self._lease_deadline <= due:
            due, action = self._lease_deadline, _ACT_LEASE
        if not self._faults & _OVERTEMP_BIT and (
            self._overheat or self._thermal.head_c >= HEAD_CUTOFF_C
        ):
            crossing = self._thermal.head_reaches_us(HEAD_CUTOFF_C, overheat=self._overheat)
            if crossing is not None and crossing <= due:
                due, action = crossing, _ACT_HEAD
        if self._status_period_ms and self._next_status < due:
            due, action = self._next_status, _ACT_STATUS
        if self._delayed and self._delayed[0][0] < due:
            due, action = self._delayed[0][0], _ACT_REPLY
        return due, action

    # ------------------------------------------------------------------ scheduled work

    def _fire_pulse(self) -> None:
        t = self._last_pulse_us = self._next_pulse
        self._next_pulse = t + self._train_period_us
        setpoint = self._train_energy_uj
        eps = self._rng.gauss(0.0, ENERGY_SIGMA)
        eps = max(-ENERGY_CLIP, min(ENERGY_CLIP, eps))
        measured = min(U32_MAX, max(0, round(setpoint * (1.0 + eps) * self._drift)))
        self._pulse_count = count = (self._pulse_count + 1) & U32_MAX
        # Packed directly (not through a Pulse instance): this is the per-pulse path.
        self._send_event_payload(_PULSE_TYPE, _PULSE_PACK(count, t & TIME_MASK, measured))
        contact = not self._interlocks & _CONTACT
        self._thermal.pulse(measured, self._train_spot_um, contact=contact)
        if self._runaway and not self._faults & _SHUTTER_BIT:
            self._raise_fault(FaultCode.SHUTTER_STUCK, 0)
        if abs(measured - setpoint) > ENERGY_MONITOR * setpoint and not (
            self._faults & _ENERGY_BIT
        ):
            self._raise_fault(FaultCode.ENERGY_MONITOR, min(measured, 0x7FFF_FFFF))
        if self._thermal.head_c >= HEAD_CUTOFF_C and not self._faults & _OVERTEMP_BIT:
            self._raise_fault(FaultCode.OVERTEMP_HEAD, self._head_cdeg())

    def _check_head(self) -> None:
        if self._thermal.head_c >= HEAD_CUTOFF_C - 1e-9 and not self._faults & _OVERTEMP_BIT:
            self._raise_fault(FaultCode.OVERTEMP_HEAD, max(self._head_cdeg(), 4500))

    # ------------------------------------------------------------------ state changes

    def _set_state(self, state: DeviceState) -> None:
        if state is self._state:
            return
        self._state = state
        if state not in _ARMED:
            self._lease_deadline = _NEVER
        self._send_status_event()

    def _raise_fault(self, code: FaultCode, detail: int) -> None:
        self._faults |= code.bit
        self._send_event(FaultEvent(code, detail))
        if self._pulsing and not self._runaway:
            self._stop_pulse_train(commanded=False)
        if self._state is DeviceState.FAULT:
            self._send_status_event()  # the latched faults changed
        else:
            self._set_state(DeviceState.FAULT)

    def _start_pulse_train(self) -> None:
        params = self._params
        assert params is not None  # READY implies params
        self._pulsing = True
        self._train_period_us = period_us(params.rate_mhz)
        self._train_energy_uj = params.energy_uj
        self._train_spot_um = params.spot_um
        # The first pulse fires at the press, unless the last one was less than a period ago.
        self._next_pulse = max(self._now, self._last_pulse_us + self._train_period_us)
        if self._next_pulse == self._now:
            self._fire_pulse()

    def _stop_pulse_train(self, *, commanded: bool) -> None:
        """End emission; with a stuck shutter a STOP/DISARM leaves it running away."""
        if not self._pulsing or self._runaway:
            return
        if commanded and self._stuck_shutter:
            self._runaway = True
            return
        self._pulsing = False
        self._next_pulse = _NEVER

    # ------------------------------------------------------------------ commands

    def _on_command(self, item: Frame[Command] | BadCommand) -> None:
        if isinstance(item, BadCommand):
            seq, type_ = item.seq, item.type
        else:
            seq, type_ = item.seq, item.message.TYPE
        memory = self._memory
        if type_ == MessageType.HELLO:
            self._memory = None
        elif memory is not None and memory[0] == seq and memory[1] == type_:
            self.link.replays += 1
            self._send_reply_bytes(memory[2])
            return
        if isinstance(item, BadCommand):
            reply: Reply = Nak(type_, item.reason)
        else:
            reply = _HANDLERS[type_](self, item.message)
        frame = self._codec.send(seq, reply)
        if isinstance(reply, Nak):
            self.link.naks += 1
        if type_ != MessageType.HELLO:
            self._memory = (seq, type_, frame)
        self._send_reply_bytes(frame)

    def _hello(self, _msg: Command) -> Reply:
        return self._ident

    def _get_status(self, _msg: Command) -> Reply:
        return StatusReply(*self._status_values())

    def _set_params(self, msg: Command) -> Reply:
        assert isinstance(msg, SetParams)
        if self._state is DeviceState.EMITTING:
            return _nak(msg, NakReason.BAD_STATE)
        ident = self._ident
        if not (
            1 <= msg.energy_uj <= ident.max_energy_uj
            and ident.min_width_us <= msg.width_us <= ident.max_width_us
            and 1 <= msg.rate_mhz <= ident.max_rate_mhz
            and msg.spot_um in ident.spots_um
            and msg.width_us * msg.rate_mhz < 1_000_000_000  # width < period
        ):
            return _nak(msg, NakReason.OUT_OF_RANGE)
        self._params = msg
        return Ack(msg.TYPE)

    def _arm(self, msg: Command) -> Reply:
        assert isinstance(msg, Arm)
        if self._state is DeviceState.FAULT:
            return _nak(msg, NakReason.FAULT_ACTIVE)
        if self._state in _ARMED:
            return _nak(msg, NakReason.BAD_STATE)
        if not LEASE_MIN_MS <= msg.lease_ms <= LEASE_MAX_MS:
            return _nak(msg, NakReason.OUT_OF_RANGE)
        if self._params is None:
            return _nak(msg, NakReason.NOT_CONFIGURED)
        if self._interlocks:
            return _nak(msg, NakReason.INTERLOCK_OPEN)
        self._lease_deadline = self._now + msg.lease_ms * 1000
        self._defer(lambda: self._set_state(DeviceState.READY))
        return Ack(msg.TYPE)

    def _heartbeat(self, msg: Command) -> Reply:
        assert isinstance(msg, Heartbeat)
        if self._state not in _ARMED:
            return _nak(msg, NakReason.BAD_STATE)
        if not LEASE_MIN_MS <= msg.lease_ms <= LEASE_MAX_MS:
            return _nak(msg, NakReason.OUT_OF_RANGE)
        self._lease_deadline = self._now + msg.lease_ms * 1000
        return Ack(msg.TYPE)

    def _disarm_or_stop(self, msg: Command) -> Reply:
        # Emission ends before the ACK is written: no PULSE can follow it.
        self._stop_pulse_train(commanded=True)
        if self._state in _ARMED:
            self._defer(lambda: self._set_state(DeviceState.STANDBY))
        return Ack(msg.TYPE)

    def _clear_fault(self, msg: Command) -> Reply:
        if self._state is not DeviceState.FAULT:
            return Ack(msg.TYPE)
        if self._fault_persists():
            return _nak(msg, NakReason.FAULT_PERSISTS)

        def clear() -> None:
            self._faults = 0
            self._set_state(DeviceState.STANDBY)

        self._defer(clear)
        return Ack(msg.TYPE)

    def _set_reporting(self, msg: Command) -> Reply:
        assert isinstance(msg, SetReporting)
        period = msg.status_period_ms
        if period != 0 and not 10 <= period <= 10_000:
            return _nak(msg, NakReason.OUT_OF_RANGE)
        self._status_period_ms = period
        self._next_status = self._now + period * 1000
        return Ack(msg.TYPE)

    def _fault_persists(self) -> bool:
        faults = self._faults
        return bool(
            (faults & FaultCode.INTERLOCK_OPENED.bit and self._interlocks)
            or (faults & _OVERTEMP_BIT and self._thermal.head_c > HEAD_CLEAR_C)
            or (faults & _SHUTTER_BIT and (self._stuck_shutter or self._runaway))
        )

    def _defer(self, change: Callable[[], None]) -> None:
        """Apply a state change once the command's reply is written, so the reply comes first."""
        self._deferred.append(change)

    # ------------------------------------------------------------------ output

    def _send_reply_bytes(self, frame: bytes) -> None:
        if self._drop_p > 0.0 and self._rng.random() < self._drop_p:
            self.link.dropped_out += 1
        elif self._slow_us:
            self.link.frames_out += 1
            self._order += 1
            heapq.heappush(self._delayed, (self._now + self._slow_us, self._order, frame))
        else:
            self._write(frame)
        deferred, self._deferred = self._deferred, []
        for change in deferred:
            change()

    def _send_event(self, event: Boot | Pulse | StatusEvent | FaultEvent | InputEvent) -> None:
        self._send_event_payload(event.TYPE, event.payload())

    def _send_event_payload(self, type_: int, payload: bytes) -> None:
        seq = self._event_seq
        self._event_seq = (seq + 1) & 0xFF
        frame = encode_frame(seq, type_, payload)
        if self._drop_p > 0.0 and self._rng.random() < self._drop_p:
            self.link.dropped_out += 1
            return
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        self.link.frames_out += 1
        if self._delayed:
            self._release_delayed(self._now)
        self._out += frame

    def _release_delayed(self, now_us: int) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now_us:
            self._out += heapq.heappop(delayed)[2]

    def _send_status_event(self) -> None:
        self._send_event(StatusEvent(*self._status_values()))

    def _status_values(self) -> tuple[int, int, int, int, int, int, int]:
        return (
            self._state,
            self._interlocks,
            self._faults,
            self._pulse_count,
            self._head_cdeg(),
            _cdeg(self._thermal.skin_c),
            self._lease_left_ms(),
        )

    def _head_cdeg(self) -> int:
        return _cdeg(self._thermal.head_c)

    def _lease_left_ms(self) -> int:
        if self._state not in _ARMED:
            return 0
        return max(0, -(-(self._lease_deadline - self._now) // 1000))

    def _flip_bits(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with each bit flipped with probability BER (geometric gaps between flips)."""
        nbits = len(data) * 8
        if nbits == 0:
            return data, 0
        buf = bytearray(data)
        if self._ber >= 1.0:
            return bytes(b ^ 0xFF for b in buf), nbits
        log_keep = math.log1p(-self._ber)
        rng = self._rng
        pos, flipped = -1, 0
        while True:
            pos += 1 + int(math.log1p(-rng.random()) / log_keep)
            if pos >= nbits:
                return bytes(buf), flipped
            buf[pos >> 3] ^= 1 << (pos & 7)
            flipped += 1


_NEVER: Final = 1 << 62
_PULSE_TYPE: Final = int(Pulse.TYPE)
_PULSE_PACK: Final = Pulse.STRUCT.pack
# Scheduled work, in the order ties are broken (see Board._next_action).
_ACT_NONE, _ACT_PULSE, _ACT_LEASE, _ACT_HEAD, _ACT_STATUS, _ACT_REPLY = range(6)
_ARMED: Final = frozenset({DeviceState.READY, DeviceState.EMITTING})
_CONTACT: Final = int(INTERLOCK_NAMES["contact"])
_OVERTEMP_BIT: Final = FaultCode.OVERTEMP_HEAD.bit
_SHUTTER_BIT: Final = FaultCode.SHUTTER_STUCK.bit
_ENERGY_BIT: Final = FaultCode.ENERGY_MONITOR.bit


def _nak(msg: Command, reason: NakReason) -> Nak:
    return Nak(msg.TYPE, reason)


def _cdeg(temp_c: float) -> int:
    """°C to the wire's i16 centidegrees, saturating."""
    return max(-0x8000, min(0x7FFF, round(temp_c * 100)))


# The command table: TYPE -> handler. Each handler returns the reply; state rules are in it.
_HANDLERS: Final[dict[int, Callable[[Board, Command], Reply]]] = {
    MessageType.HELLO: Board._hello,
    MessageType.GET_STATUS: Board._get_status,
    MessageType.SET_PARAMS: Board._set_params,
    MessageType.ARM: Board._arm,
    MessageType.HEARTBEAT: Board._heartbeat,
    MessageType.DISARM: Board._disarm_or_stop,
    MessageType.STOP: Board._disarm_or_stop,
    MessageType.CLEAR_FAULT: Board._clear_fault,
    MessageType.SET_REPORTING: Board._set_reporting,
}
