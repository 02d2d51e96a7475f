"""``devicectl log verify`` and ``devicectl session list|show|export``: reading the session log.

These read the SQLite file directly (read-only; safe while the daemon writes), so they work with
no daemon running. The file is ``--db FILE``, else ``DATA_DIR/sessions.db`` with ``--data-dir``
defaulting as the daemon's (``/var/lib/devicectl`` for root under systemd, else
``$XDG_DATA_HOME/devicectl``). Exit codes: 0 done, 1 the log is not intact (verify) or cannot be
read, 2 usage (bad option, no such file or session).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from devicectl.cli.app import ExitCode, log_app, session_app, wants_json
from devicectl.errors import LogUnavailable
from devicectl.sessionlog import export, reader, store
from devicectl.sessionlog.verify import VerifyReport, verify_against

__all__ = ["session_export", "session_list", "session_show", "verify"]

DbOption = Annotated[
    Path | None,
    typer.Option("--db", metavar="FILE", help="The session log (default: DATA_DIR/sessions.db)."),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        help="The daemon's data directory (default: as the daemon's: the config's data_dir or "
        "$DEVICECTL_DATA_DIR, else /var/lib/devicectl for the system service, "
        "else $XDG_DATA_HOME/devicectl).",
    ),
]


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (the default when the output is not a terminal).")
]


class ExportFormat(StrEnum):
    JSON = "json"
    CSV = "csv"
    HTML = "html"


def _fail(command: str, message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"devicectl {command}: {message}", err=True)
    return typer.Exit(int(code))


def _db_path(db: Path | None, data_dir: Path | None) -> Path:
    """``--db``, else ``--data-dir``'s log, else the daemon's: from the same config file
    (``$DEVICECTL_CONFIG`` or /etc/devicectl/devicectl.toml) and ``DEVICECTL_*`` variables."""
    if db is not None:
        return db
    if data_dir is not None:
        return store.default_db_path(data_dir)
    import os

    from devicectl.config import default_config_file, load_settings
    from devicectl.errors import ConfigError

    try:
        return load_settings(default_config_file(os.environ)).session_log_path
    except ConfigError as exc:
        raise _fail("session log", str(exc), ExitCode.USAGE) from None


@contextmanager
def _reading(command: str, db: Path | None, data_dir: Path | None) -> Iterator[sqlite3.Connection]:
    path = _db_path(db, data_dir)
    if not path.is_file():
        raise _fail(
            command, f"no session log at {path} (give --db FILE or --data-dir DIR)", ExitCode.USAGE
        )
    try:
        conn = store.connect(path, readonly=True)
    except LogUnavailable as exc:
        raise _fail(command, str(exc), ExitCode.REFUSED) from None
    try:
        yield conn
    except sqlite3.Error as exc:
        raise _fail(
            command, f"session log {path} cannot be read: {exc}", ExitCode.REFUSED
        ) from None
    except export.SessionNotFound as exc:
        raise _fail(command, f"{exc} at {path}", ExitCode.USAGE) from None
    finally:
        conn.close()


CheckpointsOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--checkpoints",
        metavar="FILE",
        help="Checkpoints captured off the device: `mosquitto_sub -v` output, JSON lines of "
        "log/checkpoint payloads or ended events, or a session's JSON export (repeatable).",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="PUBKEY",
        help="The device's enrolled public key: base64 or hex of its 32 bytes, PEM, or a file "
        "holding one (as `devicectl log key` prints it).",
    ),
]


def _recorder_checkpoints(db_url: str, device: str | None) -> list[dict[str, object] | str]:
    """The fleet recorder's archived checkpoints, named by where they came from."""
    from devicectl.errors import ConfigError
    from devicectl.recorder import StoreUnavailable, load_witnessed_checkpoints
    from devicectl.recorder.store import describe_url

    try:
        found = load_witnessed_checkpoints(db_url, device)
    except ConfigError as exc:
        raise _fail("log verify", str(exc), ExitCode.USAGE) from None
    except StoreUnavailable as exc:
        raise _fail("log verify", str(exc), ExitCode.UNREACHABLE) from None
    where = describe_url(db_url)
    return [
        {**c, "_source": f"recorder {where}: {c.get('device')} log_seq {c.get('log_seq')}"}
        for c in found
    ]


@log_app.command("verify")
def verify(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    checkpoints: CheckpointsOption = None,
    key: KeyOption = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="Use only this device id's checkpoints from the files."),
    ] = None,
    witness: Annotated[
        str | None,
        typer.Option(
            "--witness",
            metavar="DB_URL",
            envvar="DEVICECTL_RECORDER_DB",
            help="Also prove the log against the checkpoints the fleet recorder archived "
            "(postgresql://... or sqlite:///...; with --device, only that device's).",
        ),
    ] = None,
) -> None:
    """Walk the hash chain, check every stored checkpoint's signature and the key history, and
    with --checkpoints prove the log against checkpoints that left the device: exit 0 when
    nothing contradicts it, 1 naming each altered, deleted or truncated record and the
    checkpoint that shows it. Always says what it could not rule out.

    Example: devicectl log verify --db sessions.db --checkpoints captured.txt --key KEY.pub
    """
    from devicectl.sessionlog.checkpoint import external_checkpoints
    from devicectl.sessionlog.keys import parse_public_key

    path = _db_path(db, data_dir)
    if not path.is_file():
        raise _fail("log verify", f"no session log at {path}", ExitCode.USAGE)
    enrolled: bytes | None = None
    if key is not None:
        text = key
        candidate = Path(key).expanduser()
        if len(key) < 4096 and candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise _fail(
                    "log verify", f"cannot read key file {key}: {exc}", ExitCode.USAGE
                ) from None
        try:
            enrolled = parse_public_key(text)
        except ValueError as exc:
            raise _fail("log verify", f"--key {key}: {exc}", ExitCode.USAGE) from None
    witnessed: list[dict[str, object] | str] = []
    for file in checkpoints or []:
        try:
            lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _fail("log verify", f"cannot read {file}: {reason}", ExitCode.USAGE) from None
        for number, found in external_checkpoints(lines):
            if isinstance(found, str):
                witnessed.append(f"{file}: {found}")
            else:
                witnessed.append({**found, "_source": f"{file.name} line {number}"})
    if witness is not None:
        witnessed += _recorder_checkpoints(witness, device)
    try:
        result = verify_against(path, witnessed, enrolled, device=device)
    except LogUnavailable as exc:
        raise _fail("log verify", str(exc), ExitCode.REFUSED) from None
    for line in _verdict(path, result, given=bool(checkpoints) or witness is not None):
        typer.echo(_printable(line))
    if not result.ok:
        raise typer.Exit(int(ExitCode.REFUSED))


def _printable(line: str) -> str:
    """A verdict line as a terminal shows it as is. Its text comes partly from the file and the
    captures (device ids, key records), which whoever wrote them could fill with escape sequences
    or carriage returns that redraw the verdict: those are shown escaped."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)


def _verdict(path: Path, result: VerifyReport, *, given: bool) -> list[str]:
    """What ``log verify`` prints: the verdict, then each finding, then what stays unproven."""
    lines: list[str] = []
    brk = result.first_break
    if brk is not None:
        lines.append(
            f"session log {path} is NOT intact: {brk.message} "
            f"({result.records} records verified before it)"
        )
    elif result.findings:
        lines.append(f"session log {path} is NOT intact: its chain holds together, but")
    else:
        lines.append(
            f"session log {path} intact: {result.records} records "
            f"({result.pulses} pulses, {result.records - result.pulses} other); "
            f"head {result.head_seq} sha256:{result.head_hash}"
        )
    lines.extend(f"  - {finding.message}" for finding in result.findings)
    last = result.last_checkpoint
    if last is not None:
        lines.append(
            f"signed checkpoints: {result.checkpoints} verified, the newest at record "
            f"{last.log_seq} ({last.time}, key {last.key_id})"
        )
    for entry in result.keys:
        how = (
            "introduced by a checkpoint signed with the previous key"
            if (entry.signed_by_previous)
            else entry.how
        )
        lines.append(f"signing key {entry.key_id} from record {entry.introduced_at} ({how})")
    if result.enrolled_key_id is not None:
        lines.append(f"enrolled key: {result.enrolled_key_id}")
    if given:
        used = result.witnessed
        ignored = [w for w in result.witnesses if w.status == "ignored"]
        lines.append(f"witnessed checkpoints: {used} used, {len(ignored)} ignored")
        lines.extend(f"  - ignored: {w.message}" for w in ignored[:10])
        if len(ignored) > 10:
            lines.append(f"  - ... and {len(ignored) - 10} more ignored")
        proof = result.proven_by
        if proof is not None and result.proven_seq is not None:
            lines.append(
                f"PROVEN: records 1..{result.proven_seq} are exactly those device {proof.device} "
                f"signed at {proof.time} (key {proof.key_id}, {proof.source})"
            )
    lines.extend(f"cannot rule out: {text}" for text in result.cannot_rule_out())
    return lines


def _parse_when(value: str | None, *, end_of_day: bool) -> int | None:
    """A date (local, whole day) or an ISO date-time (local unless it names an offset), to ns."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day)
            if end_of_day:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM)"
        ) from None
    return int(moment.astimezone().timestamp() * 1e9)


def _local(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M")


@session_app.command("list")
def session_list(
    since: Annotated[
        str | None, typer.Option("--since", metavar="DATE", help="Started on or after (local).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="DATE", help="Started up to this day (local).")
    ] = None,
    operator: Annotated[
        str | None, typer.Option("--operator", metavar="ID", help="Operator id.")
    ] = None,
    patient: Annotated[
        str | None, typer.Option("--patient", metavar="REF", help="Patient reference.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", metavar="SERIAL", help="Device serial.")
    ] = None,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """List recorded sessions, oldest first.

    Example: devicectl session list --since 2026-11-01 --patient PT-0042
    """
    since_ns = _parse_when(since, end_of_day=False)
    until_ns = _parse_when(until, end_of_day=True)
    with _reading("session list", db, data_dir) as conn:
        found = reader.list_sessions(
            conn,
            since_ns=since_ns,
            until_ns=until_ns,
            operator=operator,
            patient_ref=patient,
            device_serial=device,
        )
    if wants_json(as_json):
        rows = [
            {
                "id": s.session_id,
                "started": datetime.fromtimestamp(s.started_ns / 1e9).astimezone().isoformat(),
                "device": s.device_serial,
                "operator": s.operator,
                "patient": s.patient_ref,
                "outcome": s.outcome,
                "pulses": s.pulses,
            }
            for s in found
        ]
        typer.echo(json.dumps({"sessions": rows}, indent=2))
        return
    table = Table("id", "started", "device", "operator", "patient", "outcome", "pulses")
    for s in found:
        table.add_row(
            str(s.session_id),
            _local(s.started_ns),
            s.device_serial,
            s.operator,
            s.patient_ref,
            s.outcome,
            "—" if s.pulses is None else f"{s.pulses:,}",
        )
    console = Console()
    console.print(table)
    console.print(f"{len(found)} session(s)")


TimeZoneOption = Annotated[
    str | None,
    typer.Option(
        "--time-zone",
        metavar="ZONE",
        help="Show times in this IANA zone (default: the clinic's, recorded with the session).",
    ),
]


@session_app.command("show")
def session_show(
    session_id: Annotated[int, typer.Argument(metavar="ID", help="Session id.")],
    db: DbOption = None,
    data_dir: DataDirOption = None,
    time_zone: TimeZoneOption = None,
    as_json: JsonOption = False,
) -> None:
    """A readable summary of one session.

    Example: devicectl session show 12 --data-dir /var/lib/devicectl
    """
    with _reading("session show", db, data_dir) as conn:
        doc = export.session_document(conn, session_id, with_pulses=False, time_zone=time_zone)
    if wants_json(as_json):  # JSON escapes control characters itself
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    doc = _visible(doc)  # on a terminal: free text shown as typed, never as markup or codes
    info, summary, course = doc["info"], doc["summary"], doc["info"]["course"]
    position, prov = doc["course_position"], doc["provenance"] or {}
    # Free text (notes, reasons) is the clinician's, printed as typed: never read as markup.
    console = Console(width=None if sys.stdout.isatty() else 160, markup=False)

    def when(ns: int) -> str:  # the clinic's time zone, as the report
        return export.local_time(ns, doc["time_zone"])[:16]

    def who(rec: dict[str, Any]) -> str:
        return f"{rec['actor']} ({rec['role']})" if rec.get("role") else str(rec["actor"])

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("session", f"{session_id} ({doc['outcome']})")
    head.add_row("started", f"{doc['started_local']} ({doc['time_zone']})")
    head.add_row("ended", doc["ended_local"] or "—")
    head.add_row("device", info["device_serial"])
    role = info.get("operator_role")
    head.add_row("operator", f"{info['operator']} ({role})" if role else info["operator"])
    head.add_row("patient", info["patient_ref"])
    head.add_row("skin type", ["I", "II", "III", "IV", "V", "VI"][info["skin_type"] - 1])
    head.add_row("concerns", ", ".join(info["concerns"]) or "—")
    if position is None:
        where = f"session {course['session_number']} of {course['planned_sessions']} (as typed)"
    elif position["kind"] == "maintenance":
        where = f"maintenance session {position['number']} after the course"
    else:
        where = f"session {position['number']} of {position['planned']} (from the log)"
    head.add_row("course", f"{course['course_id']}: {where}")
    head.add_row("active ingredient", info["active_ingredient"])
    if info.get("ingredient_lot"):
        amount = f"{info['ingredient_amount']:g} {info['ingredient_unit']}"
        head.add_row("amount, lot", f"{amount}, lot {info['ingredient_lot']}")
    if prov:
        head.add_row(
            "software, firmware", f"{prov['software_version']}, {prov['firmware_version']}"
        )
        head.add_row("policy", f"{prov['policy_name']} sha256:{prov['policy_sha256']}")
    care = (
        f"declined: {doc['post_care_declined']}"
        if doc["post_care_declined"]
        else ", ".join(doc["post_care"]) or "—"
    )
    head.add_row("post-care", care)
    console.print(head)
    for s in doc["signoffs"]:
        signed = s["signed_off_by"] or "nobody (older record)"
        console.print(
            Text.assemble(
                (s["kind"].replace("_", " "), "bold red"),
                f" by {s['actor']}, signed off by {signed} ({s['reason_code'] or 'no code'}): "
                f"{s['reason']}",
            ),
            highlight=False,
        )
    for warning in doc["course_warnings"]:
        console.print(Text.assemble(("warning:", "yellow"), f" {warning['message']}"))
    if summary is not None:
        totals = Table(
            "pulses",
            "unlogged",
            "energy (J)",
            "peak fluence (J/cm²)",
            "duration",
            "faults",
            title="summary",
        )
        totals.add_row(
            f"{summary['pulses']:,}",
            f"{summary['unlogged_pulses']:,}",
            f"{summary['total_energy_uj'] / 1e6:.3f}",
            f"{summary['peak_fluence_j_cm2']:.3f}",
            f"{summary['duration_s'] / 60:.1f} min",
            str(summary["faults"]),
        )
        console.print(totals)
        zones = Table("zone", "energy (J)", title="energy per zone")
        for zone, energy in sorted(summary["energy_per_zone_uj"].items()):
            zones.add_row(zone, f"{energy / 1e6:.3f}")
        console.print(zones)
    if doc["events"] or doc["pulse_gaps"]:
        events = Table("time", "event", "by", "reason", title="safety events and operator actions")
        for e in doc["events"]:
            events.add_row(when(e["at_ns"]), export.describe_event(e), who(e), e["reason"] or "")
        for g in doc["pulse_gaps"]:
            events.add_row(
                when(g["at_ns"]), "pulse gap", "log", f"{g['count']} unlogged: {g['cause']}"
            )
        console.print(events)
    entries = [
        *(("reaction", r, f"erythema {r.get('erythema')}, oedema {r.get('oedema')}")
          for r in doc["reactions"]),
        *(("adverse event", a, f"{a['severity']}: {a['text']}") for a in doc["adverse_events"]),
        *(("note", n, n["text"]) for n in doc["notes"]),
    ]  # fmt: skip
    if entries:
        clinical = Table("time", "entry", "by", "recorded", title="appended clinical entries")
        for kind, rec, text in sorted(entries, key=lambda entry: entry[1]["seq"]):
            clinical.add_row(when(rec["at_ns"]), kind, who(rec), text)
        console.print(clinical)


# Control characters shown as escapes: a line break or a terminal escape sequence typed into a
# note must not reach the terminal (it could forge a line or recolour what follows).
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
}
_CONTROLS |= {code: f"\\u{code:04x}" for code in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def _visible(value: Any) -> Any:
    """``value`` (a session document) with every string's control characters made visible."""
    if isinstance(value, str):
        return value.translate(_CONTROLS)
    if isinstance(value, dict):
        return {key: _visible(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_visible(item) for item in value]
    return value


@session_app.command("schema")
def session_schema() -> None:
    """Print the JSON Schema of `session export --format json` (docs/session-log.md).

    Example: devicectl session schema > session-export.schema.json
    """
    import json

    typer.echo(json.dumps(export.export_schema(), indent=1, ensure_ascii=False))


@session_app.command("export")
def session_export(
    session_id: Annotated[int, typer.Argument(metavar="ID", help="Session id.")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="Where to write.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            metavar="json|csv|html",
            help="json (full record), csv (pulses) or html (report with plots).",
        ),
    ] = ExportFormat.JSON,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    time_zone: TimeZoneOption = None,
) -> None:
    """Export one session as JSON, CSV or a self-contained HTML report.

    Example: devicectl session export 12 --format html --out session-12.html
    """
    with _reading("session export", db, data_dir) as conn:
        try:
            if fmt is ExportFormat.JSON:
                export.write_json(conn, session_id, out)
            elif fmt is ExportFormat.CSV:
                export.write_csv(conn, session_id, out)
            else:
                from devicectl.extras import MissingExtra, require_extra

                try:
                    require_extra("report", "devicectl session export --format html")
                except MissingExtra as exc:
                    raise _fail("session export", str(exc), ExitCode.REFUSED) from None
                from devicectl.sessionlog import report  # matplotlib: load only when needed

                report.write_report(conn, session_id, out, time_zone=time_zone)
        except OSError as exc:
            raise _fail(
                "session export", f"cannot write {out}: {exc.strerror}", ExitCode.USAGE
            ) from None
    typer.echo(f"session {session_id} exported as {fmt.value} to {out}")
