"""The daemon's local control API: a Unix socket speaking JSON lines (docs/control-api.md).

One request per line, one reply per line::

    -> {"command": "arm", "auth": {"user": "OP-7", "pin": "..."}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "kind": "refused", "error": "one line naming the cause", "rule": ..., ...}

``kind`` tells the CLI which exit code to use: ``refused`` (1: a limit or a state said no),
``usage`` (2: the request itself was malformed) or ``unreachable`` (3: the device cannot be
reached). Requests are validated with pydantic at this edge; a malformed one gets an error reply
and never disturbs the daemon. The socket file is created with mode 0660, so only its owner and
group may drive the laser.

Who asks: every request that changes a treatment (an :class:`IdentifiedRequest`) carries ``auth``,
a registered user's id and PIN, and, for a contraindication override or a breach acknowledgement,
a supervisor's ``signoff``. The server checks them here, at the edge
(:class:`~devicectl.users.Authenticator`), and hands the daemon the request with its verified
``actor`` in place of the secrets, and ``received`` (the daemon's count of STOPs when its line was
read, so that an ``arm`` read before a ``stop`` never arms after it); a request that arrives with
an ``actor`` or ``received`` of its own is refused.
``stop`` and ``disarm`` make the laser safer and never wait for a PIN; ``status`` only reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import grp
import json
import os
import resource
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TypeVar

import structlog
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from devicectl.errors import DevicectlError, LinkError
from devicectl.realtime import step_below
from devicectl.users import (
    ACK_REASON_CODES,
    OVERRIDE_REASON_CODES,
    READABLE,
    Actor,
    Authenticator,
    AuthRefused,
    Credentials,
    SignOffCredentials,
)

__all__ = [
    "CONTROL_STALL_S",
    "IDLE_TIMEOUT_S",
    "MAX_CLIENTS",
    "MAX_REQUEST_BYTES",
    "ControlError",
    "ControlRequest",
    "ControlServer",
    "ControlThread",
    "DaemonLoop",
    "DaemonUnreachable",
    "IdentifiedRequest",
    "call_daemon",
    "client_cap",
    "stop_socket_path",
]

MAX_REQUEST_BYTES = 64 * 1024
SOCKET_MODE = 0o660


class ControlError(DevicectlError):
    """A request the daemon answered with an error; ``kind`` maps to the CLI's exit code."""

    def __init__(self, kind: str, message: str, **facts: Any) -> None:
        self.kind, self.facts = kind, facts
        super().__init__(message)


class DaemonUnreachable(DevicectlError):
    """No daemon answers at the control socket."""

    def __init__(self, path: Path, cause: str) -> None:
        self.path = path
        super().__init__(f"cannot reach the daemon at {path}: {cause}")


# ---------------------------------------------------------------- requests

_ROMAN = ("I", "II", "III", "IV", "V", "VI")


def _fitzpatrick(value: object) -> object:
    """A Fitzpatrick skin type as 1-6, I-VI or i-vi (as the policy file writes it) -> "I".."VI";
    anything else is left for the Literal to refuse."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 6:
        return _ROMAN[value - 1]
    if isinstance(value, str):
        text = value.strip()
        if text in {"1", "2", "3", "4", "5", "6"}:
            return _ROMAN[int(text) - 1]
        if text.upper() in _ROMAN:
            return text.upper()
    return value


SkinType = Annotated[Literal["I", "II", "III", "IV", "V", "VI"], BeforeValidator(_fitzpatrick)]
Zone = Literal["forehead", "periorbital", "perioral", "cheeks", "neck", "decollete", "hands"]
Concern = Literal["fine_lines", "laxity", "acne_scars", "pigmentation", "dehydration", "sun_damage"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusRequest(_Request):
    command: Literal["status"]


class IdentifiedRequest(_Request):
    """A request that changes the treatment: ``auth`` names a registered user and proves it.
    The control server replaces ``auth`` (and any sign-off's PIN) by the verified ``actor``."""

    auth: Credentials | None = None
    actor: Actor | None = None
    # ControlServer's ``received()`` when the line was read (before the PIN was checked): set by
    # the server, never sent
    received: int | None = None

    def signoff_needed(self) -> tuple[str, dict[str, str]] | None:
        """Why this request needs a supervisor's sign-off and the reason codes it may give, or
        None when it needs none."""
        return None

    def signoff_credentials(self) -> SignOffCredentials | None:
        return None


class Checklist(_Request):
    consultation_done: bool
    consent_given: bool
    area_cleaned: bool
    numbing_applied: bool
    recent_sun_exposure: bool
    photosensitising_medication: bool
    active_skin_infection: bool
    pregnancy: bool
    allergy_to_active_ingredient: bool

    def contraindications_present(self) -> list[str]:
        answers = {
            "recent sun exposure or tan": self.recent_sun_exposure,
            "photosensitising medication": self.photosensitising_medication,
            "active skin infection": self.active_skin_infection,
            "pregnancy": self.pregnancy,
            "allergy to the active ingredient": self.allergy_to_active_ingredient,
        }
        return [name for name, present in answers.items() if present]


class Numbing(_Request):
    agent: Annotated[str, Field(min_length=1, max_length=100), READABLE]
    contact_min: Annotated[int, Field(ge=1, le=180)]


class Ingredient(_Request):
    """The active ingredient as delivered: its name (default: the preset's), amount and lot."""

    name: Annotated[str, Field(min_length=1, max_length=64), READABLE] | None = None
    amount: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
    unit: Literal["ml", "mg"] = "ml"
    lot: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._/-]+$")]


class SessionStartRequest(IdentifiedRequest):
    command: Literal["session_start"]
    patient_ref: Annotated[str, Field(min_length=1, max_length=64)]
    skin_type: SkinType
    concerns: Annotated[list[Concern], Field(min_length=1)]
    course_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # What the operator believes; the log's history decides, and a disagreement is a warning.
    course_session: Annotated[int, Field(ge=1, le=99)] | None = None
    course_planned: Annotated[int, Field(ge=4, le=6)] = 4
    ingredient: Ingredient
    preset: Concern | None = None
    checklist: Checklist
    numbing: Numbing | None = None
    signoff: SignOffCredentials | None = None

    def signoff_needed(self) -> tuple[str, dict[str, str]] | None:
        present = self.checklist.contraindications_present()
        if not present:
            return None
        return f"treating despite {', '.join(present)}", OVERRIDE_REASON_CODES

    def signoff_credentials(self) -> SignOffCredentials | None:
        return self.signoff


class SessionZoneRequest(IdentifiedRequest):
    command: Literal["session_zone"]
    zone: Zone


PostCareItem = Literal["serum_or_moisturiser", "avoid_sun", "sunscreen", "gentle_skincare"]


class SessionEndRequest(IdentifiedRequest):
    """Post-care is required: the items given, or why it was declined."""

    command: Literal["session_end"]
    post_care: list[PostCareItem] = []
    post_care_declined: Annotated[str, Field(min_length=10, max_length=500), READABLE] | None = None

    @model_validator(mode="after")
    def _post_care_answered(self) -> Self:
        if bool(self.post_care) == (self.post_care_declined is not None):
            raise ValueError(
                "give the post-care advice (serum_or_moisturiser, avoid_sun, sunscreen, "
                "gentle_skincare) or why it was declined, not both or neither"
            )
        return self


Severity = Literal["none", "mild", "moderate", "severe"]


class SessionNoteRequest(IdentifiedRequest):
    """A clinician's note, the immediate skin reaction or an adverse event, appended to a session
    (the open one, else ``session``) as a record of its own: never an edit."""

    command: Literal["session_note", "session_reaction", "session_adverse_event"]
    session: Annotated[int, Field(ge=1)] | None = None
    text: Annotated[str, Field(min_length=1, max_length=2000), READABLE] | None = None
    erythema: Severity | None = None
    oedema: Severity | None = None
    severity: Literal["mild", "moderate", "severe", "serious"] | None = None
    action_taken: Annotated[str, Field(min_length=1, max_length=1000), READABLE] | None = None

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> Self:
        required, optional = _CLINICAL_FIELDS[self.command]
        given = {name for name in _CLINICAL_ENTRY if getattr(self, name) is not None}
        if missing := required - given:
            raise ValueError(f"{self.command} needs {', '.join(sorted(missing))}")
        if extra := given - required - optional:
            raise ValueError(f"{self.command} takes no {', '.join(sorted(extra))}")
        return self


# What each clinical entry needs, and what else it may carry.
_CLINICAL_ENTRY = ("text", "erythema", "oedema", "severity", "action_taken")
_CLINICAL_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "session_note": ({"text"}, set()),
    "session_reaction": ({"erythema", "oedema"}, {"text"}),
    "session_adverse_event": ({"severity", "text"}, {"action_taken"}),
}


class ParamsSetRequest(IdentifiedRequest):
    command: Literal["params_set"]
    # Bounded by the SET_PARAMS fields (u32, u16), not by a limit: a value that fits the wire
    # is judged by the safety rules and refused naming the rule and the bound (exit 1).
    energy_uj: Annotated[int, Field(ge=1, le=0xFFFF_FFFF)] | None = None
    width_us: Annotated[int, Field(ge=1, le=0xFFFF_FFFF)] | None = None
    rate_hz: Annotated[float, Field(gt=0, le=0xFFFF_FFFF / 1000, allow_inf_nan=False)] | None = None
    spot_um: Annotated[int, Field(ge=1, le=0xFFFF)] | None = None
    preset: Concern | None = None


class ArmRequest(IdentifiedRequest):
    command: Literal["arm"]


class DisarmRequest(_Request):
    """Always allowed (it makes the laser safer); ``auth``, when given, names who disarmed."""

    command: Literal["disarm"]
    auth: Credentials | None = None
    actor: Actor | None = None


class StopRequest(_Request):
    command: Literal["stop"]


class FaultAckRequest(IdentifiedRequest):
    """A supervisor signs off the breach: ``signoff`` carries the reason code and the reason."""

    command: Literal["fault_ack"]
    signoff: SignOffCredentials | None = None

    def signoff_needed(self) -> tuple[str, dict[str, str]] | None:
        return "acknowledging a safety breach", ACK_REASON_CODES

    def signoff_credentials(self) -> SignOffCredentials | None:
        return self.signoff


ControlRequest = Annotated[
    StatusRequest
    | SessionStartRequest
    | SessionZoneRequest
    | SessionEndRequest
    | ParamsSetRequest
    | ArmRequest
    | DisarmRequest
    | StopRequest
    | FaultAckRequest
    | SessionNoteRequest,
    Field(discriminator="command"),
]
_REQUEST = TypeAdapter[Any](ControlRequest)
_COMMANDS = frozenset(
    {
        "status", "session_start", "session_zone", "session_end", "params_set", "arm", "disarm",
        "stop", "fault_ack", "session_note", "session_reaction", "session_adverse_event",
    }
)  # fmt: skip

Handler = Callable[[Any], Awaitable[dict[str, Any]]]


def _describe(exc: ValidationError) -> str:
    """One line an operator can act on: the field as the request names it, the value, what is
    allowed; never pydantic's location path (``session_start.concerns.0``)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if loc and loc[0] in _COMMANDS:  # the discriminator's tag: which request, not where in it
        loc = loc[1:]
    names = [p for p in loc if not p.isdigit()]
    field = names[-1] if names else "request"
    if names[:1] == ["checklist"] and len(names) > 1:
        field = f"checklist item {names[-1]}"
    message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix, not a cause
    message = message[:1].lower() + message[1:]
    if first["type"] == "missing":
        return f"invalid request: {field} is required"
    if first["type"] == "extra_forbidden":
        return f"invalid request: {field} is not a known field"
    if first["type"] == "union_tag_invalid":
        return f"invalid request: unknown command {first['input'].get('command')!r}"
    if not names:  # a rule over the whole request: the rule, never the request (its PIN) back
        return f"invalid request: {message}"
    if field == "pin":  # a secret: never echoed
        return f"invalid request: pin is not allowed: {message}"
    if field == "skin_type":
        message = "a Fitzpatrick skin type is 1-6, I-VI or i-vi"
    return f"invalid request: {field} {first['input']!r} is not allowed: {message}"


def parse_request(line: bytes) -> Any:
    """The validated request in ``line``; raises ControlError(kind='usage') naming the problem."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError("usage", f"request is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ControlError("usage", "request must be a JSON object")
    if "command" not in data:
        raise ControlError("usage", "request has no 'command'")
    if "actor" in data:
        raise ControlError(
            "usage", "invalid request: actor: set by the daemon from `auth`, never sent"
        )
    if "received" in data:
        raise ControlError("usage", "invalid request: received: set by the daemon, never sent")
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ControlError("usage", _describe(exc)) from exc


# ---------------------------------------------------------------- server

MAX_CLIENTS = 64  # control connections served at once, at most (see ControlServer)
IDLE_TIMEOUT_S = 60.0  # a connection with no request for this long is closed
STOP_LANE_CLIENTS = 8  # connections on the stop socket at once
STOP_REQUEST_TIMEOUT_S = 1.0  # a stop-socket connection must send its request within this
# The control socket's thread must answer the daemon's loop within this, or the daemon stops
# (ControlThread): both sockets, the stop lane too, are served there, and nothing else watches it.
CONTROL_STALL_S = 5.0
_FD_RESERVE = 64  # file descriptors kept for the rest of the daemon (log, outbox, port, broker)
_BACKLOG = 128
_ACCEPT_BACKOFF_S = (0.05, 1.0)  # first and longest pause after a failed accept()
_ACCEPT_QUIET_S = 10.0  # accept() failures this far apart are separate episodes


def stop_socket_path(control: Path) -> Path:
    """The socket beside ``control`` accepting only ``stop``: ``ctl.sock`` -> ``ctl-stop.sock``."""
    return control.with_name(f"{control.stem}-stop.sock")


def client_cap(max_clients: int = MAX_CLIENTS) -> int:
    """``max_clients``, lowered so that every control connection and the stop lane together
    leave the daemon at least half its open-file limit beyond a fixed reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_clients
    return max(1, min(max_clients, (soft - _FD_RESERVE) // 2 - STOP_LANE_CLIENTS))


class ControlServer:
    """Serves the control socket; each request is handed to ``handler`` and answered.

    Who may drive the laser: the socket is created 0660 and owned by the daemon's user, which is
    checked after creation, in a directory nobody else may replace it in. With ``group`` set, the
    socket belongs to that group and every connection's peer (SO_PEERCRED) must be root, the
    daemon's own user, or a member of the group; anyone else is refused and the refusal audited.

    Bounded whatever connects: at most ``max_clients`` connections are served at once (lowered
    by :func:`client_cap` to fit the open-file limit), one more is answered at once with an
    error saying so and closed; a connection idle for ``idle_timeout_s`` is closed. STOP has a
    lane of its own that a full main socket cannot block: the socket :func:`stop_socket_path`
    (same owner, group and mode) accepts only ``{"command": "stop"}``, at most
    ``STOP_LANE_CLIENTS`` at once, each given ``STOP_REQUEST_TIMEOUT_S`` to send it (with the
    lane full, the oldest still without its request is closed to make room for a new one);
    ``devicectl stop`` uses it. Both sockets are accepted from by a loop of our own (not
    ``asyncio.start_unix_server``), so an ``accept()`` that fails for want of a resource
    (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged once per episode (and every 10 s while it
    lasts) and retried after a growing pause, never in a tight loop.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        group: str | None = None,
        authenticator: Authenticator | None = None,
        log: Any = None,
        max_clients: int = MAX_CLIENTS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        stop_path: Path | None = None,
        received: Callable[[], int] | None = None,
    ) -> None:
        self.path = path
        self.stop_path = stop_path if stop_path is not None else stop_socket_path(path)
        self._handler = handler
        # taken when a request's line is read, put on an identified request as ``received``
        self._received = received
        self._authenticator = authenticator
        self._gid = grp.getgrnam(group).gr_gid if group is not None else None
        self.refused_peers = 0
        self.max_clients = client_cap(max_clients)
        self.idle_timeout_s = idle_timeout_s
        self.turned_away = 0  # connections answered "busy" at the cap
        self._log = log or structlog.get_logger("devicectl.control")
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._clients: set[asyncio.Task[None]] = set()
        self._stop_clients: set[asyncio.Task[None]] = set()
        # set whenever the stop lane has room, or a connection in it that may be closed for room
        self._stop_slot = asyncio.Event()
        self._stop_slot.set()
        # stop-lane connections that have not sent their request yet, oldest first
        self._stop_waiting: dict[asyncio.Task[None], None] = {}
        self._stop_evicting: set[asyncio.Task[None]] = set()
        self.stop_evicted = 0  # of them, closed to make room for a newer one
        self._crowded = 0  # closed so in the current episode of a full lane
        self._busy_since_admit = 0  # turned away since the last connection was admitted

    @property
    def clients(self) -> int:
        """Connections being served on the main socket."""
        return len(self._clients)

    @property
    def stop_lane_clients(self) -> int:
        """Connections being served on the stop socket."""
        return len(self._stop_clients)

    async def __aenter__(self) -> ControlServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _check_directory(self.path.parent)
        _check_directory(self.stop_path.parent)
        for path in (self.path, self.stop_path):
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise DevicectlError(f"control socket path {path} exists and is not a socket")
                if _socket_alive(path):
                    raise DevicectlError(f"another daemon is already listening on {path}")
                path.unlink()
        try:
            main = self._listen(self.path)
            stop = self._listen(self.stop_path)
        except BaseException:
            self._close_sockets()
            for path in (self.path, self.stop_path):
                if path.is_socket():
                    path.unlink()
            raise
        self._acceptors = [
            asyncio.create_task(self._accept(main, self._admit), name="control-accept"),
            asyncio.create_task(self._accept(stop, self._admit_stop), name="control-accept-stop"),
        ]
        self._log.info(
            "control_listening",
            path=str(self.path),
            stop_path=str(self.stop_path),
            mode=oct(SOCKET_MODE),
            gid=self._gid,
            max_clients=self.max_clients,
            idle_timeout_s=self.idle_timeout_s,
        )
        return self

    def _listen(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sockets.append(sock)
        old_umask = os.umask(0o117)  # create the socket 0660 atomically, never world-writable
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(path, -1, self._gid)
        os.chmod(path, SOCKET_MODE)
        _check_socket(path, self._gid)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
        return sock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        self._close_sockets()
        clients = [*self._clients, *self._stop_clients]
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for path in (self.path, self.stop_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def _accept(
        self, listener: socket.socket, admit: Callable[[socket.socket], Awaitable[None]]
    ) -> None:
        """Accept connections for ever; ``admit`` decides what becomes of each.

        An episode of failures (each less than ``_ACCEPT_QUIET_S`` after the previous one) is
        logged when it starts, every ``_ACCEPT_QUIET_S`` while it lasts, and at the first
        accept after it ended: a handful of lines, however long it lasts."""
        loop = asyncio.get_running_loop()
        first_pause, longest = _ACCEPT_BACKOFF_S
        pause = first_pause
        failed = 0  # in this episode
        last_failure = reported = 0.0
        while True:
            try:
                conn, _address = await loop.sock_accept(listener)
            except OSError as exc:  # out of a resource: the connection waits in the backlog
                now = loop.time()
                if failed and now - last_failure >= _ACCEPT_QUIET_S:
                    self._accept_recovered(listener, failed)
                    failed = 0
                if not failed or now - reported >= _ACCEPT_QUIET_S:
                    self._log.error(
                        "control_accept_failed" if not failed else "control_accept_failing",
                        path=listener.getsockname(),
                        error=exc.strerror or repr(exc),
                        failures=failed + 1,
                        retry_s=pause,
                    )
                    reported = now
                failed += 1
                last_failure = now
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
                continue
            pause = first_pause
            if failed and loop.time() - last_failure >= _ACCEPT_QUIET_S:
                self._accept_recovered(listener, failed)
                failed = 0
            await admit(conn)

    def _accept_recovered(self, listener: socket.socket, failures: int) -> None:
        self._log.warning(
            "control_accept_recovered", path=listener.getsockname(), failures=failures
        )

    async def _admit(self, conn: socket.socket) -> None:
        if len(self._clients) >= self.max_clients:
            self._turn_away(conn)
            return
        if self._busy_since_admit:
            self._log.info("control_busy_ended", turned_away=self._busy_since_admit)
            self._busy_since_admit = 0
        self._start(conn, self._clients, self._serve_client, "control-client")

    async def _admit_stop(self, conn: socket.socket) -> None:
        """Connections that only hold the lane must not keep a stop out: with the lane full, the
        oldest one still without its request is closed to make room (a stop request is one
        short line, sent at once). Only when every slot is answering a stop (or still setting up
        its connection) does accepting wait for one, and the kernel's backlog hold the rest."""
        if len(self._stop_clients) >= STOP_LANE_CLIENTS and self._stop_waiting:
            oldest = next(iter(self._stop_waiting))
            del self._stop_waiting[oldest]
            self._stop_evicting.add(oldest)
            oldest.cancel()
            if not self._crowded:  # an episode: one line when it starts, one when it ends
                self._log.warning("control_stop_lane_crowded", slots=STOP_LANE_CLIENTS)
            self._crowded += 1
            self.stop_evicted += 1
        elif self._crowded and len(self._stop_clients) < STOP_LANE_CLIENTS:
            self._log.info("control_stop_lane_crowded_ended", closed=self._crowded)
            self._crowded = 0
        self._start(conn, self._stop_clients, self._serve_stop, "control-stop-client")
        # let it read its request before the next connection is accepted (an accept that
        # succeeds at once does not yield to the loop)
        await asyncio.sleep(0)
        # a connection becomes one to close only once it waits for its request (_serve_stop),
        # never while its stream is still being set up, with its stop perhaps already sent
        while len(self._stop_clients) >= STOP_LANE_CLIENTS and not self._stop_waiting:
            self._stop_slot.clear()
            await self._stop_slot.wait()

    def _start(
        self,
        conn: socket.socket,
        lane: set[asyncio.Task[None]],
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        name: str,
    ) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    sock=conn, limit=MAX_REQUEST_BYTES
                )
            except BaseException:  # refused, or closed to make room before it started
                conn.close()
                raise
            await serve(reader, writer)

        task = asyncio.create_task(run(), name=name)
        lane.add(task)
        task.add_done_callback(lambda done: self._finished(lane, done))
        return task

    def _finished(self, lane: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        lane.discard(task)
        self._stop_waiting.pop(task, None)
        self._stop_evicting.discard(task)
        if lane is self._stop_clients and len(lane) < STOP_LANE_CLIENTS:
            self._stop_slot.set()

    def _turn_away(self, conn: socket.socket) -> None:
        """At the cap: say so in one line and close, without reading (never blocks)."""
        self.turned_away += 1
        if not self._busy_since_admit:
            self._log.warning(
                "control_busy", max_clients=self.max_clients, stop_path=str(self.stop_path)
            )
        self._busy_since_admit += 1
        reply = _reply_error(
            "unreachable",
            f"the daemon is already serving its maximum of {self.max_clients} control "
            f"connections; try again (a stop still gets through on {self.stop_path})",
        )
        with contextlib.suppress(OSError):
            conn.send(reply)
        conn.close()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if await self._refused_peer(reader, writer):
                return
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        line = await reader.readline()
                except TimeoutError:
                    writer.write(
                        _reply_error("usage", f"no request for {self.idle_timeout_s:g} s: closed")
                    )
                    await writer.drain()
                    return
                except ValueError:  # a line longer than the limit
                    writer.write(_reply_error("usage", "request too long"))
                    await writer.drain()
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                writer.write(await self._answer(line))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only the server cancels its clients, when it closes: end normally, e.g. a client
            # whose PIN was being checked at shut-down.
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_stop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The stop lane: one request, which must be ``stop``, within STOP_REQUEST_TIMEOUT_S."""
        task = asyncio.current_task()
        if task is not None:  # from now on it may be closed to make room (_admit_stop)
            self._stop_waiting[task] = None
            self._stop_slot.set()
        try:
            if await self._refused_peer(reader, writer):
                return
            try:
                async with asyncio.timeout(STOP_REQUEST_TIMEOUT_S):
                    line = await reader.readline()
            except (TimeoutError, ValueError):
                writer.write(_reply_error("usage", "no stop request in time: closed"))
                await writer.drain()
                return
            except asyncio.CancelledError:
                if task is None or task not in self._stop_evicting:
                    raise  # the server is closing
                task.uncancel()
                # closed to make room: unless its request came in meanwhile (received, but the
                # task not yet woken to read it), which is then served; a buffered line is read
                # without waiting, so a zero timeout only turns away one not (all) there
                try:
                    async with asyncio.timeout(0):
                        line = await reader.readline()
                except (TimeoutError, ValueError):
                    writer.write(  # a stop is idempotent: call_daemon sends it again
                        _reply_error(
                            "unreachable",
                            "no stop request yet, and the stop lane is full: closed",
                            retry=True,
                        )
                    )
                    return
            finally:
                if task is not None:  # its request is in (or it is done): no longer evictable
                    self._stop_waiting.pop(task, None)
                    self._stop_evicting.discard(task)
            if not line.strip():
                return
            try:
                request = parse_request(line)
            except ControlError as exc:
                writer.write(_reply_error(exc.kind, str(exc)))
            else:
                if isinstance(request, StopRequest):
                    writer.write(await self._answer(line))
                else:
                    writer.write(
                        _reply_error(
                            "usage",
                            f"{self.stop_path} accepts only stop; use {self.path} for "
                            f"{request.command!r}",
                        )
                    )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refused_peer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer a peer that may not use the socket (after its request, so that it reads the
        answer rather than a broken pipe); True when refused."""
        refusal = self._refuse_peer(writer)
        if refusal is None:
            return False
        with contextlib.suppress(TimeoutError, ValueError):
            async with asyncio.timeout(STOP_REQUEST_TIMEOUT_S):
                await reader.readline()
        writer.write(_reply_error("refused", refusal))
        await writer.drain()
        return True

    def _refuse_peer(self, writer: asyncio.StreamWriter) -> str | None:
        """Why this connection's peer may not use the socket, or None when it may."""
        if self._gid is None:
            return None  # the file's mode and owner decide who can connect at all
        sock = writer.get_extra_info("socket")
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        if uid in (0, os.geteuid()) or gid == self._gid or self._gid in _groups_of(pid):
            return None
        self.refused_peers += 1
        self._log.warning("control_peer_refused", pid=pid, uid=uid, gid=gid, group=self._gid)
        return f"permission denied: uid {uid} is not in the control group (gid {self._gid})"

    async def _answer(self, line: bytes) -> bytes:
        try:
            received = self._received() if self._received is not None else None
            request = await self._identify(parse_request(line))
            if received is not None and isinstance(request, IdentifiedRequest):
                request = request.model_copy(update={"received": received})
            result = await self._handler(request)
            # encoded here, on the control thread, from what the daemon's loop handed over
            return (json.dumps({"ok": True, "result": result}, default=str) + "\n").encode()
        except ControlError as exc:
            return _reply_error(exc.kind, str(exc), **exc.facts)
        except DevicectlError as exc:
            return _reply_error(_kind_of(exc), str(exc), **_facts_of(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must never take the control socket down
            self._log.exception("control_request_failed", error=str(exc))
            return _reply_error("internal", f"internal error: {type(exc).__name__}: {exc}")

    async def _identify(self, request: Any) -> Any:
        """The request with its verified ``actor`` in place of ``auth`` and any sign-off's PIN;
        raises :class:`~devicectl.users.AuthRefused` (exit 1) when the proof does not hold."""
        auth = getattr(request, "auth", None)
        identified = isinstance(request, IdentifiedRequest)
        if not identified and auth is None:
            return request
        if self._authenticator is None:
            raise AuthRefused("auth.no_users", "this daemon has no user directory")
        signoff = request.signoff_credentials() if identified else None
        try:
            actor = await self._authenticator.actor(
                request.command,
                auth,
                signoff,
                signoff_needed=request.signoff_needed() if identified else None,
            )
        except AuthRefused:
            if identified:
                raise
            # Disarming makes the laser safer: a wrong PIN (audited) never stops it, it only
            # leaves the disarm unattributed.
            actor = None
        update: dict[str, Any] = {"auth": None, "actor": actor}
        if signoff is not None:
            update["signoff"] = None
        return request.model_copy(update=update)


_T = TypeVar("_T")


class DaemonLoop:
    """The daemon's event loop as the control thread sees it: each method turns a function of
    the daemon's loop into a coroutine function the control thread's loop can await. What it
    wraps runs on the daemon's loop, in the order it was handed over; its result or exception
    comes back; cancelling the awaiting side cancels it there."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def handler(self, handler: Handler) -> Handler:
        """``handler`` (a coroutine function of the daemon's loop), awaitable from the control
        thread's loop."""

        async def handle(request: Any) -> dict[str, Any]:
            return await handler(request)

        async def on_daemon_loop(request: Any) -> dict[str, Any]:
            return await self._there(handle(request))

        return on_daemon_loop

    def call(self, function: Callable[..., None]) -> Callable[..., Awaitable[None]]:
        """A plain function of the daemon's loop (e.g. one that records an audit event),
        awaitable from the control thread's loop: the awaiting side goes on once it has run."""

        async def run(*args: Any) -> None:
            function(*args)

        async def on_daemon_loop(*args: Any) -> None:
            await self._there(run(*args))

        return on_daemon_loop

    async def _there(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """``coroutine`` run on the daemon's loop, awaited from this thread's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))


class ControlThread:
    """A :class:`ControlServer` on a thread of its own, with its own event loop.

    The daemon's event loop is its safety loop (the device link, every PULSE's verdict, STOP,
    heartbeats). An accept storm, a thousand idle connections, a burst of malformed lines, or
    requests waiting for a PIN check must not delay it: here the control socket is accepted
    from, read, parsed, validated and answered on this thread, and only a validated request (and
    an auth refusal's audit record) crosses to the daemon's loop, through :class:`DaemonLoop`.

    The thread runs two real-time steps below the loop (:func:`~devicectl.realtime.step_below`;
    the kernel's tty workers run one below it):
    the loop preempts it, and it still runs before every ordinary process, so that it never holds
    the interpreter's lock while an ordinary process keeps it off the CPU. The loop then waits
    for that lock at most the interpreter's switch interval.

    ``make_server(daemon_loop)`` builds the server on the control thread (so that everything of
    asyncio in it belongs to that thread's loop). The server's sockets are bound before
    ``async with`` returns, and an error binding them (another daemon listening, a path that is
    not a socket) is raised there. Should the thread ever end on its own, ``on_died(cause)``
    runs on the daemon's loop: a daemon nobody can reach must not go on emitting. The same when
    the thread is alive but its loop does not answer the daemon's within ``stall_s``
    (:data:`CONTROL_STALL_S`; a call that blocks it, a loop that never yields): the systemd
    watchdog watches the daemon's loop only, and ``devicectl stop`` would fail unnoticed.
    """

    def __init__(
        self,
        make_server: Callable[[DaemonLoop], ControlServer],
        *,
        on_died: Callable[[str], None],
        log: Any = None,
        stall_s: float | None = None,
    ) -> None:
        self._make_server = make_server
        self._on_died = on_died
        self._stall_s = CONTROL_STALL_S if stall_s is None else stall_s
        self._stalled = False
        self._watch: asyncio.Task[None] | None = None
        self._log = log or structlog.get_logger("devicectl.control")
        self._ready: concurrent.futures.Future[ControlServer] = concurrent.futures.Future()
        # resolved when the thread has ended, with what ended it (None: it was asked to)
        self._ended: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()
        # resolved once the server is closed: its sockets, its clients (the thread may still
        # be finishing a PIN check's argon2 run, which nothing waits for)
        self._closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closing: asyncio.Event | None = None
        self._control_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._leaving = False
        self.server: ControlServer | None = None

    async def __aenter__(self) -> ControlThread:
        daemon_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, args=(daemon_loop,), name="control", daemon=True
        )
        self._thread.start()
        try:
            self.server = await asyncio.wrap_future(self._ready)
        except BaseException:
            self._leaving = True
            self._close()
            await asyncio.shield(asyncio.wrap_future(self._closed))
            raise

        def ended(ended: concurrent.futures.Future[BaseException | None]) -> None:
            if not self._leaving:  # the daemon's loop may be gone once it has left
                daemon_loop.call_soon_threadsafe(self._check_ended, ended)

        self._ended.add_done_callback(ended)
        self._watch = asyncio.create_task(self._watch_answers(), name="control-watch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The server closed is enough: the laser is made safe next (daemon.py), and must not
        # wait for the thread's end, which waits for a PIN check in progress (a thread of its
        # loop's executor) to finish. Shielded: a shut-down over its budget cancels this wait,
        # never the thread's own futures.
        self._leaving = True
        if self._watch is not None:
            self._watch.cancel()
        self._close()
        if self._stalled:
            return  # it would never answer: the laser is made safe without it
        await asyncio.shield(asyncio.wrap_future(self._closed))

    def _close(self) -> None:
        loop, closing = self._control_loop, self._closing
        if loop is not None and closing is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(closing.set)

    def _run(self, daemon_loop: asyncio.AbstractEventLoop) -> None:
        error: BaseException | None = None
        try:
            # below the kernel's tty workers too (`devicectl kernel-workers`: one below the
            # loop), which a busy control thread or a PIN check must not hold off
            step_below(2)
            asyncio.run(self._serve(daemon_loop))
        except BaseException as exc:  # noqa: BLE001 - handed to the daemon, which stops
            error = exc
        if not self._ready.done():
            self._ready.set_exception(
                error or DevicectlError("the control socket's thread ended at start")
            )
        if not self._closed.done():  # it ended before its server was closed, or made
            self._closed.set_result(None)
        self._ended.set_result(error)

    async def _serve(self, daemon_loop: asyncio.AbstractEventLoop) -> None:
        self._control_loop = asyncio.get_running_loop()
        self._closing = closing = asyncio.Event()
        if self._leaving:  # asked to close before the loop existed
            return
        try:
            async with self._make_server(DaemonLoop(daemon_loop)) as server:
                self._ready.set_result(server)
                await closing.wait()
        finally:
            self._closed.set_result(None)

    async def _watch_answers(self) -> None:
        """On the daemon's loop: every half of ``stall_s``, the control thread's loop must run
        a callback within ``stall_s``."""
        control_loop = self._control_loop
        assert control_loop is not None
        while True:
            await asyncio.sleep(self._stall_s / 2)
            answered: concurrent.futures.Future[None] = concurrent.futures.Future()

            def answer(answered: concurrent.futures.Future[None] = answered) -> None:
                if not answered.done():
                    answered.set_result(None)

            try:
                control_loop.call_soon_threadsafe(answer)
            except RuntimeError:  # its loop has ended: reported by _check_ended
                return
            try:
                async with asyncio.timeout(self._stall_s):
                    await asyncio.wrap_future(answered)
            except TimeoutError:
                if self._leaving:
                    return
                self._stalled = True
                self._log.error("control_thread_stalled", stall_s=self._stall_s)
                self._on_died(
                    f"the control socket's thread has not answered for {self._stall_s:g} s"
                )
                return

    def _check_ended(self, ended: concurrent.futures.Future[BaseException | None]) -> None:
        if self._leaving:
            return
        error = ended.result()
        cause = f"{type(error).__name__}: {error}" if error is not None else "it returned"
        self._log.error("control_thread_died", cause=cause)
        self._on_died(f"the control socket's thread ended ({cause})")


def _kind_of(exc: DevicectlError) -> str:
    return "unreachable" if isinstance(exc, LinkError) else "refused"


def _facts_of(exc: DevicectlError) -> dict[str, Any]:
    names = ("rule", "value", "bound", "unit", "key", "allowed", "command", "reason")
    return {n: getattr(exc, n) for n in names if hasattr(exc, n)}


def _reply_error(kind: str, message: str, **facts: Any) -> bytes:
    body = {"ok": False, "kind": kind, "error": message, **facts}
    return (json.dumps(body, default=str) + "\n").encode()


def _check_directory(directory: Path) -> None:
    """Refuse a directory where another user could replace the socket with their own."""
    info = directory.stat()
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise DevicectlError(
            f"control socket directory {directory} is world-writable without the sticky bit: "
            "anyone could replace the socket; choose another --control path"
        )


def _check_socket(path: Path, gid: int | None) -> None:
    info = path.lstat()
    mode = stat.S_IMODE(info.st_mode)
    if (
        info.st_uid != os.geteuid()
        or mode != SOCKET_MODE
        or (gid is not None and info.st_gid != gid)
    ):
        raise DevicectlError(
            f"control socket {path} has owner {info.st_uid}:{info.st_gid} and mode {mode:o}, "
            f"not {os.geteuid()}:{gid if gid is not None else info.st_gid} and 660"
        )


def _groups_of(pid: int) -> set[int]:
    """The supplementary groups of process ``pid`` (SO_PEERCRED gives only the primary one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------- client


def _connect(path: Path, timeout: float) -> socket.socket:
    """A connection to ``path``. A Unix socket whose listen queue is full refuses a connect at
    once (EAGAIN) rather than letting it wait: tried again until ``timeout``, as the daemon
    drains its queue (the stop lane makes room for a stop within a few connections)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(
                path, "no control socket there (is `devicectl run` running?)"
            ) from None
        except BlockingIOError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise DaemonUnreachable(
                    path, f"its queue of connections stayed full for {timeout:g} s"
                ) from exc
            time.sleep(0.005)
            continue
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(path, exc.strerror or str(exc)) from exc
        return sock


def call_daemon(path: Path, request: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return ``result``; raise ControlError or DaemonUnreachable. A reply
    marked ``retry`` (a full stop lane closed the connection before reading it) is tried again,
    on a new connection, until ``timeout``."""
    deadline = time.monotonic() + timeout
    left = timeout  # each try within what is left of it: the whole call is bounded by it
    while True:
        try:
            return _call_once(path, request, left)
        except ControlError as exc:
            left = deadline - time.monotonic()
            if not exc.facts.get("retry") or left <= 0:
                raise
            time.sleep(0.005)


def _call_once(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    with _connect(path, timeout) as sock:
        try:
            # answered and closed before reading (at its connection cap): read why all the same
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall((json.dumps(request) + "\n").encode())
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_REQUEST_BYTES * 16)
        except TimeoutError as exc:
            raise DaemonUnreachable(path, f"no answer within {timeout:g} s") from exc
        except OSError as exc:
            raise DaemonUnreachable(path, exc.strerror or str(exc)) from exc
    if not line:
        raise DaemonUnreachable(path, "the daemon closed the connection without answering")
    reply = json.loads(line)
    if reply.get("ok"):
        result: dict[str, Any] = reply.get("result") or {}
        return result
    facts = {k: v for k, v in reply.items() if k not in {"ok", "kind", "error"}}
    raise ControlError(reply.get("kind", "refused"), reply.get("error", "refused"), **facts)
