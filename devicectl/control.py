"""The daemon's local control API: a Unix socket speaking JSON lines (docs/control-api.md).

One request per line, one reply per line::

    -> {"command": "arm"}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "kind": "refused", "error": "one line naming the cause", "rule": ..., ...}

``kind`` tells the CLI which exit code to use: ``refused`` (1: a limit or a state said no),
``usage`` (2: the request itself was malformed) or ``unreachable`` (3: the device cannot be
reached). Requests are validated with pydantic at this edge; a malformed one gets an error reply
and never disturbs the daemon. The socket file is created with mode 0660, so only its owner and
group may drive the laser.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from devicectl.errors import DevicectlError, LinkError

__all__ = [
    "MAX_REQUEST_BYTES",
    "ControlError",
    "ControlRequest",
    "ControlServer",
    "DaemonUnreachable",
    "call_daemon",
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


class Checklist(_Request):
    consultation_done: bool
    area_cleaned: bool
    numbing_applied: bool
    recent_sun_exposure: bool
    photosensitising_medication: bool
    active_skin_infection: bool
    pregnancy: bool
    allergy_to_active_ingredient: bool


class SessionStartRequest(_Request):
    command: Literal["session_start"]
    operator: Annotated[str, Field(min_length=1, max_length=64)]
    patient_ref: Annotated[str, Field(min_length=1, max_length=64)]
    skin_type: SkinType
    concerns: Annotated[list[Concern], Field(min_length=1)]
    course_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    course_session: Annotated[int, Field(ge=1, le=6)] = 1
    course_planned: Annotated[int, Field(ge=4, le=6)] = 4
    active_ingredient: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    preset: Concern | None = None
    checklist: Checklist
    contraindication_override: Annotated[str, Field(min_length=10, max_length=500)] | None = None


class SessionZoneRequest(_Request):
    command: Literal["session_zone"]
    zone: Zone


class SessionEndRequest(_Request):
    command: Literal["session_end"]
    post_care: Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]], Field()] = []


class ParamsSetRequest(_Request):
    command: Literal["params_set"]
    # Bounded by the SET_PARAMS fields (u32, u16), not by a limit: a value that fits the wire
    # is judged by the safety rules and refused naming the rule and the bound (exit 1).
    energy_uj: Annotated[int, Field(ge=1, le=0xFFFF_FFFF)] | None = None
    width_us: Annotated[int, Field(ge=1, le=0xFFFF_FFFF)] | None = None
    rate_hz: Annotated[float, Field(gt=0, le=0xFFFF_FFFF / 1000, allow_inf_nan=False)] | None = None
    spot_um: Annotated[int, Field(ge=1, le=0xFFFF)] | None = None
    preset: Concern | None = None


class ArmRequest(_Request):
    command: Literal["arm"]


class DisarmRequest(_Request):
    command: Literal["disarm"]


class StopRequest(_Request):
    command: Literal["stop"]


class FaultAckRequest(_Request):
    command: Literal["fault_ack"]
    operator: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Annotated[str, Field(min_length=3, max_length=500)]


ControlRequest = Annotated[
    StatusRequest
    | SessionStartRequest
    | SessionZoneRequest
    | SessionEndRequest
    | ParamsSetRequest
    | ArmRequest
    | DisarmRequest
    | StopRequest
    | FaultAckRequest,
    Field(discriminator="command"),
]
_REQUEST = TypeAdapter[Any](ControlRequest)
_COMMANDS = frozenset(
    {
        "status", "session_start", "session_zone", "session_end", "params_set", "arm", "disarm",
        "stop", "fault_ack",
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
    message = str(first["msg"])
    message = message[:1].lower() + message[1:]
    if first["type"] == "missing":
        return f"invalid request: {field} is required"
    if first["type"] == "extra_forbidden":
        return f"invalid request: {field} is not a known field"
    if first["type"] == "union_tag_invalid":
        return f"invalid request: unknown command {first['input'].get('command')!r}"
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
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ControlError("usage", _describe(exc)) from exc


# ---------------------------------------------------------------- server


class ControlServer:
    """Serves the control socket; each request is handed to ``handler`` and answered.

    Who may drive the laser: the socket is created 0660 and owned by the daemon's user, which is
    checked after creation, in a directory nobody else may replace it in. With ``group`` set, the
    socket belongs to that group and every connection's peer (SO_PEERCRED) must be root, the
    daemon's own user, or a member of the group; anyone else is refused and the refusal audited.
    """

    def __init__(
        self, path: Path, handler: Handler, *, group: str | None = None, log: Any = None
    ) -> None:
        self.path = path
        self._handler = handler
        self._gid = grp.getgrnam(group).gr_gid if group is not None else None
        self.refused_peers = 0
        self._log = log or structlog.get_logger("devicectl.control")
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ControlServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _check_directory(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise DevicectlError(f"control socket path {self.path} exists and is not a socket")
            if _socket_alive(self.path):
                raise DevicectlError(f"another daemon is already listening on {self.path}")
            self.path.unlink()
        old_umask = os.umask(0o117)  # create the socket 0660 atomically, never world-writable
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
        os.chmod(self.path, SOCKET_MODE)
        _check_socket(self.path, self._gid)
        self._log.info(
            "control_listening", path=str(self.path), mode=oct(SOCKET_MODE), gid=self._gid
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            refusal = self._refuse_peer(writer)
            if refusal is not None:
                writer.write(_reply_error("refused", refusal))
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
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
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
            request = parse_request(line)
            result = await self._handler(request)
        except ControlError as exc:
            return _reply_error(exc.kind, str(exc), **exc.facts)
        except DevicectlError as exc:
            return _reply_error(_kind_of(exc), str(exc), **_facts_of(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must never take the control socket down
            self._log.exception("control_request_failed", error=str(exc))
            return _reply_error("internal", f"internal error: {type(exc).__name__}: {exc}")
        return (json.dumps({"ok": True, "result": result}, default=str) + "\n").encode()


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


def call_daemon(path: Path, request: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return ``result``; raise ControlError or DaemonUnreachable."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonUnreachable(
                path, "no control socket there (is `devicectl run` running?)"
            ) from None
        except OSError as exc:
            raise DaemonUnreachable(path, exc.strerror or str(exc)) from exc
        try:
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
