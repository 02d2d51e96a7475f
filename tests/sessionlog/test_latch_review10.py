"""The breach a log holds latched is the first since the last acknowledgement (the one the
supervisor latched), not the last recorded: a later breach while it is latched does not move it."""

from __future__ import annotations

from pathlib import Path

from devicectl.sessionlog.export import session_document
from devicectl.sessionlog.store import connect
from tests.sessionlog.helpers import Clock, fill_session, open_log, session_info

LATCHED = {"code": "energy_out_of_tolerance", "pulse_no": 3, "value": 1950, "limit": 1800}
LATER = {"code": "uncommanded_emission", "pulse_no": 9, "value": 2000, "limit": 0}
ACK = {"breach": "energy_out_of_tolerance", "pulse_no": 3, "signed_off_by": "SUP-1",
       "signed_off_role": "supervisor", "reason_code": "handpiece_checked"}  # fmt: skip


def test_a_later_breach_outside_the_session_does_not_move_the_latch(tmp_path: Path) -> None:
    """Session 1 latches an energy breach and ends; a stuck shutter then fires with no session
    open (a breach of its own, recorded while the first stays latched). The log restored the
    later one as the latch at the next start, and filed the acknowledgement of session 1's
    breach outside session 1."""
    path = tmp_path / "sessions.db"
    clock = Clock()
    with open_log(path, clock) as slog:
        first = slog.start_session(session_info(patient_ref="PT-0001")).session_id
        fill_session(slog, first, first_pulse_no=1, pulses=3, start_ns=clock.now)
        slog.record_event(first, "breach", "devicectl", LATCHED | {"session": first})
        slog.end_session(first, actor="OP-7", role="operator")
        slog.record_event(None, "breach", "devicectl", LATER | {"session": None})
    clock.advance(seconds=60)
    with open_log(path, clock) as slog:
        latched = slog.unacknowledged_breach
        assert latched is not None and latched["code"] == LATCHED["code"], latched
        slog.record_event(first, "fault_ack", "OP-7", ACK, "energy re-measured", role="operator")
    conn = connect(path, readonly=True)
    try:
        document = session_document(conn, first)
    finally:
        conn.close()
    assert [s["kind"] for s in document["signoffs"]] == ["fault_ack"], document["signoffs"]
