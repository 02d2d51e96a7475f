"""Shared builders for the session log tests: a valid session, a clock, a filled log."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from devicectl.sessionlog import SessionLog

T0 = 1_795_600_000_000_000_000  # 2026-11-25 09:46:40 UTC, ns since the epoch
DAY_NS = 86_400 * 10**9

_INFO: dict[str, Any] = {
    "device_serial": "SIM-0001",
    "operator": "op-anna",
    "patient_ref": "PT-0042",
    "skin_type": "III",
    "concerns": ["fine_lines", "dehydration"],
    "course": {"course_id": "C-0042-A", "session_number": 1, "planned_sessions": 4},
    "checklist": {
        "consultation_done": True,
        "consent_given": True,
        "area_cleaned": True,
        "numbing_applied": False,
        "contraindications": {
            "recent_sun_exposure_or_tan": False,
            "photosensitising_medication": False,
            "active_skin_infection_or_inflammation": False,
            "pregnancy": False,
            "allergy_to_active_ingredient": False,
        },
    },
    "active_ingredient": "hyaluronic acid 1 %",
}


def session_info(**changes: Any) -> dict[str, Any]:
    """A complete, valid session; ``changes`` replace top-level keys, ``course_*`` and
    ``checklist_*``/``ci_*`` keys replace nested ones (``ci_`` = a contraindication)."""
    info = copy.deepcopy(_INFO)
    for key, value in changes.items():
        if key.startswith("course_"):
            info["course"][key.removeprefix("course_")] = value
        elif key.startswith("checklist_"):
            info["checklist"][key.removeprefix("checklist_")] = value
        elif key.startswith("ci_"):
            info["checklist"]["contraindications"][key.removeprefix("ci_")] = value
        else:
            info[key] = value
    return info


class Clock:
    """An injected wall clock in ns; tests move it instead of sleeping."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, *, days: float = 0, seconds: float = 0) -> None:
        self.now += int(days * DAY_NS + seconds * 1e9)


def open_log(path: Path, clock: Clock | None = None, **options: Any) -> SessionLog:
    return SessionLog.open(path, synchronous="NORMAL", clock=clock or Clock(), **options)


def fill_session(
    slog: SessionLog,
    session_id: int,
    *,
    first_pulse_no: int,
    pulses: int,
    zone: str = "cheeks",
    energy_uj: int = 2000,
    spot_um: int = 300,
    start_ns: int = T0,
) -> int:
    """Zone, params, ``pulses`` pulses 50 ms apart, STATUS samples; returns the next pulse_no."""
    slog.record_zone(session_id, zone, actor="op-anna", energy_limit_uj=pulses * energy_uj * 2)
    slog.record_params(
        session_id,
        energy_uj=energy_uj,
        width_us=1000,
        rate_mhz=20_000,
        spot_um=spot_um,
        actor="op-anna",
    )
    pulse_no = first_pulse_no
    for i in range(pulses):
        host_ns = start_ns + i * 50_000_000
        slog.record_pulse(
            session_id, pulse_no, (i * 50_000) % 2**32, host_ns, energy_uj + i % 7, zone
        )
        slog.record_status(
            session_id,
            state=3,
            interlocks=0,
            head_temp_cdeg=2500 + i,
            skin_temp_cdeg=3200 + i,
            pulse_count=pulse_no,
            host_time_ns=host_ns,
        )
        pulse_no += 1
    return pulse_no
