"""The treatment core: every fact of a treatment, owned once; events in, effects out.

In the spirit of h11, one level above the codec: no I/O, no asyncio, no clock of its own (the
shell passes the time in), no SQLite, no MQTT. :class:`TreatmentCore` owns

* whether the laser is armed (from ARM's ACK) or arming (ARM sent, no reply yet);
* the parameters the device acknowledged (:attr:`TreatmentCore.acked`), the ones the operator
  chose, the session's zone and the limits in force (in its :class:`SafetySupervisor`);
* the latched breach and the session it belongs to;
* the dose ledger (:class:`Ledger`): pulses, energy per zone, pulses lost on the wire and what
  they were charged, faults — the one set of totals every view reports.

The shell (:mod:`devicectl.daemon`) feeds it, in order, what happens::

    device event (wire order)  on_pulse (hot: returns flags) · on_status · on_fault · on_input
                               on_boot · on_reply(command, acked) · on_link_lost · on_connected
    operator request           begin(request) ... settled(command, failure) ... until Reply/Refuse

and carries out the effects it returns, in order (a :data:`STOP` always first). An operator
request is a short conversation: ``begin`` returns effects ending in a :class:`Send` (the shell
sends that command and reports the outcome with :meth:`TreatmentCore.settled`), an
:class:`OpenSession` / :class:`CloseSession` (the shell writes the log and reports with
:meth:`TreatmentCore.session_opened` / :meth:`TreatmentCore.session_closed`), or a final
:class:`Reply` / :class:`Refuse`. One request at a time: a state-changing request that arrives while
another is between its request and its reply is refused (rule ``request_in_progress``); the shell
queues them so that this never happens in practice.

The transitions, as a table (request → what must hold → what it sends; the reply that changes
state); what must hold is the data of ``_REQUIRES``, at the end of this module::

    request   refused unless                               sends            state changes at
    ───────── ──────────────────────────────────────────── ──────────────── ───────────────────────
    start     no session, device identified, no latch      (log)            the log opened it
    zone      session, not armed/arming                    (SET_PARAMS of   now (no laser involved)
                                                             a preset)
    params    session, zone, not armed/arming, limits ok   SET_PARAMS       SET_PARAMS's ACK
    arm       session, zone, params, no latch, device not  [SET_PARAMS],    ARM's ACK (judged
              in FAULT, limits ok, budgets left            ARM              against acked params)
    disarm    —                                            DISARM           DISARM's ACK
    ack       a latched breach, or a device FAULT          CLEAR_FAULT      now / its ACK
    end       session                                      [DISARM]         the log closed it

The per-PULSE path (:meth:`TreatmentCore.on_pulse`) is a plain call that allocates nothing on the
accepted path: the supervisor's verdict, the ledger, and flags telling the shell to write STOP
(:data:`PULSE_STOP`), to carry out follow-up effects (:data:`PULSE_FOLLOW`: a breach, a gap) and
to record the pulse (:data:`PULSE_RECORD`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from devicectl.errors import DevicectlError, DeviceRefused, LinkError, SafetyRefusal
from devicectl.policy import Concern, Policy, PulseParams, SkinType, Zone, fluence_j_cm2
from devicectl.safety import (
    AcknowledgementRefused,
    Breach,
    Limits,
    SafetySupervisor,
    check_params,
    compile_limits,
)
from protocols.messages import (
    Arm,
    ClearFault,
    Command,
    DeviceState,
    Disarm,
    FaultCode,
    Ident,
    MessageType,
    StatusReport,
    fault_names,
    interlock_names,
)
from protocols.mqtt import SessionEventKind, Severity

__all__ = [
    "FAULT_EVENT_KINDS",
    "PULSE_FOLLOW",
    "PULSE_RECORD",
    "PULSE_STOP",
    "STOP",
    "AckFault",
    "Alert",
    "ArmLaser",
    "ChangeZone",
    "CloseSession",
    "DisarmLaser",
    "Effect",
    "EndSession",
    "Heartbeats",
    "Ledger",
    "LogLine",
    "OpenSession",
    "PublishSession",
    "PublishState",
    "Reconcile",
    "RecordEvent",
    "RecordGap",
    "RecordParams",
    "RecordZone",
    "Refuse",
    "Refused",
    "Reply",
    "Request",
    "Send",
    "SessionEvent",
    "SetParams",
    "StartSession",
    "StopEmission",
    "TreatmentCore",
]

# The session-log event kinds that count as a fault of the session they are recorded in (with
# every pulse-gap record): the core's ledger and the log's summary count by this one rule.
FAULT_EVENT_KINDS: Final = frozenset({"breach", "device_fault", "link_lost"})

PULSE_STOP: Final = 1  # write STOP now, before anything else
PULSE_FOLLOW: Final = 2  # then carry out TreatmentCore.take_effects() (breach, gap records)
PULSE_RECORD: Final = 4  # record the pulse: session TreatmentCore.ledger.id, zone .ledger.zone_key

ACK_COMMAND: Final = "devicectl fault ack --operator ID --reason TEXT"


class Refused(DevicectlError):
    """An operator request the treatment's state does not allow; ``kind`` is ``refused`` (exit 1)
    or ``usage`` (exit 2: the request itself lacks something)."""

    def __init__(self, rule: str, message: str, *, kind: str = "refused") -> None:
        self.rule, self.kind = rule, kind
        super().__init__(message)


# ---------------------------------------------------------------- operator requests (events in)


@dataclass(frozen=True, slots=True)
class StartSession:
    actor: str
    patient: str | None  # as published (a keyed pseudonym, nothing, or by setting the reference)
    skin_type: SkinType
    preset: Concern | None = None
    active_ingredient: str | None = None
    concerns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChangeZone:
    actor: str
    zone: Zone


@dataclass(frozen=True, slots=True)
class SetParams:
    """New parameters: each field given, or kept from the current ones (or the preset's)."""

    actor: str
    energy_uj: int | None = None
    width_us: int | None = None
    rate_mhz: int | None = None
    spot_um: int | None = None
    preset: Concern | None = None


@dataclass(frozen=True, slots=True)
class ArmLaser:
    actor: str
    # TreatmentCore.stops when the request arrived (None: now): a STOP written since refuses it
    stops_seen: int | None = None


@dataclass(frozen=True, slots=True)
class DisarmLaser:
    actor: str


@dataclass(frozen=True, slots=True)
class AckFault:
    actor: str
    reason: str
    # who signed the acknowledgement off (signed_off_by, signed_off_role, reason_code): recorded
    # with it, in the log and on MQTT
    signoff: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndSession:
    actor: str
    post_care: tuple[str, ...] = ()
    post_care_declined: str | None = None


Request = StartSession | ChangeZone | SetParams | ArmLaser | DisarmLaser | AckFault | EndSession


# ---------------------------------------------------------------- effects (decisions out)


@dataclass(frozen=True, slots=True)
class StopEmission:
    """Write STOP now (DeviceLink.stop_now): ahead of everything, re-sent until acknowledged."""


STOP: Final = StopEmission()


@dataclass(frozen=True, slots=True)
class Send:
    """Send this command and report its outcome with :meth:`TreatmentCore.settled`."""

    command: Command


@dataclass(frozen=True, slots=True)
class Heartbeats:
    """Keep the lease alive every lease/3 (``lease_ms`` > 0), or stop doing so (0)."""

    lease_ms: int


@dataclass(frozen=True, slots=True)
class RecordEvent:
    session: int | None
    kind: str
    actor: str
    detail: Mapping[str, object]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RecordGap:
    """Pulses ``first..last`` were fired and not seen: charged at ``charged_uj`` each."""

    session: int | None
    first: int
    last: int
    charged_uj: int
    zone: str
    cause: str


@dataclass(frozen=True, slots=True)
class RecordZone:
    session: int
    zone: Zone
    actor: str
    energy_limit_uj: int


@dataclass(frozen=True, slots=True)
class RecordParams:
    session: int
    params: PulseParams
    actor: str


@dataclass(frozen=True, slots=True)
class Reconcile:
    """First contact with the device since start-up: reconcile the log with its counter."""

    device_pulse_count: int
    max_energy_uj: int


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Open the session in the log; report with :meth:`TreatmentCore.session_opened`."""

    active_ingredient: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Close the session in the log; report with :meth:`TreatmentCore.session_closed`."""

    session: int
    actor: str
    post_care: tuple[str, ...]
    post_care_declined: str | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    severity: Severity  # the MQTT contract's: info | warning | critical
    code: str
    message: str
    value: float | None = None
    limit: float | None = None
    session: int | None = None


@dataclass(frozen=True, slots=True)
class SessionEvent:
    session: int
    kind: SessionEventKind
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishState:
    """The retained device state changed (armed, params, session, the device's own state)."""


@dataclass(frozen=True, slots=True)
class PublishSession:
    """The session summary changed (or the session ended: publish its absence)."""


@dataclass(frozen=True, slots=True)
class LogLine:
    """A line for the operator's structured log (the shell's logger)."""

    level: str  # info | warning | error
    event: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """The request succeeded: this is its result."""

    result: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Refuse:
    """The request failed: raise this error to its caller."""

    error: DevicectlError


Effect = (
    StopEmission | Send | Heartbeats | RecordEvent | RecordGap | RecordZone | RecordParams
    | Reconcile | OpenSession | CloseSession | Alert | SessionEvent | PublishState
    | PublishSession | LogLine | Reply | Refuse
)  # fmt: skip

_PUBLISH_STATE: Final = PublishState()
_PUBLISH_SESSION: Final = PublishSession()
# The supervisor grades breaches critical/high/warning; the MQTT contract has info/warning/critical.
_ALERT_SEVERITY: Final[dict[str, Severity]] = {
    "critical": "critical",
    "high": "critical",
    "warning": "warning",
}


# ---------------------------------------------------------------- the ledger


class Ledger:
    """The open session's totals: the one source of the live ``session`` topic, ``session end``'s
    reply and the ``ended`` event; the session log's summary counts the same records by the same
    rules (:data:`FAULT_EVENT_KINDS`, every gap a fault).

    Per pulse it adds to plain slots (the zone being treated, the largest energy at the current
    spot); the per-zone map and the peak fluence are folded from them when read or when the zone
    or the spot changes. Fluence is monotonic in energy at one spot, so the peak is the same float
    the log computes pulse by pulse."""

    __slots__ = (
        "_by_zone",
        "_fluence_per_uj",
        "_peak_fluence",
        "actor",
        "faults",
        "id",
        "patient",
        "peak_energy_uj",
        "pulses",
        "skin_type",
        "started_ns",
        "unlogged_energy_uj",
        "unlogged_pulses",
        "zone_charged",
        "zone_key",
        "zone_uj",
    )

    def __init__(
        self, session_id: int, actor: str, patient: str | None, skin_type: SkinType, started_ns: int
    ) -> None:
        self.id = session_id
        self.actor = actor
        self.patient = patient  # as published: never the reference unless configured
        self.skin_type = skin_type
        self.started_ns = started_ns
        self.pulses = 0
        self.unlogged_pulses = 0
        self.unlogged_energy_uj = 0
        self.faults = 0
        self._by_zone: dict[str, int] = {}  # zones left, and what they received
        self.zone_key = "none"  # the zone being charged now
        self.zone_uj = 0  # what it received since it became the current zone
        self.zone_charged = False  # anything charged to it since then (a 0 µJ pulse counts)
        self.peak_energy_uj = -1  # the largest pulse at the current spot
        self._fluence_per_uj = 0.0  # J/cm² per µJ at the spot of the parameters recorded last
        self._peak_fluence = 0.0  # the peak at the spots before the current one

    def move_to(self, zone_key: str) -> None:
        """Pulses from here on are charged to ``zone_key``."""
        self._fold_zone()
        self.zone_key = zone_key
        self.zone_charged = zone_key in self._by_zone  # a zone visited before
        self.zone_uj = self._by_zone.pop(zone_key, 0)

    def charge(self, zone_key: str, energy_uj: int) -> None:
        """Energy charged without a PULSE (lost pulses) to ``zone_key``."""
        if zone_key == self.zone_key:
            self.zone_uj += energy_uj
            self.zone_charged = True
        else:
            self._by_zone[zone_key] = self._by_zone.get(zone_key, 0) + energy_uj

    def at_spot(self, spot_um: int) -> None:
        """Parameters at ``spot_um`` were recorded: later fluence is reckoned at that spot."""
        self._peak_fluence = self.peak_fluence_j_cm2
        self.peak_energy_uj = -1
        self._fluence_per_uj = fluence_j_cm2(1, spot_um)

    def _fold_zone(self) -> None:
        if self.zone_charged:
            self._by_zone[self.zone_key] = self.zone_uj
        self.zone_uj = 0
        self.zone_charged = False

    @property
    def energy_by_zone_uj(self) -> dict[str, int]:
        by_zone = dict(self._by_zone)
        if self.zone_charged:
            by_zone[self.zone_key] = self.zone_uj
        return by_zone

    @property
    def peak_fluence_j_cm2(self) -> float:
        current = self.peak_energy_uj * self._fluence_per_uj if self.peak_energy_uj > 0 else 0.0
        return max(self._peak_fluence, current)

    @property
    def energy_uj(self) -> int:
        return sum(self.energy_by_zone_uj.values())

    def summary(self, outcome: str, now_ns: int) -> dict[str, object]:
        """The session log's summary shape (``Summary.to_dict``)."""
        return {
            "session_id": self.id,
            "outcome": outcome,
            "started_ns": self.started_ns,
            "ended_ns": now_ns,
            "duration_s": max(0, now_ns - self.started_ns) / 1e9,
            "pulses": self.pulses,
            "unlogged_pulses": self.unlogged_pulses,
            "unlogged_energy_uj": self.unlogged_energy_uj,
            "energy_per_zone_uj": dict(sorted(self.energy_by_zone_uj.items())),
            "total_energy_uj": self.energy_uj,
            "peak_fluence_j_cm2": self.peak_fluence_j_cm2,
            "faults": self.faults,
        }

    def contract_summary(
        self, zone: Zone | None, now_ns: int, *, ended: bool = False
    ) -> dict[str, object]:
        """The MQTT contract's ``SessionSummary`` (docs/mqtt.md): the same totals."""
        return {
            "session": str(self.id),
            "operator": self.actor,
            "patient": self.patient,
            "skin_type": self.skin_type.name,
            "zone": zone.value if zone is not None else None,
            "started": datetime.fromtimestamp(self.started_ns / 1e9, UTC),
            "ended": datetime.fromtimestamp(now_ns / 1e9, UTC) if ended else None,
            "pulses": self.pulses,
            "energy_uj": self.energy_uj,
            "energy_uj_by_zone": self.energy_by_zone_uj,
            "peak_fluence_j_cm2": self.peak_fluence_j_cm2,
            "duration_s": round((now_ns - self.started_ns) / 1e9, 3),
            "faults": self.faults,
        }


# ---------------------------------------------------------------- the core


class TreatmentCore:
    """One device's treatment state. See the module docstring."""

    def __init__(self, policy: Policy, *, lease_ms: int | None = None) -> None:
        self.policy = policy
        self.lease_ms = policy.lease_ms if lease_ms is None else lease_ms
        self.ident: Ident | None = None
        self.status: StatusReport | None = None
        self.supervisor: SafetySupervisor | None = None
        self.footswitch: bool | None = None  # None: no INPUT seen since connecting
        self._fault_cleared = False  # CLEAR_FAULT acknowledged since connecting
        self.armed = False
        self.arming = False
        self.acked: PulseParams | None = None  # what the device acknowledged since it booted
        self.chosen: PulseParams | None = None  # what the operator asked for this session
        self.zone: Zone | None = None
        self.ledger: Ledger | None = None
        self.latch_session: int | None = None
        self.busy: str | None = None  # the operator request between its request and its reply
        self.stops = 0  # STOPs written that the core did not decide (on_stop_requested)
        self._restored_latch: Breach | None = None  # from the log, until a supervisor takes it
        self._preset: PulseParams | None = None  # a session's preset, waiting for its zone
        self._sent: PulseParams | None = None  # SET_PARAMS in flight
        self._step: _Step | None = None
        self._last_no = -1  # the last pulse number accounted for; -1 before reconciliation
        self._reconciled = False
        self._gap_open_since: float | None = None
        self._ack_to_cite: dict[str, object] | None = None  # an ack recorded in a closed session
        self._out: list[Effect] = []

    def restore_latch(self, breach: Breach, session: int | None) -> None:
        """A breach the log holds unacknowledged (the daemon stopped, or was killed, while it was
        latched): it stays latched, in its session, until an operator acknowledges it."""
        self._restored_latch = breach
        self.latch_session = session

    # ------------------------------------------------------------ read-only views

    @property
    def session_id(self) -> int | None:
        ledger = self.ledger
        return ledger.id if ledger is not None else None

    @property
    def zone_name(self) -> str:
        zone = self.zone
        return zone.value if zone is not None else "none"

    @property
    def latched(self) -> Breach | None:
        supervisor = self.supervisor
        return supervisor.latched if supervisor is not None else self._restored_latch

    @property
    def device_fault(self) -> int:
        """The fault bits the device holds latched (0: none); only CLEAR_FAULT clears them."""
        status = self.status
        if status is None or status.state != DeviceState.FAULT:
            return 0
        return status.faults or 1 << 31  # FAULT with no bit named: still latched

    @property
    def last_pulse_no(self) -> int:
        return self._last_no

    def summary(self, now_ns: int, outcome: str = "open") -> dict[str, object] | None:
        ledger = self.ledger
        return None if ledger is None else ledger.summary(outcome, now_ns)

    def contract_summary(self, now_ns: int) -> dict[str, object] | None:
        """The open session in the MQTT contract's shape, or None."""
        ledger = self.ledger
        return None if ledger is None else ledger.contract_summary(self.zone, now_ns)

    def take_effects(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------ device events (wire order)

    def on_pulse(self, pulse_no: int, t_us: int, energy_uj: int) -> int:
        """One PULSE: the hot path. Returns PULSE_* flags (never 0: a pulse is always recorded
        or accounted for). Allocates nothing when the pulse is accepted and none was lost."""
        supervisor = self.supervisor
        if supervisor is None:  # before IDENT: nothing here armed the laser
            self._unsupervised(pulse_no, energy_uj)
            return PULSE_STOP | PULSE_FOLLOW
        verdict = supervisor.on_pulse(pulse_no, t_us, energy_uj)
        flags = PULSE_RECORD
        last = self._last_no
        if pulse_no > last:
            if pulse_no != last + 1 and last >= 0:
                self._record_gap(last + 1, pulse_no - 1)
                flags = PULSE_RECORD | PULSE_FOLLOW
            self._last_no = pulse_no
        ledger = self.ledger
        if ledger is None:
            # A pulse with no session open (uncommanded: the supervisor stops the laser): charged
            # to no session at its measured energy, and accounted for like any pulse.
            self._out.append(
                RecordGap(None, pulse_no, pulse_no, energy_uj, "none", "pulse without a session")
            )
            flags = PULSE_FOLLOW
        else:
            ledger.pulses += 1
            ledger.zone_uj += energy_uj
            ledger.zone_charged = True
            ledger.peak_energy_uj = max(ledger.peak_energy_uj, energy_uj)
        if verdict:
            self.armed = False
            self._breach()
            return flags | PULSE_STOP | PULSE_FOLLOW
        return flags

    def on_status(self, status: StatusReport) -> list[Effect]:
        previous, self.status = self.status, status
        supervisor = self.supervisor
        if supervisor is not None and supervisor.on_status(
            status.state,
            status.interlocks,
            status.head_temp_cdeg,
            status.skin_temp_cdeg,
            status.lease_left_ms,
        ):
            self._out.append(STOP)
            self.armed = False
            self._breach()
        # Every pulse a STATUS counts had its PULSE written before it (docs/protocol.md): any not
        # seen were lost on the wire, the last of a train included.
        if self._reconciled and status.pulse_count > self._last_no:
            self._charge_lost(status.pulse_count)
        if previous is None or (previous.state, previous.interlocks, previous.faults) != (
            status.state,
            status.interlocks,
            status.faults,
        ):
            self._out.append(_PUBLISH_STATE)  # the retained state follows the device too
        return self.take_effects()

    def on_fault(self, code: int, detail: int) -> list[Effect]:
        self.armed = False
        if self.supervisor is not None and self.supervisor.on_device_fault(code, detail):
            self._out.append(STOP)
            self._breach()  # recorded as the breach: one incident, one fault
        else:
            self._record("device_fault", "device", {"code": _code_name(code), "detail": detail})
            self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    def on_input(self, footswitch: bool, interlocks: int) -> list[Effect]:
        self.footswitch = footswitch
        self._record(
            "input",
            "device",
            {"footswitch": footswitch, "interlocks_open": interlock_names(interlocks)},
        )
        return self.take_effects()

    def on_boot(self, reason: int) -> list[Effect]:
        was_armed = self.armed or self.arming
        self.armed = self.arming = False
        self.acked = None  # parameters do not survive a boot
        if self.supervisor is not None and self.supervisor.on_boot(reason):
            # A booted board is in STANDBY; STOP first all the same, as for every breach.
            self._out.append(STOP)
            self._breach()
        self._record("device_boot", "device", {"reason": reason, "while_armed": was_armed})
        self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    def on_reply(self, command: int, acked: bool) -> list[Effect]:
        """A command's reply (ACK, or NAK when ``acked`` is false), synchronously in wire order:
        the state that command changes flips here, between the PULSEs around it."""
        supervisor = self.supervisor
        if command == MessageType.SET_PARAMS:
            sent, self._sent = self._sent, None
            if acked and sent is not None:
                self.acked = sent
                self._load_limits()
        elif command == MessageType.ARM:
            self.arming = False
            if acked:
                self._armed_at_ack()
        elif command == MessageType.CLEAR_FAULT and acked:
            self._fault_cleared = True
        elif command in (MessageType.STOP, MessageType.DISARM) and acked:
            self.armed = False
            if supervisor is not None:
                supervisor.disarm()
            self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    def on_link_lost(self, reason: str, now: float) -> list[Effect]:
        was_armed = self.armed or self.arming
        self.armed = self.arming = False
        self._gap_open_since = now
        supervisor = self.supervisor
        if was_armed or (supervisor is not None and supervisor.armed):
            # The device may still be firing under its lease: STOP, which the link keeps wanted
            # until it is acknowledged, so it goes out right after IDENT on the next connection.
            self._out.append(STOP)
        if supervisor is not None and supervisor.on_link_lost():
            self._breach()  # recorded and alerted as the breach: one incident, one fault
        else:
            self._record("link_lost", "devicectl", {"reason": reason, "while_armed": was_armed})
            self._out.append(Alert("warning", "link_lost", f"device link lost: {reason}"))
        self._out.append(LogLine("error", "device_link_lost", {"reason": reason}))
        self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    def on_connected(self, ident: Ident, status: StatusReport, now: float) -> list[Effect]:
        """IDENT and the first STATUS of a connection (the first since start-up, or again)."""
        self.ident = ident
        self.status = status
        self.footswitch = None
        self._fault_cleared = False
        if self.supervisor is None or self.ledger is None:
            self.supervisor = self._new_supervisor(ident)
        if not self._reconciled:
            self._reconciled = True
            self._out.append(Reconcile(status.pulse_count, ident.max_energy_uj))
            self._last_no = status.pulse_count
            self.supervisor.follow_on(status.pulse_count)
        elif self._gap_open_since is not None:
            # The device may have rebooted unseen while the link was down (no parameters then):
            # ``arm`` sends them again rather than an ARM the device would refuse.
            self.acked = None
            self._record(
                "link_restored",
                "devicectl",
                {
                    "gap_s": round(now - self._gap_open_since, 3),
                    "device_pulse_count": status.pulse_count,
                    "last_logged_pulse_no": self._last_no,
                },
            )
            if status.pulse_count > self._last_no:
                self._charge_lost(status.pulse_count)
        self._gap_open_since = None
        self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    # ------------------------------------------------------------ operator requests

    def begin(self, request: Request, now_ns: int) -> list[Effect]:
        """Start an operator request. Its effects end with Send, OpenSession, CloseSession (it
        goes on), or Reply / Refuse (it is over)."""
        if self.busy is not None:
            return self._refuse(
                request,
                Refused(
                    "request_in_progress",
                    f"{self.busy} is in progress: wait for its reply and try again",
                ),
            )
        try:
            step = self._first_step(request, now_ns)
        except _NotIdentified as exc:  # unreachable, not a refusal to audit
            self._out.append(Refuse(exc))
            return self.take_effects()
        except (Refused, SafetyRefusal, AcknowledgementRefused) as exc:
            return self._refuse(request, exc)
        self.busy = _NAMES[type(request)]
        self._step = step
        return self._advance(None, now_ns)

    def settled(self, command: int, error: DevicectlError | None, now_ns: int) -> list[Effect]:
        """The command the request sent has its outcome: ``error`` None (acknowledged; the ACK
        itself came through :meth:`on_reply`), else why not: DeviceRefused (NAK, also seen by
        on_reply), a LinkError (unanswered, link lost, device rebooted) or SupersededByStop."""
        step = self._step
        if step is None or step.sent != command:
            return []
        step.sent = None
        if error is not None and command == MessageType.SET_PARAMS and self._sent is not None:
            # No ACK seen: the device may or may not run them; ARM sends them again.
            self._sent = None
            self.acked = None
        if error is not None and command == MessageType.ARM:
            self.arming = False
        if (
            error is not None
            and command in (MessageType.ARM, MessageType.DISARM)
            and not isinstance(error, DeviceRefused)
        ):
            # Unanswered or abandoned: the device may be armed. Make sure it is not.
            self._out.append(STOP)
        return self._advance(error, now_ns)

    def session_opened(self, session_id: int, now_ns: int) -> list[Effect]:
        step = self._step
        assert step is not None
        assert isinstance(step.request, StartSession)
        request = step.request
        self.ledger = Ledger(session_id, request.actor, request.patient, request.skin_type,
                             now_ns)  # fmt: skip
        assert self.ident is not None
        self.supervisor = self._new_supervisor(self.ident)
        self.zone = None
        self.chosen = None
        self._preset = self.policy.presets[request.preset].params() if request.preset else None
        if self._ack_to_cite is not None:
            self._record("prior_breach_acknowledged", request.actor, self._ack_to_cite)
            self._ack_to_cite = None
        self._out.append(SessionEvent(session_id, "started", {
            "operator": request.actor, "patient": request.patient,
            "skin_type": request.skin_type.name, "concerns": list(request.concerns),
        }))  # fmt: skip
        self._out.append(_PUBLISH_SESSION)
        self._out.append(_PUBLISH_STATE)
        return self._finish({"session": session_id})

    def session_closed(self, now_ns: int) -> list[Effect]:
        ledger = self.ledger
        assert ledger is not None
        summary = ledger.summary("completed", now_ns)
        self._out.append(SessionEvent(ledger.id, "ended", {
            "summary": ledger.contract_summary(self.zone, now_ns, ended=True),
        }))  # fmt: skip
        self.ledger = None
        self.zone = None
        self.chosen = self._preset = None
        self._out.append(_PUBLISH_SESSION)
        self._out.append(_PUBLISH_STATE)
        return self._finish(summary)

    def abandon(self, error: DevicectlError) -> list[Effect]:
        """The shell could not carry out the step (the log refused to open or close, the request
        was cancelled): the request is over, with this error. An ARM without its outcome is
        undone: STOP."""
        step = self._step
        if step is not None and step.sent == MessageType.ARM and not self.armed:
            self.arming = False
            self._out.append(STOP)
        if step is not None and step.sent == MessageType.SET_PARAMS and self._sent is not None:
            self._sent = None
            self.acked = None
        self._step = None
        self.busy = None
        self._out.append(Refuse(error))
        return self.take_effects()

    def on_stop_requested(self) -> None:
        """A STOP the core did not decide was written (the operator's, a remote one, the log
        failing): a request in progress must not arm after it. An ARM in flight is superseded by
        the link; this covers the ARM not yet sent (``arm``'s SET_PARAMS had its ACK), and an
        ``arm`` made before the STOP and still waiting its turn (:attr:`ArmLaser.stops_seen`)."""
        self.stops += 1
        step = self._step
        if step is not None:
            step.stopped = True

    def on_shutdown(self) -> list[Effect]:
        """The daemon is stopping (STOP and DISARM were sent): nothing stays armed here."""
        self.armed = self.arming = False
        if self.supervisor is not None:
            self.supervisor.disarm()
        self._record("daemon_stopped", "devicectl", {"session_left_open": self.ledger is not None})
        self._out.append(_PUBLISH_STATE)
        return self.take_effects()

    # ------------------------------------------------------------ the steps of each request

    def _first_step(self, request: Request, now_ns: int) -> _Step:
        if isinstance(request, AckFault):
            if not request.actor.strip():
                raise AcknowledgementRefused("an operator id")
            if not request.reason.strip():
                raise AcknowledgementRefused("a reason")
        self._require(request)
        if isinstance(request, StartSession):
            return _Step(request, stage="open", ingredient=self._ingredient(request))
        if isinstance(request, EndSession):
            # Until the device has acknowledged a STOP or DISARM it may fire: those pulses belong
            # to this session, so it ends after a DISARM's ACK (sent after any STOP's).
            supervisor = self.supervisor
            live = self.armed or self.arming or (supervisor is not None and supervisor.armed)
            return _Step(request, stage="disarm" if live else "close")
        if isinstance(request, SetParams):
            return _Step(request, params=self._resolve_params(request))
        if isinstance(request, ArmLaser):
            seen = request.stops_seen
            return _Step(request, stopped=seen is not None and seen != self.stops)
        return _Step(request)

    def _require(self, request: Request) -> None:
        """Refuse ``request`` unless the state allows it (the table :data:`_REQUIRES`)."""
        for need in _REQUIRES[type(request)]:
            if not need.holds(self):
                if need.rule == "identified":
                    raise _NotIdentified()
                raise Refused(need.rule, need.says(self, request))

    def _advance(self, failure: DevicectlError | None, now_ns: int) -> list[Effect]:
        step = self._step
        assert step is not None
        try:
            return self._next(step, failure)
        except _NotIdentified as exc:
            self._step = None
            self.busy = None
            self._out.append(Refuse(exc))
            return self.take_effects()
        except (Refused, SafetyRefusal, AcknowledgementRefused) as exc:
            return self._fail_refused(step.request, exc)

    def _next(self, step: _Step, failure: DevicectlError | None) -> list[Effect]:
        request = step.request
        if isinstance(request, StartSession):
            if step.stage == "open":
                step.stage = "opening"
                self._out.append(OpenSession(step.ingredient))
                return self.take_effects()
        elif isinstance(request, ChangeZone):
            return self._zone_steps(step, request, failure)
        elif isinstance(request, SetParams):
            return self._params_steps(step, request, failure)
        elif isinstance(request, ArmLaser):
            return self._arm_steps(step, request, failure)
        elif isinstance(request, DisarmLaser):
            return self._disarm_steps(step, request, failure)
        elif isinstance(request, AckFault):
            return self._ack_steps(step, request, failure)
        elif isinstance(request, EndSession):
            return self._end_steps(step, request, failure)
        raise AssertionError(f"no step for {request!r}")

    def _zone_steps(
        self, step: _Step, request: ChangeZone, failure: DevicectlError | None
    ) -> list[Effect]:
        ledger = self._session()
        if step.stage == "start":
            zone = request.zone
            limit_uj = round(self.policy.zone(zone).energy_j * 1e6)
            self.zone = zone
            ledger.move_to(zone.value)
            self._out.append(RecordZone(ledger.id, zone, request.actor, limit_uj))
            self._out.append(SessionEvent(ledger.id, "zone", {
                "zone": zone.value, "energy_limit_uj": limit_uj,
            }))  # fmt: skip
            step.result = {"session": ledger.id, "zone": zone.value, "energy_limit_uj": limit_uj}
            if self.acked is not None:
                self._load_limits()
            current = self.chosen
            if current is None and self._preset is not None:
                # The session's preset becomes the parameters once there is a zone to check.
                params, self._preset = self._preset, None
                try:
                    self._limits(params)
                except SafetyRefusal as exc:
                    self._audit_refusal("params_set", request.actor, exc)
                    step.result["warning"] = f"the preset is not allowed here: {exc}"
                else:
                    return self._send_params(step, params, "params")
            elif current is not None:
                try:
                    self._limits(current)
                except SafetyRefusal as exc:
                    step.result["warning"] = (
                        f"the current parameters are not allowed here, arming is refused until "
                        f"they are changed: {exc}"
                    )
            self._out.append(_PUBLISH_SESSION)
            self._out.append(_PUBLISH_STATE)
            return self._finish(step.result)
        # stage "params": the preset's SET_PARAMS has its outcome
        if failure is not None:
            step.result["warning"] = f"the preset's parameters were not applied: {failure}"
        else:
            step.result |= self._params_applied(step, request.actor)
        self._out.append(_PUBLISH_SESSION)
        self._out.append(_PUBLISH_STATE)
        return self._finish(step.result)

    def _params_steps(
        self, step: _Step, request: SetParams, failure: DevicectlError | None
    ) -> list[Effect]:
        if step.stage == "start":
            assert step.params is not None
            return self._send_params(step, step.params, "params")
        if failure is not None:
            return self._fail(failure)
        result = self._params_applied(step, request.actor)
        self._out.append(_PUBLISH_SESSION)
        self._out.append(_PUBLISH_STATE)
        return self._finish(result)

    def _arm_steps(
        self, step: _Step, request: ArmLaser, failure: DevicectlError | None
    ) -> list[Effect]:
        if step.stage == "start":
            if step.stopped:
                return self._fail_refused(
                    request, Refused("stopped", "a STOP came after this arm: not armed")
                )
            if self.armed or self.arming:
                return self._finish({"armed": True, "lease_ms": self.lease_ms})
            chosen = self._check_arm(request)
            if self.acked != chosen:
                # The device rebooted (or lost them) since: they go again, and ARM judges what the
                # device acknowledges.
                return self._send_params(step, chosen, "arm")
            step.stage = "arm"
        if step.stage == "params_for_arm":
            if failure is not None:
                return self._fail(failure)
            step.stage = "arm"
        if step.stage == "arm":
            if step.stopped:
                return self._fail_refused(
                    request, Refused("stopped", "a STOP came while arming: the laser is not armed")
                )
            try:
                self._check_arm(request)
                supervisor = self.supervisor
                assert supervisor is not None
                supervisor.check_arm()  # latched breach, zone or session energy spent
            except (Refused, SafetyRefusal) as exc:
                return self._fail_refused(request, exc)
            self.arming = True
            step.stage = "arming"
            step.sent = MessageType.ARM
            self._out.append(Send(Arm(self.lease_ms)))
            return self.take_effects()
        # stage "arming": ARM has its outcome (the ACK itself came through on_reply)
        if step.stopped and failure is None:
            # ARM's ACK, then a STOP the core did not decide (acknowledged, or on its way)
            return self._fail_refused(
                request, Refused("stopped", "a STOP came while arming: not armed")
            )
        if not self.armed:
            if failure is not None:
                return self._fail(failure)
            return self._fail_refused(
                request, Refused("arm_undone", "arming was undone: a limit changed during ARM")
            )
        ledger = self._session()
        self._record("armed", request.actor, {"lease_ms": self.lease_ms})
        self._out.append(SessionEvent(ledger.id, "armed", {"lease_ms": self.lease_ms}))
        self._out.append(_PUBLISH_STATE)
        result: dict[str, object] = {"armed": True, "lease_ms": self.lease_ms}
        if self.footswitch:
            result["note"] = (
                "the footswitch is held: release it and press it again to fire (the device "
                "needs a fresh press)"
            )
        elif self.footswitch is None and self._fault_cleared:
            # No INPUT seen since connecting (a restart), and a fault was cleared: a footswitch
            # held through it does not fire.
            result["note"] = (
                "if the footswitch is held, release it and press it again to fire (the device "
                "needs a fresh press after a fault is cleared)"
            )
        return self._finish(result)

    def _disarm_steps(
        self, step: _Step, request: DisarmLaser, failure: DevicectlError | None
    ) -> list[Effect]:
        if step.stage == "start":
            step.stage = "disarming"
            step.sent = MessageType.DISARM
            self._out.append(Heartbeats(0))
            self._out.append(Send(Disarm()))
            return self.take_effects()
        if failure is not None:
            return self._fail(failure)
        self._record("disarmed", request.actor, {})
        if self.ledger is not None:
            self._out.append(SessionEvent(self.ledger.id, "disarmed"))
        self._out.append(_PUBLISH_STATE)
        return self._finish({"armed": False})

    def _ack_steps(
        self, step: _Step, request: AckFault, failure: DevicectlError | None
    ) -> list[Effect]:
        if step.stage == "start":
            supervisor = self.supervisor
            breach = supervisor.acknowledge(request.actor, request.reason) if supervisor else None
            if breach is None and self._restored_latch is not None:
                breach, self._restored_latch = self._restored_latch, None
            if breach is not None:
                session = self.latch_session
                self.latch_session = None
                self._out.append(RecordEvent(
                    session, "fault_ack", request.actor,
                    {"breach": breach.alert_code, "pulse_no": breach.pulse_no, **request.signoff},
                    request.reason,
                ))  # fmt: skip
                if session is not None:
                    self._out.append(SessionEvent(session, "ack", {
                        "breach": breach.alert_code, "operator": request.actor,
                        "signed_off_by": request.signoff.get("signed_off_by"),
                        "reason_code": request.signoff.get("reason_code"),
                        "reason": request.reason,
                    }))  # fmt: skip
                    if session != self.session_id:
                        self._ack_to_cite = {"session": session, "breach": breach.alert_code}
                step.result = {
                    "acknowledged": breach.alert_code,
                    "operator": request.actor,
                    "reason": request.reason,
                    **request.signoff,
                }
            if self.device_fault:
                step.faults = fault_names(self.device_fault)
                step.stage = "clearing"
                step.sent = MessageType.CLEAR_FAULT
                self._out.append(Send(ClearFault()))
                return self.take_effects()
            self._out.append(_PUBLISH_STATE)
            return self._finish(step.result)
        # stage "clearing": CLEAR_FAULT has its outcome
        faults = step.faults
        if failure is not None:
            if step.result:  # the breach is acknowledged; the device keeps its fault
                step.result["device_fault"] = (
                    f"the device keeps {', '.join(faults)} latched ({failure}): remove the cause "
                    "and acknowledge again"
                )
                self._out.append(_PUBLISH_STATE)
                return self._finish(step.result)
            return self._fail_refused(request, Refused(
                "device_fault_persists",
                f"the device keeps {', '.join(faults) or 'its fault'} latched ({failure}): remove "
                "its cause (close the interlock, let the head cool) and acknowledge again",
            ))  # fmt: skip
        if not step.result:
            self._record(
                "fault_ack",
                request.actor,
                {"device_fault": faults, "cleared": True, **request.signoff},
                request.reason,
            )
            step.result = {
                "acknowledged": "device_fault",
                "device_faults": faults,
                "operator": request.actor,
                "reason": request.reason,
                **request.signoff,
            }
        else:
            step.result["device_fault_cleared"] = faults
        self._out.append(_PUBLISH_STATE)
        return self._finish(step.result)

    def _end_steps(
        self, step: _Step, request: EndSession, failure: DevicectlError | None
    ) -> list[Effect]:
        ledger = self._session()
        if step.stage == "disarm":
            step.stage = "disarming"
            step.sent = MessageType.DISARM
            self._out.append(Heartbeats(0))
            self._out.append(Send(Disarm()))
            return self.take_effects()
        if step.stage == "disarming" and failure is not None:
            return self._fail(failure)
        step.stage = "closing"
        self._out.append(
            CloseSession(ledger.id, request.actor, request.post_care, request.post_care_declined)
        )
        return self.take_effects()

    # ------------------------------------------------------------ checks

    def _session(self) -> Ledger:
        ledger = self.ledger
        if ledger is None:
            raise Refused("no_session", "no session is open: `devicectl session start` first")
        return ledger

    def _identified(self) -> Ident:
        if self.ident is None:
            raise _NotIdentified()
        return self.ident

    def _ingredient(self, request: StartSession) -> str:
        preset = self.policy.presets[request.preset] if request.preset else None
        ingredient = request.active_ingredient or (preset.active_ingredient if preset else None)
        if ingredient is None:
            raise Refused(
                "no_ingredient",
                "name the active ingredient (--ingredient) or a --preset",
                kind="usage",
            )
        return ingredient

    def _resolve_params(self, request: SetParams) -> PulseParams:
        """The parameters asked for (each field given, or kept), refused if a limit forbids."""
        base = self.chosen or self._preset
        if request.preset is not None:
            base = self.policy.presets[request.preset].params()
        fields = {
            "energy_uj": request.energy_uj,
            "width_us": request.width_us,
            "rate_mhz": request.rate_mhz,
            "spot_um": request.spot_um,
        }
        missing = [k for k, v in fields.items() if v is None]
        if base is None and missing:
            raise Refused(
                "params_missing", f"give {', '.join(missing)} (or --preset)", kind="usage"
            )
        values = {k: v if v is not None else getattr(base, k) for k, v in fields.items()}
        params = PulseParams(**values)
        self._limits(params)
        return params

    def _check_arm(self, request: ArmLaser) -> PulseParams:
        self._require(request)
        chosen = self.chosen
        assert chosen is not None
        self._limits(chosen)
        return chosen

    def _limits(self, params: PulseParams) -> Limits:
        """Every limit checkable before emission (docs/safety-model.md)."""
        ident = self._identified()
        ledger = self._session()
        assert self.zone is not None
        return check_params(ident, self.policy, ledger.skin_type, self.zone, params)

    def _load_limits(self) -> None:
        """The limits in force follow what the device runs: the acknowledged parameters and the
        session's zone (its budget carried over from earlier visits)."""
        supervisor, ledger, zone, acked = self.supervisor, self.ledger, self.zone, self.acked
        if supervisor is None or ledger is None or zone is None or acked is None:
            return
        assert self.ident is not None
        supervisor.set_zone(
            zone, compile_limits(self.ident, self.policy, ledger.skin_type, zone, acked)
        )

    def _armed_at_ack(self) -> None:
        """ARM's ACK: armed, judged against the parameters the device acknowledged last."""
        supervisor = self.supervisor
        acked = self.acked
        if supervisor is None or acked is None or self.zone is None or self.ledger is None:
            self._out.append(STOP)
            return
        try:
            self._limits(acked)
            self._load_limits()
            supervisor.arm()
        except (Refused, SafetyRefusal, DevicectlError):
            self._out.append(STOP)  # a limit changed between the check and the ACK
            return
        self.armed = True
        self._out.append(Heartbeats(self.lease_ms))

    # ------------------------------------------------------------ helpers

    def _send_params(self, step: _Step, params: PulseParams, then: str) -> list[Effect]:
        step.stage = "params_for_arm" if then == "arm" else "params"
        step.params = params
        step.sent = MessageType.SET_PARAMS
        self._sent = params
        self._out.append(Send(params.as_command()))
        return self.take_effects()

    def _params_applied(self, step: _Step, actor: str) -> dict[str, object]:
        params = step.params
        assert params is not None
        ledger = self._session()
        self.chosen = params
        # Fluence is reckoned at the spot of the parameters recorded last (as the log does).
        ledger.at_spot(params.spot_um)
        self._out.append(RecordParams(ledger.id, params, actor))
        self._out.append(SessionEvent(ledger.id, "params", params_dict(params)))
        return {"params": params_dict(params), "fluence_j_cm2": round(params.fluence_j_cm2, 3)}

    def _finish(self, result: Mapping[str, object]) -> list[Effect]:
        self._step = None
        self.busy = None
        self._out.append(Reply(dict(result)))
        return self.take_effects()

    def _fail(self, failure: DevicectlError) -> list[Effect]:
        """The command failed on the link, or the device refused it: that is the reply."""
        self._step = None
        self.busy = None
        self._out.append(_PUBLISH_STATE)
        self._out.append(Refuse(failure))
        return self.take_effects()

    def _fail_refused(self, request: Request, error: DevicectlError) -> list[Effect]:
        self._step = None
        self.busy = None
        return self._refuse(request, error)

    def _refuse(self, request: Request, error: DevicectlError) -> list[Effect]:
        if isinstance(error, _NotIdentified):
            self._out.append(Refuse(error))
            return self.take_effects()
        self._audit_refusal(_NAMES[type(request)], request.actor, error)
        self._out.append(Refuse(error))
        return self.take_effects()

    def _audit_refusal(self, command: str, actor: str, error: DevicectlError) -> None:
        """A refused request is an audit record of the session it was made in."""
        detail: dict[str, object] = {"command": command, "error": str(error)}
        rule = getattr(error, "rule", None)
        if rule is not None:
            detail["rule"] = rule
        self._record("refused", actor, detail)

    def _record(
        self, kind: str, actor: str, detail: Mapping[str, object], reason: str | None = None
    ) -> None:
        session = self.session_id
        if kind in FAULT_EVENT_KINDS and self.ledger is not None:
            self.ledger.faults += 1
        self._out.append(RecordEvent(session, kind, actor, detail, reason))

    def _unsupervised(self, pulse_no: int, energy_uj: int) -> None:
        """A PULSE before the device identified itself: STOP; record the dose."""
        self._record("uncommanded_emission", "device", {
            "pulse_no": pulse_no, "energy_uj": energy_uj,
        })  # fmt: skip
        self._out.append(Alert(
            "critical", "uncommanded_emission",
            f"pulse {pulse_no} before the device identified itself", session=self.session_id,
        ))  # fmt: skip

    def _record_gap(self, first: int, last: int) -> None:
        """Pulses ``first..last`` were fired and never seen: charged at the device's maximum
        energy to the session's zone (the supervisor has charged its budgets and window)."""
        ident = self.ident
        assert ident is not None
        ledger = self.ledger
        count = last - first + 1
        charge = ident.max_energy_uj
        cause = "link_gap" if self._gap_open_since is not None else "pulse events lost on the link"
        if ledger is not None:
            ledger.unlogged_pulses += count
            ledger.unlogged_energy_uj += count * charge
            ledger.charge(self.zone_name, count * charge)
            ledger.faults += 1
        self._out.append(RecordGap(self.session_id, first, last, charge, self.zone_name, cause))

    def _charge_lost(self, device_count: int) -> None:
        """The device counts pulses beyond the last seen: lost on the wire (or while the link was
        down). Charged to the ledger and to every rule of the supervisor, now."""
        first = self._last_no + 1
        self._last_no = device_count
        self._record_gap(first, device_count)
        supervisor = self.supervisor
        if supervisor is not None and supervisor.charge_gap(first, device_count):
            self._out.insert(0, STOP)
            self.armed = False
            self._breach()

    def _new_supervisor(self, ident: Ident) -> SafetySupervisor:
        """One per session (and per identified device until a session starts). A latched breach
        outlives the supervisor that latched it: only an operator's acknowledgement clears it."""
        supervisor = SafetySupervisor.for_device(ident, self.policy)
        previous = self.supervisor
        supervisor.inherit_latch(previous.latched if previous else self._restored_latch)
        self._restored_latch = None
        if self._last_no >= 0:
            supervisor.follow_on(self._last_no)
        return supervisor

    def _breach(self) -> None:
        """After STOP: record, alert, publish (the supervisor has latched already)."""
        supervisor = self.supervisor
        breach = supervisor.last_breach if supervisor else None
        if breach is None:
            return
        session = self.session_id
        if supervisor is not None and supervisor.latched is breach:
            self.latch_session = session
        detail = breach.as_dict() | {"session": session}
        # "breach" is what the session log counts as a fault; repeats are recorded apart.
        self._record("breach_repeat" if breach.repeat else "breach", "devicectl", detail)
        if breach.repeat:
            # The same rule again since the latch (pulses already in flight when STOP was
            # written): recorded above, but one incident raises one alert.
            return
        self._out.append(Alert(
            _ALERT_SEVERITY.get(breach.severity.value, "critical"), breach.alert_code,
            breach.message, value=breach.value, limit=breach.limit, session=session,
        ))  # fmt: skip
        if session is not None:
            self._out.append(SessionEvent(session, "fault", breach.as_dict()))
        self._out.append(LogLine("error", "safety_breach", breach.as_dict()))
        self._out.append(_PUBLISH_STATE)


@dataclass(slots=True)
class _Step:
    """Where an operator request stands between its request and its reply."""

    request: Request
    stage: str = "start"
    params: PulseParams | None = None
    ingredient: str = ""
    sent: int | None = None  # the command TYPE awaiting its outcome
    faults: list[str] = field(default_factory=list)  # the device's, when an ack began
    result: dict[str, object] = field(default_factory=dict)
    stopped: bool = False  # a STOP was written since the request began: it must not arm


class _NotIdentified(LinkError):
    def __init__(self) -> None:
        super().__init__("the device has not identified itself yet")


@dataclass(frozen=True, slots=True)
class _Need:
    """A state a request needs: ``rule`` names the refusal, ``says`` explains it."""

    rule: str
    holds: Callable[[TreatmentCore], bool]
    says: Callable[[TreatmentCore, Request], str]


def _latched_breach(core: TreatmentCore, _request: Request) -> str:
    latched = core.latched
    where = f" in session {core.latch_session}" if core.latch_session else ""
    what = latched.message if latched is not None else ""
    return f"a breach latched{where} is not acknowledged ({what}): acknowledge it ({ACK_COMMAND})"


_IDENTIFIED = _Need("identified", lambda c: c.ident is not None, lambda c, r: "")
_NO_SESSION = _Need(
    "session_open",
    lambda c: c.ledger is None,
    lambda c, r: f"session {c.session_id} is still open: end it first",
)
_SESSION = _Need(
    "no_session",
    lambda c: c.ledger is not None,
    lambda c, r: "no session is open: `devicectl session start` first",
)
_ZONE = _Need(
    "no_zone",
    lambda c: c.zone is not None,
    lambda c, r: "no zone chosen: `devicectl session zone ZONE` first",
)
_PARAMS = _Need(
    "no_params",
    lambda c: c.chosen is not None,
    lambda c, r: "no parameters set: `devicectl params set ...` first",
)
_DISARMED = _Need(
    "disarm_first",
    # The device may fire until STOP's or DISARM's ACK (the supervisor is armed until then), a
    # link lost while armed included: those pulses belong to the zone and parameters in force.
    lambda c: not (c.armed or c.arming or (c.supervisor is not None and c.supervisor.armed)),
    lambda c, r: (
        "disarm before changing zone: a new zone's limits and budget apply from the next arming"
        if isinstance(r, ChangeZone)
        else "disarm before changing parameters"
    ),
)
_NO_BREACH = _Need("breach_latched", lambda c: c.latched is None, _latched_breach)
_NO_DEVICE_FAULT = _Need(
    "device_fault",
    lambda c: not c.device_fault,
    lambda c, r: (
        f"the device has latched {', '.join(fault_names(c.device_fault))}: clear it with "
        f"`{ACK_COMMAND}`"
    ),
)
_SOMETHING_LATCHED = _Need(
    "nothing_latched",
    lambda c: c.latched is not None or bool(c.device_fault),
    lambda c, r: "no breach is latched and the device holds no fault: nothing to acknowledge",
)

# What each operator request needs, checked in this order; the first that does not hold refuses it
# (audited as a ``refused`` record). The limits (check_params) are judged after these.
_REQUIRES: Final[dict[type, tuple[_Need, ...]]] = {
    StartSession: (_NO_SESSION, _NO_BREACH, _IDENTIFIED),
    ChangeZone: (_SESSION, _DISARMED),
    SetParams: (_SESSION, _ZONE, _DISARMED),
    ArmLaser: (_SESSION, _ZONE, _PARAMS, _NO_BREACH, _NO_DEVICE_FAULT),
    DisarmLaser: (),
    AckFault: (_SOMETHING_LATCHED,),
    EndSession: (_SESSION,),
}

_NAMES: Final[dict[type, str]] = {
    StartSession: "session_start",
    ChangeZone: "session_zone",
    SetParams: "params_set",
    ArmLaser: "arm",
    DisarmLaser: "disarm",
    AckFault: "fault_ack",
    EndSession: "session_end",
}


def params_dict(params: PulseParams) -> dict[str, object]:
    """Parameters as the operator reads them (rate in Hz)."""
    return {
        "energy_uj": params.energy_uj,
        "width_us": params.width_us,
        "rate_hz": params.rate_mhz / 1000,
        "spot_um": params.spot_um,
    }


def _code_name(code: int) -> str:
    try:
        return FaultCode(code).name.lower()
    except ValueError:
        return f"fault_{code}"
