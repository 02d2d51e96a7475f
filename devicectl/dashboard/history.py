"""The dashboard's history view: the fleet's past sessions, served from the recorder's database.

Mounted at ``/history`` when the dashboard is given the recorder's database URL
(``devicectl dashboard --history-db URL``). Server-rendered pages (no script), and the same data
as JSON for other tools:

    GET /history                                  sessions, filtered by ?device= &patient=
                                                  &since= &until= (dates, YYYY-MM-DD)
    GET /history/sessions/{device}/{session}      one session: summary, zones, events, and its
                                                  energy-per-pulse plot rebuilt from the recorded
                                                  pulse batches (the recorded report)
    GET /history/courses/{patient}                a patient's course across every device
    GET /history/api/sessions                     the list as JSON (same filters)
    GET /history/api/sessions/{device}/{session}  one session as JSON, with its pulses
    GET /history/style.css

Each request opens the database and closes it again (PostgreSQL or the recorder's SQLite file,
read while the recorder writes it): nothing stays open between requests.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from devicectl.recorder import queries
from devicectl.recorder.store import RecorderStore, StoreUnavailable, open_store

__all__ = ["history_mount", "render_energy_svg"]

_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #17202a; background: #f3f5f7; }
header { background: #1b2631; color: #fff; padding: 10px 16px; }
header a { color: #fff; margin-right: 1rem; }
main { padding: 12px 16px 40px; max-width: 70rem; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .95rem; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #d5dbe1; }
th { background: #eaeef2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
form { margin: 0 0 12px; display: flex; gap: 8px; flex-wrap: wrap; }
.warn { background: #fff4e0; border-left: 4px solid #b9770e; padding: 6px 10px; }
.muted { color: #5d6d7e; }
.mono { font-family: ui-monospace, monospace; font-size: .85rem; word-break: break-all; }
svg { background: #fff; width: 100%; height: auto; }
"""
_MAX_PLOT_POINTS = 2000


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _page(title: str, body: str) -> HTMLResponse:
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><link rel='stylesheet' href='/history/style.css'></head>"
        "<body><header><a href='/'>Live</a><a href='/history'>History</a></header>"
        f"<main><h1>{_e(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(document, headers=_HEADERS)


def _short(key: str | None) -> str:
    return "-" if key is None else (key[:12] + "…" if len(key) > 16 else key)


def _session_link(device: str, session: str) -> str:
    return f"/history/sessions/{quote(device, safe='')}/{quote(session, safe='')}"


def _course_link(patient: str) -> str:
    return f"/history/courses/{quote(patient, safe='')}"


def _filters(request: Request) -> dict[str, str | None]:
    params = request.query_params
    return {name: (params.get(name) or None) for name in ("device", "patient", "since", "until")}


async def _sessions(
    store: RecorderStore, filters: dict[str, str | None]
) -> list[queries.SessionRow]:
    return await queries.list_sessions(
        store,
        device=filters["device"],
        patient=filters["patient"],
        since=filters["since"],
        until=filters["until"],
    )


def render_energy_svg(pulses: list[tuple[int, int, int, str | None]]) -> str:
    """Energy per pulse (µJ) against pulse number, as an inline SVG polyline (at most
    2,000 points: a longer session is sampled evenly)."""
    if not pulses:
        return "<p class='muted'>No pulses recorded.</p>"
    step = max(1, len(pulses) // _MAX_PLOT_POINTS)
    shown = pulses[::step]
    width, height, pad = 800, 240, 40
    first, last = shown[0][0], shown[-1][0]
    low = min(p[2] for p in shown)
    high = max(p[2] for p in shown)
    span_x, span_y = max(1, last - first), max(1, high - low)
    points = " ".join(
        f"{pad + (p[0] - first) * (width - 2 * pad) / span_x:.1f},"
        f"{height - pad - (p[2] - low) * (height - 2 * pad) / span_y:.1f}"
        for p in shown
    )
    return (
        f"<svg viewBox='0 0 {width} {height}' role='img' "
        "aria-label='energy per pulse, from the recorded pulse batches'>"
        f"<polyline fill='none' stroke='#2e86c1' stroke-width='1' points='{points}'/>"
        f"<text x='{pad}' y='20' font-size='12'>{high} µJ</text>"
        f"<text x='{pad}' y='{height - 10}' font-size='12'>{low} µJ · pulses {first}–{last}"
        f"</text></svg>"
    )


def history_mount(db_url: str) -> Mount:
    """The history view as a Starlette ``Mount`` at ``/history``."""

    def with_store(
        handler: Callable[[RecorderStore, Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                store = await open_store(db_url, migrate=False)
                async with store:
                    return await handler(store, request)
            except StoreUnavailable as exc:
                return JSONResponse(
                    {"error": f"the recorder's database is unreachable: {exc}"}, status_code=503
                )

        return endpoint

    async def sessions_json(store: RecorderStore, request: Request) -> Response:
        rows = await _sessions(store, _filters(request))
        return JSONResponse([r.as_dict() for r in rows], headers=_HEADERS)

    async def session_json(store: RecorderStore, request: Request) -> Response:
        device, session = request.path_params["device"], request.path_params["session"]
        detail = await queries.session_detail(store, device, session)
        if detail is None:
            return JSONResponse({"error": "no such session recorded"}, status_code=404)
        pulses = await queries.session_pulses(store, device, session)
        return JSONResponse({**detail, "pulse_list": pulses}, headers=_HEADERS)

    async def index(store: RecorderStore, request: Request) -> Response:
        filters = _filters(request)
        rows = await _sessions(store, filters)
        inputs = "".join(
            f"<label>{name} <input name='{name}' value='{_e(value or '')}'"
            f"{' placeholder=YYYY-MM-DD' if name in ('since', 'until') else ''}></label>"
            for name, value in filters.items()
        )
        form = f"<form method='get' action='/history'>{inputs}<button>Filter</button></form>"
        body_rows = "".join(
            "<tr>"
            f"<td>{_e(r.started[:19].replace('T', ' '))}</td><td>{_e(r.device)}</td>"
            f"<td><a href='{_session_link(r.device, r.session)}'>{_e(r.session)}</a></td>"
            + (
                f"<td class='mono'><a href='{_course_link(r.patient)}'>{_e(_short(r.patient))}"
                "</a></td>"
                if r.patient
                else "<td>-</td>"
            )
            + f"<td>{_e(r.operator)}</td><td class='num'>{r.pulses}</td>"
            f"<td>{'open' if r.ended is None else _e(r.ended[11:19])}</td></tr>"
            for r in rows
        )
        table = (
            "<table><thead><tr><th>Started (UTC)</th><th>Device</th><th>Session</th>"
            "<th>Patient</th><th>Operator</th><th>Pulses</th><th>Ended</th></tr></thead>"
            f"<tbody>{body_rows}</tbody></table>"
            if rows
            else "<p class='muted'>No sessions recorded for these filters.</p>"
        )
        query = urlencode({k: v for k, v in filters.items() if v})
        api = f"/history/api/sessions{'?' + query if query else ''}"
        return _page(
            "Session history",
            f"{form}{table}<p class='muted'><a href='{_e(api)}'>as JSON</a></p>",
        )

    async def session_page(store: RecorderStore, request: Request) -> Response:
        device, session = request.path_params["device"], request.path_params["session"]
        detail = await queries.session_detail(store, device, session)
        if detail is None:
            return _page("Session not found", f"<p>No session {_e(session)} of {_e(device)}.</p>")
        pulses = await queries.session_pulses(store, device, session)
        facts = "".join(
            f"<tr><th>{_e(key.replace('_', ' '))}</th><td>{_e(detail[key])}</td></tr>"
            for key in queries.SESSION_FACTS
        )
        missing = ""
        if detail["ended"] is not None and detail["recorded_pulses"] != detail["pulses"]:
            missing = (
                f"<p class='warn'>The closing summary counts {detail['pulses']} pulses; the "
                f"recorded batches hold {detail['recorded_pulses']} (see the device's own log "
                "for the rest).</p>"
            )
        zones = "".join(
            f"<tr><td>{_e(z['zone'])}</td><td class='num'>{z['pulses']}</td>"
            f"<td class='num'>{z['energy_uj']}</td><td class='num'>{z['dropped']}</td></tr>"
            for z in detail["zones"]
        )
        events = "".join(
            f"<tr><td>{_e(ev['ts'][:23].replace('T', ' '))}</td><td>{_e(ev['stream'])}</td>"
            f"<td>{_e(ev['event'])}{' (historical)' if ev['historical'] else ''}</td></tr>"
            for ev in detail["events"]
        )
        api = f"/history/api{_session_link(device, session).removeprefix('/history')}"
        body = (
            f"{missing}<table>{facts}</table>"
            "<h2>Energy per pulse</h2>"
            f"{render_energy_svg(pulses)}"
            "<h2>Zones</h2><table><thead><tr><th>Zone</th><th>Pulses</th><th>Energy (µJ)</th>"
            f"<th>Dropped</th></tr></thead><tbody>{zones}</tbody></table>"
            "<h2>Events and alerts</h2><table><thead><tr><th>Time (UTC)</th><th>Stream</th>"
            f"<th>Event</th></tr></thead><tbody>{events}</tbody></table>"
            f"<p class='muted'>Rebuilt from recorded telemetry · <a href='{_e(api)}'>as JSON</a>"
            "</p>"
        )
        return _page(f"Session {session} on {device}", body)

    async def course_page(store: RecorderStore, request: Request) -> Response:
        patient = request.path_params["patient"]
        course = await queries.course(store, patient, now=datetime.now(UTC))
        if not course.sessions:
            return _page("Course", "<p class='muted'>No sessions recorded for this patient.</p>")
        state = "complete" if course.complete else f"next is session {course.next_number}"
        rows = "".join(
            f"<tr><td>{_e(s.started[:19].replace('T', ' '))}</td><td>{_e(s.device)}</td>"
            f"<td><a href='{_session_link(s.device, s.session)}'>{_e(s.session)}</a></td>"
            f"<td>{_e(s.kind)}{'' if s.number is None else ' ' + str(s.number)}</td>"
            f"<td class='num'>{s.pulses}</td><td class='num'>"
            f"{'-' if s.days_since_previous is None else f'{s.days_since_previous:.1f}'}</td></tr>"
            for s in course.sessions
        )
        warnings = "".join(f"<p class='warn'>{_e(w.message)}</p>" for w in course.warnings)
        body = (
            f"<p class='mono'>{_e(patient)}</p>"
            f"<p>{course.given} of {course.planned} given ({_e(state)}), {course.maintenance} "
            f"maintenance, on {_e(', '.join(course.devices))}</p>{warnings}"
            "<table><thead><tr><th>Started (UTC)</th><th>Device</th><th>Session</th>"
            f"<th>Kind</th><th>Pulses</th><th>Days since previous</th></tr></thead><tbody>{rows}"
            "</tbody></table>"
        )
        return _page("Course across devices", body)

    async def style(_request: Request) -> Response:
        return Response(_CSS, media_type="text/css", headers=_HEADERS)

    app = Starlette(
        routes=[
            Route("/", with_store(index)),
            Route("/style.css", style),
            Route("/sessions/{device}/{session}", with_store(session_page)),
            Route("/courses/{patient}", with_store(course_page)),
            Route("/api/sessions", with_store(sessions_json)),
            Route("/api/sessions/{device}/{session}", with_store(session_json)),
        ]
    )
    return Mount("/history", app=app, name="history")
