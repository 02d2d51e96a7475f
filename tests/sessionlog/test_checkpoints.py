"""Signed checkpoints: the device key, when checkpoints are written, and what they prove.

Every rewrite someone with write access to the device can make (a truncated tail with a copied
head, a recomputed chain, a deleted row, a replaced key) is caught once a checkpoint covering it
has left the device; what no witnessed checkpoint covers is said to be unproven, not hidden.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicectl.sessionlog import (
    Checkpoint,
    DeviceKey,
    SessionLog,
    SigningKeyError,
    verify_against,
    verify_log,
)
from devicectl.sessionlog.checkpoint import external_checkpoints
from devicectl.sessionlog.keys import (
    CREDENTIAL_NAME,
    KEY_FILENAME,
    key_source,
    load_or_create,
    parse_public_key,
    stage_rotation,
)
from tests.sessionlog.helpers import Clock, fill_session, open_log, session_info
from tests.sessionlog.tamper import (
    delete_row,
    first_pulse_seq,
    rewrite,
    rows,
    truncate_with_copied_head,
)

DEVICE = "0000ABCD"


def _payload(cp: Checkpoint, seq: int) -> dict[str, Any]:
    """As a subscriber receives it on log/checkpoint: the envelope and the agreed flat fields."""
    envelope = {"v": 1, "ts": "2026-12-07T10:00:00.000Z", "device": cp.device, "seq": seq}
    return {**envelope, "boot": 1, **cp.wire()}


def _build(path: Path, key: DeviceKey, sessions: int = 3) -> list[dict[str, Any]]:
    """A log of ``sessions`` sessions, each closed by its checkpoint, and an idle record after
    them (checkpointed at close). Returns the checkpoints as published."""
    made: list[Checkpoint] = []
    clock = Clock()
    with open_log(path, clock, signing_key=key, device=DEVICE, on_checkpoint=made.append) as slog:
        pulse_no = 1
        for n in range(1, sessions + 1):
            info = session_info(course_session_number=n)
            sid = slog.start_session(info, device_pulse_count=pulse_no - 1).session_id
            pulse_no = fill_session(slog, sid, first_pulse_no=pulse_no, pulses=6)
            slog.end_session(sid, actor="op-anna")
            slog.flush()
            clock.advance(days=8)
        slog.record_status(
            None, state=1, interlocks=0, head_temp_cdeg=2400, skin_temp_cdeg=3000, pulse_count=9
        )
    return [_payload(cp, n) for n, cp in enumerate(made, start=1)]


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, DeviceKey, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("signed") / "sessions.db"
    key = DeviceKey.generate()
    return path, key, _build(path, key)


@pytest.fixture
def copy(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]], tmp_path: Path
) -> tuple[Path, DeviceKey, list[dict[str, Any]]]:
    path = tmp_path / "sessions.db"
    shutil.copyfile(signed[0], path)
    return path, signed[1], signed[2]


# ── the key ──────────────────────────────────────────────────────────────────────────────────


def test_the_key_is_made_at_first_start_with_mode_0600_and_kept(tmp_path: Path) -> None:
    source = key_source(None, tmp_path / "data", {})
    assert source.path == tmp_path / "data" / KEY_FILENAME
    key, created = load_or_create(source)
    assert created
    assert stat.S_IMODE(source.path.stat().st_mode) == 0o600
    again, created_again = load_or_create(source)
    assert (again.key_id, created_again) == (key.key_id, False)
    assert key.key_id == hashlib.sha256(key.public_raw).digest()[:16].hex()
    assert parse_public_key(key.public_b64) == key.public_raw
    assert parse_public_key(key.public_raw.hex()) == key.public_raw
    assert parse_public_key(key.public_pem()) == key.public_raw


def test_a_configured_key_wins_then_a_systemd_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / CREDENTIAL_NAME).write_bytes(DeviceKey.generate().to_pem())
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    configured = tmp_path / "etc" / "log.pem"
    assert key_source(configured, tmp_path, environ).origin == "configured"
    source = key_source(None, tmp_path, environ)
    assert (source.origin, source.path) == ("credential", credentials / CREDENTIAL_NAME)
    assert not source.writable
    with pytest.raises(SigningKeyError, match="systemd credential"):
        stage_rotation(source)
    assert key_source(None, tmp_path, {"CREDENTIALS_DIRECTORY": str(tmp_path / "none")}).origin == (
        "data_dir"
    )


def test_a_key_file_that_is_not_a_key_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "log-key.pem"
    bad.write_text("not a key\n")
    with pytest.raises(SigningKeyError) as caught:
        SessionLog.open(tmp_path / "s.db", signing_key=key_source(bad, tmp_path, {}))
    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)


# ── when checkpoints are written ─────────────────────────────────────────────────────────────


def test_checkpoints_at_session_end_every_n_records_and_at_close(tmp_path: Path) -> None:
    made: list[Checkpoint] = []
    key = DeviceKey.generate()
    path = tmp_path / "s.db"
    with open_log(
        path, signing_key=key, device=DEVICE, checkpoint_every=10, on_checkpoint=made.append
    ) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.flush()
        for n in range(1, 26):  # one commit per pulse: a checkpoint at the 10th record after one
            slog.record_pulse(sid, n, n * 50_000, n, 2000, "cheeks")
            slog.flush()
        assert [cp.reason for cp in made] == ["periodic", "periodic"]
        slog.end_session(sid, actor="op-anna")
        slog.flush()
        assert made[-1].reason == "session_end"
        slog.record_event(None, "note", "op-anna", {})
    assert made[-1].reason == "shutdown"
    assert all(cp.signature_valid_with(key.public_raw) for cp in made)
    assert all(cp.device == DEVICE and cp.key_id == key.key_id for cp in made)
    report = verify_log(path)
    assert report.ok, report.findings
    assert report.checkpoints == len(made) == 4
    assert report.last_checkpoint is not None
    assert report.last_checkpoint.log_seq == report.head_seq - 1


def test_a_checkpoint_follows_the_first_unwitnessed_record_within_the_interval(
    tmp_path: Path,
) -> None:
    made: list[Checkpoint] = []
    with open_log(
        tmp_path / "s.db",
        signing_key=DeviceKey.generate(),
        device=DEVICE,
        checkpoint_interval_s=0.05,
        idle_checkpoint_interval_s=0.05,
        on_checkpoint=made.append,
    ) as slog:
        slog.record_event(None, "note", "op-anna", {})
        deadline = time.monotonic() + 5
        while not made and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer wakes by itself: nothing else is recorded
        assert [cp.reason for cp in made] == ["periodic"]
        assert made[0].log_seq == 2  # the key's introduction, then the note


def test_no_checkpoint_is_signed_before_the_device_id_is_known(tmp_path: Path) -> None:
    made: list[Checkpoint] = []
    with open_log(
        tmp_path / "s.db", signing_key=DeviceKey.generate(), on_checkpoint=made.append
    ) as slog:
        slog.record_event(None, "note", "op-anna", {})
        slog.flush()
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.end_session(sid, actor="op-anna")
        slog.flush()
        assert made == []
        slog.set_device(DEVICE)
    assert [cp.reason for cp in made] == ["shutdown"]
    assert made[0].device == DEVICE


# ── what an untouched log proves ─────────────────────────────────────────────────────────────


def test_an_untouched_log_is_proven_up_to_its_newest_witnessed_checkpoint(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = signed
    alone = verify_log(path)
    assert alone.ok
    assert alone.checkpoints == len(witnessed) == 4
    assert alone.proven_seq is None
    assert any("agrees with itself" in text for text in alone.cannot_rule_out())
    assert any("--key" in text for text in alone.cannot_rule_out())
    report = verify_against(path, witnessed, key.public_raw)
    assert report.ok, report.findings
    assert report.witnessed == 4
    # the newest checkpoint is the last record: its time and reason are not signed
    assert report.proven_seq == report.head_seq - 1
    assert report.cannot_rule_out() == [
        f"records {report.head_seq}..{report.head_seq} come after record {report.head_seq - 1}, "
        "the last one a witnessed checkpoint covers: nothing outside the device vouches for them, "
        "so they could have been altered or removed without a trace"
    ]


def test_a_change_after_the_newest_witnessed_checkpoint_is_not_proven_and_is_said(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = copy
    early = witnessed[:2]
    last = early[-1]["log_seq"]
    edit_at = first_pulse_seq(path, after=last + 1)
    rewrite(path, _edit_energy(edit_at), key=key)
    report = verify_against(path, early, key.public_raw)
    assert report.ok  # nothing witnessed covers it: nothing can contradict it
    assert report.proven_seq == last
    [unproven] = report.cannot_rule_out()
    assert f"records {last + 1}..{report.head_seq}" in unproven


# ── every tampering from the issue, caught once a covering checkpoint was witnessed ─────────


def _edit_energy(seq: int) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    def change(all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**row, "energy_uj": row["energy_uj"] + 500} if row["seq"] == seq else row
            for row in all_rows
        ]

    return change


def test_a_truncated_tail_with_a_copied_head_is_caught_and_named(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = copy
    newest = witnessed[-1]
    keep = witnessed[1]["log_seq"] + 3
    truncate_with_copied_head(path, keep)
    assert verify_log(path).ok  # the file agrees with itself: the chain alone cannot tell
    report = verify_against(path, witnessed, key.public_raw)
    assert not report.ok
    truncated = [f for f in report.findings if f.problem == "truncated"]
    assert {f.seq for f in truncated} == {w["log_seq"] for w in witnessed[2:]}
    message = next(f.message for f in truncated if f.seq == newest["log_seq"])
    assert newest["time"] in message
    assert f"records {keep + 1}..{newest['log_seq']}" in message
    assert report.proven_seq == witnessed[1]["log_seq"]  # the part left is still proven


def test_a_recomputed_chain_is_caught_by_its_own_checkpoints_without_the_key(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, _key, _witnessed = copy
    rewrite(path, _edit_energy(first_pulse_seq(path)))  # hashes recomputed, signatures kept
    report = verify_log(path)
    assert report.first_break is None
    assert not report.ok
    assert {f.problem for f in report.findings} == {"checkpoint_hash"}


def test_a_recomputed_and_re_signed_chain_is_caught_by_a_witnessed_checkpoint(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = copy
    edit_at = first_pulse_seq(path)
    rewrite(path, _edit_energy(edit_at), key=key)  # root with the device's key
    assert verify_log(path).ok
    report = verify_against(path, witnessed, key.public_raw)
    assert not report.ok
    assert {f.problem for f in report.findings} == {"altered"}
    first = witnessed[0]
    finding = next(f for f in report.findings if f.seq == first["log_seq"])
    assert first["time"] in finding.message
    assert f"record {first['log_seq']}" in finding.message


def test_a_deleted_middle_row_is_caught(copy: tuple[Path, DeviceKey, list[dict[str, Any]]]) -> None:
    path, key, witnessed = copy
    gone = first_pulse_seq(path) + 2
    delete_row(path, gone)
    report = verify_against(path, witnessed, key.public_raw)
    assert report.first_break is not None
    assert report.first_break.seq == gone
    assert {f.problem for f in report.findings} == {"deleted"}


def test_a_deleted_row_renumbered_and_re_signed_is_caught(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = copy
    gone = first_pulse_seq(path) + 2
    rewrite(path, lambda all_rows: [r for r in all_rows if r["seq"] != gone], key=key)
    assert verify_log(path).ok
    report = verify_against(path, witnessed, key.public_raw)
    assert not report.ok
    assert {f.seq for f in report.findings} == {w["log_seq"] for w in witnessed}


def test_a_replaced_key_is_caught_by_a_witness_and_by_the_enrolled_key(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = copy
    forger = DeviceKey.generate()
    rewrite(path, _edit_energy(first_pulse_seq(path)), new_key=forger)
    alone = verify_log(path)
    assert alone.ok  # consistent with itself, under the forger's key
    assert [k.key_id for k in alone.keys] == [forger.key_id]
    by_witness = verify_against(path, witnessed)
    assert {f.problem for f in by_witness.findings} == {"witness_key_unknown"}
    assert key.key_id in by_witness.findings[0].message
    by_enrolment = verify_against(path, (), key.public_raw)
    assert [f.problem for f in by_enrolment.findings] == ["key_not_enrolled"]


def test_a_key_file_replaced_on_the_device_is_flagged_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    source = key_source(None, tmp_path, {})
    with open_log(path, signing_key=source, device=DEVICE) as slog:
        slog.record_event(None, "note", "op-anna", {})
    source.path.unlink()  # the old key is lost or swapped: a new one is made at the next start
    with open_log(path, signing_key=source) as slog:
        slog.record_event(None, "note", "op-anna", {})
    report = verify_log(path)
    assert [f.problem for f in report.findings] == ["key_unintroduced"]
    assert "without a checkpoint signed by the old key" in report.findings[0].message


def test_a_rotated_key_is_introduced_by_the_old_one_and_trusted_through_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    source = key_source(None, tmp_path, {})
    made: list[Checkpoint] = []
    with open_log(path, signing_key=source, device=DEVICE, on_checkpoint=made.append) as slog:
        old_id = slog.key_id
        slog.record_event(None, "note", "op-anna", {})
    new = stage_rotation(source)
    assert stat.S_IMODE(source.pending.stat().st_mode) == 0o600
    with open_log(path, signing_key=source, on_checkpoint=made.append) as slog:
        assert slog.key_id == old_id  # until its introduction is signed
        slog.record_event(None, "note", "op-anna", {})
        slog.flush()
        assert slog.key_id == new.key_id
        slog.record_event(None, "note", "op-anna", {})
    assert not source.pending.exists()
    assert load_or_create(source)[0].key_id == new.key_id
    assert [cp.reason for cp in made] == ["shutdown", "key_rotation", "shutdown"]
    assert [cp.key_id for cp in made] == [old_id, old_id, new.key_id]
    witnessed = [_payload(cp, n) for n, cp in enumerate(made, start=1)]
    old_public = parse_public_key(made[0].public_key)
    report = verify_against(path, witnessed, old_public)
    assert report.ok, report.findings
    assert [(k.key_id, k.signed_by_previous) for k in report.keys] == [
        (old_id, False),
        (new.key_id, True),
    ]
    assert report.proven_seq == report.head_seq - 1


# ── inputs as captured off the device ────────────────────────────────────────────────────────


def test_checkpoints_are_read_from_mosquitto_sub_lines_json_lines_and_a_report(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    _path, _key, witnessed = signed
    sub = [f"lasers/clinic/{DEVICE}/log/checkpoint {json.dumps(w)}\n" for w in witnessed]
    sub.insert(1, f'lasers/clinic/{DEVICE}/pulses {{"v":1,"count":3}}\n')
    sub.insert(2, f"lasers/clinic/{DEVICE}/session \n")
    sub.append(f'lasers/clinic/{DEVICE}/log/checkpoint {{"log_seq": 3, broken\n')
    found = list(external_checkpoints(sub))
    payloads = [item for _, item in found if isinstance(item, dict)]
    assert [p["log_seq"] for p in payloads] == [w["log_seq"] for w in witnessed]
    assert [item for _, item in found if isinstance(item, str)] == [
        f"line {len(sub)} is not JSON (Expecting property name enclosed in double quotes)"
    ]
    lines = [json.dumps(w) + "\n" for w in witnessed]
    assert [p for _, p in external_checkpoints(lines)] == witnessed
    ended = {"device": DEVICE, "event": "ended", "checkpoint": {k: witnessed[0][k] for k in (
        "log_seq", "hash", "time", "key_id", "public_key", "signature")}}  # fmt: skip
    [(_, from_event)] = list(external_checkpoints([json.dumps(ended)]))
    assert isinstance(from_event, dict)
    assert from_event["device"] == DEVICE and from_event["log_seq"] == witnessed[0]["log_seq"]


def test_a_forged_or_foreign_witness_is_ignored_and_said(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    path, key, witnessed = signed
    forged = {**witnessed[0], "hash": "0" * 64}
    foreign = {**witnessed[1], "device": "0000FFFF"}
    report = verify_against(path, [forged, foreign, {"log_seq": "x"}], key.public_raw)
    assert report.ok
    assert [w.status for w in report.witnesses] == ["ignored"] * 3
    assert "does not verify" in report.witnesses[0].message
    assert "0000FFFF" in report.witnesses[1].message
    assert report.proven_seq is None


# ── property: detection exactly when a witnessed checkpoint covers the change ───────────────


@pytest.fixture(scope="module")
def long_signed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, DeviceKey, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("long") / "sessions.db"
    key = DeviceKey.generate()
    return path, key, _build(path, key, sessions=5)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_detection_exactly_when_a_witnessed_checkpoint_covers_the_change(
    long_signed: tuple[Path, DeviceKey, list[dict[str, Any]]], data: st.DataObject
) -> None:
    template, key, published = long_signed
    witnessed = data.draw(
        st.lists(st.sampled_from(published), unique_by=lambda w: w["seq"]), label="witnessed"
    )
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sessions.db"
        shutil.copyfile(template, path)
        all_rows = rows(path)
        head = len(all_rows)
        mode = data.draw(st.sampled_from(["edit", "delete", "truncate"]), label="mode")
        if mode == "truncate":
            keep = data.draw(st.integers(1, head - 1), label="keep")
            truncate_with_copied_head(path, keep)
            changed_from = keep + 1
        else:
            pulses = [r["seq"] for r in all_rows if r["table"] == "pulses"]
            at = data.draw(st.sampled_from(pulses), label="at")
            change = (
                _edit_energy(at)
                if mode == "edit"
                else (lambda rs, at=at: [r for r in rs if r["seq"] != at])
            )
            rewrite(path, change, key=key)  # the strongest attacker: root and the device key
            changed_from = at
        report = verify_against(path, witnessed, key.public_raw)
    covered = any(w["log_seq"] >= changed_from for w in witnessed)
    assert report.ok is not covered, (mode, changed_from, [w["log_seq"] for w in witnessed])
    if covered:
        assert all(f.problem in {"truncated", "altered"} for f in report.findings)
    else:
        newest = max((w["log_seq"] for w in witnessed), default=None)
        assert report.proven_seq == newest


# ── the report ───────────────────────────────────────────────────────────────────────────────


def test_the_report_shows_the_checkpoint_and_its_json_proves_the_session(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from devicectl.sessionlog import export, report, store

    path, key, witnessed = signed
    conn = store.connect(path, readonly=True)
    try:
        doc = export.session_document(conn, 2, with_pulses=False)
        page = report.render_report(conn, 2)
        export.write_json(conn, 2, tmp_path / "session-2.json")
    finally:
        conn.close()
    checkpoint = doc["checkpoint"]
    assert checkpoint["log_seq"] == witnessed[1]["log_seq"]
    assert checkpoint["signature"] == witnessed[1]["signature"]
    assert checkpoint["record_seq"] == checkpoint["log_seq"] + 1
    for text in (key.key_id, checkpoint["hash"], checkpoint["signature"], "Log checkpoint"):
        assert text in page
    lines = (tmp_path / "session-2.json").read_text().splitlines(keepends=True)
    found = [item for _, item in external_checkpoints(lines)]
    proved = verify_against(path, found, key.public_raw)
    assert proved.ok
    assert proved.proven_seq == checkpoint["log_seq"]


def test_a_session_with_no_checkpoint_yet_says_so_in_its_report(tmp_path: Path) -> None:
    from devicectl.sessionlog import report, store

    path = tmp_path / "s.db"
    with open_log(path) as slog:  # no key: nothing is signed
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        slog.end_session(sid, actor="op-anna")
    conn = store.connect(path, readonly=True)
    try:
        page = report.render_report(conn, sid)
    finally:
        conn.close()
    assert "No signed checkpoint of the session log covers this session yet" in page


def test_the_key_file_is_never_world_readable_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key, _ = load_or_create(key_source(None, tmp_path, {}))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY_FILENAME).stat().st_mode) == 0o600
    assert "PRIVATE" not in repr(key)


# ── the commands ─────────────────────────────────────────────────────────────────────────────


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from devicectl.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_log_verify_proves_against_a_capture_and_names_what_contradicts_it(
    copy: tuple[Path, DeviceKey, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, key, witnessed = copy
    capture = tmp_path / "captured.txt"
    capture.write_text(
        "".join(f"lasers/clinic/{DEVICE}/log/checkpoint {json.dumps(w)}\n" for w in witnessed)
    )
    code, text = _cli("log", "verify", "--db", str(path))
    assert code == 0, text
    assert "intact" in text and "cannot rule out: no checkpoint from outside" in text
    code, text = _cli(
        "log", "verify", "--db", str(path), "--checkpoints", str(capture), "--key", key.public_b64
    )
    assert code == 0, text
    assert f"PROVEN: records 1..{witnessed[-1]['log_seq']}" in text
    own = witnessed[-1]["log_seq"] + 1  # the newest checkpoint's own record, the last one
    assert text.count("cannot rule out") == 1
    assert f"cannot rule out: records {own}..{own} come after" in text
    keep = witnessed[2]["log_seq"] - 5
    truncate_with_copied_head(path, keep)
    code, text = _cli(
        "log", "verify", "--db", str(path), "--checkpoints", str(capture), "--key", key.public_b64
    )
    assert code == 1, text
    assert "NOT intact" in text
    assert f"records {keep + 1}..{witnessed[-1]['log_seq']} (at least) were removed" in text
    assert witnessed[-1]["time"] in text
    assert "Traceback" not in text


def test_log_verify_refuses_a_key_that_is_not_one_in_one_line(
    signed: tuple[Path, DeviceKey, list[dict[str, Any]]],
) -> None:
    code, text = _cli("log", "verify", "--db", str(signed[0]), "--key", "not-a-key")
    assert code == 2
    assert len(text.strip().splitlines()) == 1
    assert "not an Ed25519 public key" in text


def test_log_key_prints_the_key_to_enrol_and_rotate_key_stages_the_next(tmp_path: Path) -> None:
    source = key_source(None, tmp_path, {})
    with open_log(tmp_path / "sessions.db", signing_key=source, device=DEVICE) as slog:
        key_id = slog.key_id
    assert key_id is not None
    code, text = _cli("log", "key", "--data-dir", str(tmp_path), "--pem")
    assert code == 0, text
    assert f"key id:     {key_id}" in text
    assert "BEGIN PUBLIC KEY" in text
    public = next(line.split()[-1] for line in text.splitlines() if line.startswith("public key"))
    assert DeviceKey.from_pem(source.path.read_bytes()).public_b64 == public
    code, text = _cli("log", "rotate-key", "--data-dir", str(tmp_path))
    assert code == 0, text
    assert source.pending.is_file()
    assert stage_rotation(source).key_id in text
    source.path.unlink()  # not readable here: the key the log names is printed instead
    source.pending.unlink()
    code, text = _cli("log", "key", "--data-dir", str(tmp_path))
    assert code == 0, text
    assert key_id in text and "the key the log names" in text


def test_the_reconciliation_after_a_crash_is_checkpointed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    key = DeviceKey.generate()
    with open_log(path, signing_key=key, device=DEVICE) as slog:
        sid = slog.start_session(session_info(), device_pulse_count=0).session_id
        fill_session(slog, sid, first_pulse_no=1, pulses=3)
    made: list[Checkpoint] = []
    with open_log(path, signing_key=key, on_checkpoint=made.append) as slog:
        recovery = slog.recover_interrupted(10, 60_000)
        assert recovery.interrupted_session == sid
        slog.flush()
        assert [cp.reason for cp in made] == ["session_end"]
    assert verify_log(path).ok
