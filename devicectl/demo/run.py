"""The demo's stack and its one scripted session, end to end, in this process and event loop.

:class:`DemoStack` is an async context manager that owns, in start order, an embedded MQTT broker
(unless a broker URL is given), the daemon with the in-process simulator (``port="sim"``) and the
dashboard on a free loopback port; leaving it shuts them down in reverse (the daemon makes the laser
safe and flushes its log first), whether the session finished, failed or was interrupted.
:meth:`DemoStack.play` runs the :class:`~devicectl.demo.script.TreatmentScript`, then exports the
HTML report, verifies the log and checks the session against it (:func:`check_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from devicectl.demo.broker import EmbeddedBroker
from devicectl.demo.outcome import SessionCheck, check_session
from devicectl.demo.script import (
    DEFAULT_DURATION_S,
    DEFAULT_SPEED_HZ,
    DEMO_CONCERN,
    DEMO_OPERATOR,
    DEMO_SUPERVISOR,
    DemoError,
    DemoProgress,
    DemoUsers,
    ScriptRecord,
    TreatmentScript,
    demo_params,
    plan_phases,
)
from devicectl.errors import DevicectlError
from devicectl.logs import redact
from devicectl.policy import Concern

if TYPE_CHECKING:  # the daemon is imported when the stack starts, not when the CLI loads
    from devicectl.daemon import Daemon

__all__ = [
    "DemoOptions",
    "DemoResult",
    "DemoStack",
    "InProcessControls",
    "configure_demo_logging",
    "default_demo_dir",
    "demo_users",
    "write_demo_policy",
]

_LIBRARY_LOGGERS = ("amqtt", "transitions", "uvicorn", "uvicorn.error", "passlib", "websockets")
DEMO_LEASE_MS = 1000
# sun_path holds 108 bytes: sockets go to a short temporary directory when the data dir is deep.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True, slots=True)
class DemoOptions:
    mqtt_url: str | None = None
    duration_s: float = DEFAULT_DURATION_S
    speed_hz: float = DEFAULT_SPEED_HZ
    data_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class DemoResult:
    """How the demo ended. ``ok`` only when the session played as scripted."""

    reason: str | None
    data_dir: Path
    log_path: Path
    report_path: Path | None = None
    session_id: int | None = None
    summary: dict[str, Any] | None = None
    check: SessionCheck | None = None
    verified_records: int | None = None
    verified_pulses: int | None = None
    verify_message: str | None = None
    breach: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "data_dir": str(self.data_dir),
            "session_log": str(self.log_path),
            "report": str(self.report_path) if self.report_path else None,
            "session_id": self.session_id,
            "summary": self.summary,
            "log_pulses": self.check.pulses if self.check else None,
            "pulses_after_breach": self.check.pulses_after_breach if self.check else None,
            "pulses_in_flight_at_stop": self.check.in_flight if self.check else None,
            "stop_within_us": self.check.stop_within_us if self.check else None,
            "energy_per_zone_uj": self.check.energy_per_zone_uj if self.check else None,
            "breach": self.breach,
            "verify": {
                "intact": self.verify_message is None and self.verified_records is not None,
                "records": self.verified_records,
                "pulses": self.verified_pulses,
                "problem": self.verify_message,
            },
            **self.extra,
        }


def default_demo_dir(base: Path | None = None, now: datetime | None = None) -> Path:
    """A fresh directory ``./devicectl-demo/<timestamp>`` (suffixed if that one exists)."""
    root = (base or Path.cwd()) / "devicectl-demo"
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


@contextlib.contextmanager
def configure_demo_logging(path: Path) -> Iterator[FilteringBoundLogger]:
    """Every log line of this process (structlog and the libraries' stdlib loggers) goes to
    ``path`` as JSON, so that the terminal keeps the live view; restored on exit."""
    stream: TextIO = path.open("a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    saved = []
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        saved.append((lib, lib.handlers[:], lib.propagate, lib.level))
        lib.handlers[:] = [handler]
        lib.propagate = False
        lib.setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    try:
        yield structlog.get_logger("devicectl.demo")
    finally:
        structlog.reset_defaults()
        for lib, handlers, propagate, level in saved:
            lib.handlers[:] = handlers
            lib.propagate = propagate
            lib.setLevel(level)
        stream.close()


def write_demo_policy(directory: Path) -> Path:
    """The packaged policy with a 1 s lease, as ``directory/demo-policy.toml``.

    The demo runs the broker, the dashboard and the daemon in one process and one event loop, on
    a machine that may be busy (CI): a stall of ~90 ms would let a 250 ms lease run down to the
    "nearly out" threshold and latch a breach the script did not inject. Every other limit is the
    packaged one."""
    from importlib import resources

    from devicectl.policy import load_policy

    text = (resources.files("devicectl") / "defaults" / "policy.toml").read_text(encoding="utf-8")
    text, count = re.subn(
        r"^lease_ms\s*=\s*\d+[^\n]*$",
        f"lease_ms = {DEMO_LEASE_MS}  # devicectl demo: one event loop for everything",
        text,
        count=1,
        flags=re.MULTILINE,
    )
    path = directory / "demo-policy.toml"
    _write_atomically(path, "# devicectl demo: the packaged policy, lease lengthened.\n" + text)
    if count != 1 or load_policy(path).lease_ms != DEMO_LEASE_MS:
        raise DemoError(f"cannot derive the demo policy from the packaged one ({path})")
    return path


class InProcessControls:
    """The script's way to the daemon (its control socket, exactly as the CLI: requests are
    validated and their users' PINs checked at the edge) and to the simulator (its control
    socket)."""

    def __init__(self, daemon: Daemon, control: Path) -> None:
        self._daemon = daemon
        self._control = control

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        from devicectl.control import ControlError, call_daemon

        try:
            return await asyncio.to_thread(call_daemon, self._control, request)
        except ControlError as exc:
            if exc.kind != "internal":
                raise
            raise DemoError(f"the daemon failed on {request['command']}: {exc}") from exc

    async def sim(self, words: str) -> Any:
        from simulator.control import send_command

        if self._daemon.sim_control is None:
            raise DemoError("the daemon runs no in-process simulator")
        return await send_command(self._daemon.sim_control, words)


def demo_users(data_dir: Path) -> DemoUsers:
    """The demo's operator and supervisor, registered in its data dir with random PINs, which
    are kept beside them (``demo-pins.json``, mode 0600) so that a later run in the same
    directory finds them. A demo only: clinic users choose their own PINs (`devicectl users`)."""
    from devicectl.users import Role, UserStore

    store = UserStore.in_data_dir(data_dir)
    pins_file = data_dir / "demo-pins.json"
    try:
        pins: dict[str, str] = json.loads(pins_file.read_text())
    except FileNotFoundError:
        pins = {}
    except (OSError, ValueError) as exc:
        raise DemoError(f"{pins_file} cannot be read ({exc}): remove it with users.json") from None
    for user, role in ((DEMO_OPERATOR, Role.OPERATOR), (DEMO_SUPERVISOR, Role.SUPERVISOR)):
        if user in pins:
            continue
        if store.get(user) is not None:
            raise DemoError(
                f"demo user {user} exists in {store.path} but its PIN is lost: use another "
                "--data-dir, or remove users.json and demo-pins.json there"
            )
        pins[user] = secrets.token_urlsafe(12)
        store.add(user, role, pins[user])
        fd = os.open(pins_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(pins, out)
    return DemoUsers(
        operator={"user": DEMO_OPERATOR, "pin": pins[DEMO_OPERATOR]},
        supervisor={"user": DEMO_SUPERVISOR, "pin": pins[DEMO_SUPERVISOR]},
    )


class DemoStack:
    """``async with DemoStack(options, log=log) as stack: result = await stack.play(...)``."""

    def __init__(self, options: DemoOptions, *, log: FilteringBoundLogger | None = None) -> None:
        self.options = options
        self.phases = plan_phases(options.duration_s)  # refuse a bad --duration before starting
        self.data_dir = (options.data_dir or default_demo_dir()).resolve()
        self.log_path = self.data_dir / "sessions.db"
        self._log: FilteringBoundLogger = log or structlog.get_logger("devicectl.demo")
        self._stack = contextlib.AsyncExitStack()
        self._script: TreatmentScript | None = None
        self.mqtt_url: str | None = options.mqtt_url
        self.dashboard_url: str | None = None
        self.recorder_db: str | None = None
        self.control: Path | None = None
        self.daemon: Daemon | None = None
        self.users: DemoUsers | None = None

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        from devicectl.config import load_settings
        from devicectl.dashboard import (
            Dashboard,
            DashboardConfig,
            DashboardServer,
            load_display_limits,
        )
        from devicectl.recorder import Recorder, RecorderConfig
        from devicectl.simlink import compose

        stack = self._stack
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.mqtt_url is None:
            broker = await stack.enter_async_context(EmbeddedBroker())
            self.mqtt_url = broker.url
        sockets = self.data_dir
        if len(str(sockets / "control-sim.sock")) > _MAX_SOCKET_PATH:
            sockets = Path(tempfile.mkdtemp(prefix="devicectl-demo-"))
            stack.callback(_remove_dir, sockets)
        self.control = sockets / "control.sock"
        policy = write_demo_policy(self.data_dir)
        self.users = demo_users(self.data_dir)
        settings = load_settings(
            None,
            port="sim",
            data_dir=self.data_dir,
            control=self.control,
            mqtt__url=self.mqtt_url,
            # amqtt speaks 3.1.1 only and never answers an MQTT 5 CONNECT: say so up front
            # rather than wait for the fallback's timeout.
            mqtt__protocol="3.1.1" if self.options.mqtt_url is None else "auto",
            sim_max_rate_hz=max(500.0, self.options.speed_hz),
            policy=policy,
        )
        # The fleet recorder on its embedded store, before the daemon so it records all of it.
        self.recorder_db = f"sqlite:///{self.data_dir / 'recorder.sqlite'}"
        recorder = RecorderConfig(
            self.mqtt_url, self.recorder_db, client_id="devicectl-demo-recorder",
            protocol="3.1.1" if self.options.mqtt_url is None else "5",
        )  # fmt: skip
        await stack.enter_async_context(Recorder(recorder, log=self._log))
        # The dashboard first, so that it is the last thing to stop: it sees the daemon's offline.
        # The embedded broker admits anyone on loopback, so the dashboard can be given stop
        # credentials and shows its Stop emission button (docs/dashboard.md); a named broker's
        # credentials are the clinic's, so there the page stays read-only.
        stop_password = secrets.token_hex(8) if self.options.mqtt_url is None else None
        dashboard = Dashboard(
            DashboardConfig(
                mqtt_url=self.mqtt_url,
                title="devicectl demo",
                limits=load_display_limits(policy),  # bars against the limits the daemon enforces
                stop_username="demo-stop" if stop_password is not None else None,
                stop_password=stop_password,
                history_db=self.recorder_db,
            ),
            log=self._log,
        )
        server = await stack.enter_async_context(DashboardServer(dashboard, ("127.0.0.1", 0)))
        self.dashboard_url = server.url
        self.daemon = await stack.enter_async_context(compose(settings, log=self._log))
        self._log.info(
            "demo_started",
            data_dir=str(self.data_dir),
            mqtt=self.mqtt_url,
            dashboard=self.dashboard_url,
            control=str(self.control),
        )

    def _running(self) -> Daemon:
        if self.daemon is None:
            raise DemoError("the demo's daemon is not running")
        return self.daemon

    async def play(
        self, on_progress: Callable[[DemoProgress], None] = lambda _p: None
    ) -> DemoResult:
        """Play the scripted session; a DemoResult whatever happens, except cancellation."""
        daemon = self._running()
        preset = daemon.policy.presets[Concern(DEMO_CONCERN)]
        params = demo_params(self.options.speed_hz, preset, daemon.policy)
        assert self.control is not None
        assert self.users is not None
        script = TreatmentScript(
            InProcessControls(daemon, self.control),
            self.phases,
            params,
            DemoProgress(phase_count=len(self.phases)),
            self.users,
            on_progress=on_progress,
        )
        self._script = script
        try:
            record = await script.play()
        except DevicectlError as exc:
            self._log.error("demo_script_failed", phase=script.progress.phase, error=str(exc))
            return await self._conclude(
                script.record, f"{script.progress.phase} phase failed: {exc}"
            )
        return await self._conclude(record, None)

    async def conclude_interrupted(self) -> DemoResult:
        """After Ctrl-C stopped the script: end the open session as an operator stopping early
        would (no post-care given), then verify, export the report and write demo-result.json as
        a finished run does, with the reason "interrupted"."""
        script = self._script
        daemon = self._running()
        phase = script.progress.phase if script is not None else "start"
        failure = f"interrupted during the {phase} phase"
        if daemon.treatment is not None and self.control is not None and self.users is not None:
            try:
                async with asyncio.timeout(2.0):
                    await InProcessControls(daemon, self.control).request(
                        {
                            "command": "session_end",
                            "post_care_declined": "the demo was interrupted before the end",
                            "auth": self.users.operator,
                        }
                    )
            except (DevicectlError, TimeoutError) as exc:
                self._log.warning("demo_session_not_ended", error=str(exc))
        if script is None:
            return self._finish(DemoResult(failure, self.data_dir, self.log_path))
        return await self._conclude(script.record, failure)

    def _finish(self, result: DemoResult) -> DemoResult:
        _write_atomically(
            self.data_dir / "demo-result.json", json.dumps(result.as_dict(), indent=1) + "\n"
        )
        self._log.info(
            "demo_finished", ok=result.ok, reason=result.reason, session=result.session_id
        )
        return result

    async def _conclude(self, record: ScriptRecord, failure: str | None) -> DemoResult:
        from devicectl.sessionlog.verify import verify_log

        daemon = self._running()
        if daemon.sessionlog is not None:
            with contextlib.suppress(DevicectlError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await daemon.sessionlog.flush_async()
        base = DemoResult(failure, self.data_dir, self.log_path, breach=record.breach)
        if record.session_id is None:
            return self._finish(base)
        session_id = record.session_id
        try:
            verified = await asyncio.to_thread(verify_log, self.log_path)
        except DevicectlError as exc:
            return self._finish(replace(base, reason=failure or str(exc), session_id=session_id))
        brk = verified.first_break
        report_path = self.data_dir / f"session-{session_id}.html"
        try:
            doc, written = await asyncio.to_thread(
                _read_and_export, self.log_path, session_id, report_path
            )
        except (DevicectlError, OSError, sqlite3.Error) as exc:
            return self._finish(
                replace(
                    base,
                    reason=failure or f"cannot read or export session {session_id}: {exc}",
                    session_id=session_id,
                )
            )
        check = check_session(
            doc, record, verified, tolerance_pct=daemon.policy.energy_tolerance_pct
        )
        reason = failure or (check.problems[0] if check.problems else None)
        result = DemoResult(
            reason,
            self.data_dir,
            self.log_path,
            report_path=report_path if written else None,
            session_id=session_id,
            summary=doc.get("summary"),
            check=check,
            verified_records=verified.records,
            verified_pulses=verified.pulses,
            verify_message=brk.message if brk else None,
            breach=record.breach,
            extra={
                "dashboard": self.dashboard_url,
                "mqtt": self.mqtt_url,
                "history": f"{self.dashboard_url}/history",
                "recorder_db": self.recorder_db,
            },
        )
        return self._finish(result)


def _read_and_export(db: Path, session_id: int, report_path: Path) -> tuple[dict[str, Any], bool]:
    """The session's full record, and the HTML report written beside the log (atomically, so
    an interrupted export never leaves half a report)."""
    from devicectl.sessionlog import store
    from devicectl.sessionlog.export import session_document
    from devicectl.sessionlog.report import render_report

    conn = store.connect(db, readonly=True)
    try:
        doc: dict[str, Any] = session_document(conn, session_id, with_pulses=True)
        if doc.get("summary") is None:
            return doc, False
        _write_atomically(report_path, render_report(conn, session_id))
        return doc, True
    finally:
        conn.close()


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _remove_dir(path: Path) -> None:
    for child in path.iterdir():
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()
