"""Attacks on the signed checkpoints from outside, by someone who can write the device's data
directory (but cannot read its key), and the inputs `log verify` must survive.

Each test here failed before its fix: a key planted in the data directory was introduced as a
proper rotation; the key file's temporary name followed a planted symlink; a FIFO as key file hung
the start; a deeply nested or oversized JSON value in a capture or in the log crashed the verifier.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from devicectl.errors import LogUnavailable
from devicectl.sessionlog import Checkpoint, DeviceKey, SigningKeyError, verify_against
from devicectl.sessionlog.chain import record_hash
from devicectl.sessionlog.checkpoint import external_checkpoints
from devicectl.sessionlog.keys import key_source, load_or_create, stage_rotation
from tests.conftest import IN_CI
from tests.sessionlog.helpers import open_log
from tests.sessionlog.tamper import rewrite, truncate_with_copied_head

DEVICE = "0000ABCD"


def _log_with_key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "s.db"
    source = key_source(None, tmp_path, {})
    with open_log(path, signing_key=source, device=DEVICE) as slog:
        key_id = slog.key_id
        slog.record_event(None, "note", "op-anna", {})
    assert key_id is not None
    return path, key_id


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606])
def test_a_staged_key_others_could_have_written_or_read_is_not_introduced(
    tmp_path: Path, mode: int
) -> None:
    path, old_id = _log_with_key(tmp_path)
    source = key_source(None, tmp_path, {})
    planted = DeviceKey.generate()
    source.pending.write_bytes(planted.to_pem())
    source.pending.chmod(mode)
    with pytest.raises(SigningKeyError, match="next signing key") as caught:
        open_log(path, signing_key=source)
    assert "\n" not in str(caught.value)
    assert load_or_create(source)[0].key_id == old_id  # the device's own key is kept
    assert [k.key_id for k in verify_against(path, ()).keys] == [old_id]


def test_a_staged_key_that_is_a_symlink_is_not_introduced(tmp_path: Path) -> None:
    path, old_id = _log_with_key(tmp_path)
    source = key_source(None, tmp_path, {})
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(DeviceKey.generate().to_pem())
    elsewhere.chmod(0o600)
    source.pending.symlink_to(elsewhere)
    with pytest.raises(SigningKeyError, match="next signing key"):
        open_log(path, signing_key=source)
    assert load_or_create(source)[0].key_id == old_id


# CI runs as root: there a non-root run fails rather than skips.
@pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="needs root to give the file another owner"
)
def test_a_staged_key_owned_by_another_user_is_not_introduced(tmp_path: Path) -> None:
    path, old_id = _log_with_key(tmp_path)
    source = key_source(None, tmp_path, {})
    source.pending.write_bytes(DeviceKey.generate().to_pem())
    source.pending.chmod(0o600)
    os.chown(source.pending, 1234, 1234)
    with pytest.raises(SigningKeyError, match="owned by uid 1234"):
        open_log(path, signing_key=source)
    assert load_or_create(source)[0].key_id == old_id


def test_a_properly_staged_key_is_still_introduced(tmp_path: Path) -> None:
    path, old_id = _log_with_key(tmp_path)
    source = key_source(None, tmp_path, {})
    new = stage_rotation(source)
    with open_log(path, signing_key=source) as slog:
        slog.record_event(None, "note", "op-anna", {})
    assert [k.key_id for k in verify_against(path, ()).keys] == [old_id, new.key_id]


@pytest.mark.parametrize("staged", [False, True])
def test_writing_a_key_never_follows_a_planted_symlink(tmp_path: Path, staged: bool) -> None:
    source = key_source(None, tmp_path / "data", {})
    source.path.parent.mkdir()
    if staged:
        load_or_create(source)
    target = source.pending if staged else source.path
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    # the temporary name a previous version used, for this process
    (target.parent / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    key = stage_rotation(source) if staged else load_or_create(source)[0]
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not target.is_symlink()
    assert DeviceKey.from_pem(target.read_bytes()).key_id == key.key_id


def test_a_key_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    source = key_source(None, tmp_path, {})
    os.mkfifo(source.path)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_or_create(source)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)
        else:
            outcome.append(None)

    loader = threading.Thread(target=load)
    loader.start()
    loader.join(5.0)
    if loader.is_alive():  # unblock it so the thread ends, then fail
        with open(source.path, "wb"):
            pass
        loader.join()
        pytest.fail("loading a FIFO as the signing key blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], SigningKeyError)
    assert "not a regular file" in str(outcome[0])


# ── what `log verify` reads: a capture, and the log's own bodies ─────────────────────────────


def _append(path: Path, kind: str, body: str) -> None:
    """Append a record to the chain by hand (recomputing its hash and the head: no key needed)."""
    conn = sqlite3.connect(path)
    try:
        seq, prev = conn.execute("SELECT seq, hash FROM chain_head").fetchone()
        digest = record_hash(prev, seq + 1, None, 1, kind, body)
        conn.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", (seq + 1, None, kind, 1, body, digest)
        )
        conn.execute("UPDATE chain_head SET seq = ?, hash = ?", (seq + 1, digest))
        conn.commit()
    finally:
        conn.close()


_HOSTILE = {
    "deep array": "[" * 100_000 + "]" * 100_000,
    "deep object": '{"checkpoint":' * 20_000 + "{}" + "}" * 20_000,
    "nested checkpoints": '{"checkpoint":' * 600 + "{}" + "}" * 600,
    "huge integer": '{"log_seq": ' + "9" * 5000 + ', "signature": "x"}',
}


@pytest.mark.parametrize("text", list(_HOSTILE.values()), ids=list(_HOSTILE))
@pytest.mark.parametrize("shape", ["json line", "mosquitto_sub line", "document"])
def test_a_hostile_capture_is_read_without_crashing(text: str, shape: str) -> None:
    line = {"json line": text, "mosquitto_sub line": f"lasers/s/{DEVICE}/log/checkpoint {text}"}
    lines = (
        [text] if shape == "document" else ['{"note": 1}\n', line[shape] + "\n", '{"log_seq": 1\n']
    )
    found = list(external_checkpoints(lines))
    assert all(isinstance(item, str) for _, item in found)


@pytest.mark.parametrize("kind", ["checkpoint", "log_key"])
@pytest.mark.parametrize("body", list(_HOSTILE.values()), ids=list(_HOSTILE))
def test_a_hostile_body_in_the_log_is_a_finding_not_a_crash(
    tmp_path: Path, kind: str, body: str
) -> None:
    path, _ = _log_with_key(tmp_path)
    _append(path, kind, body)
    report = verify_against(path, ())
    assert not report.ok
    assert [f.problem for f in report.findings] == ["checkpoint_malformed"]
    assert "\n" not in report.findings[0].message


_BROKEN_BODIES = {"not json": "nope", "a list": "[1]", "deep": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("kind", ["checkpoint", "log_key"])
@pytest.mark.parametrize("body", list(_BROKEN_BODIES.values()), ids=list(_BROKEN_BODIES))
def test_a_broken_signing_record_stops_the_log_opening_in_one_line(
    tmp_path: Path, kind: str, body: str
) -> None:
    path, _ = _log_with_key(tmp_path)
    _append(path, kind, body)
    with pytest.raises(LogUnavailable) as caught:
        open_log(path, signing_key=key_source(None, tmp_path, {}))
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("body", list(_BROKEN_BODIES.values()), ids=list(_BROKEN_BODIES))
def test_log_key_names_a_broken_key_record_in_one_line(tmp_path: Path, body: str) -> None:
    from typer.testing import CliRunner

    from devicectl.cli import app

    path, _ = _log_with_key(tmp_path)
    _append(path, "log_key", body)
    result = CliRunner().invoke(
        app, ["log", "key", "--data-dir", str(tmp_path / "elsewhere"), "--db", str(path)]
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "malformed" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_text_from_the_log_cannot_rewrite_the_verdict_on_a_terminal(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devicectl.cli import app

    path, _ = _log_with_key(tmp_path)
    spoof = "\x1b[2J\x1b[H\rsession log intact"

    def forge(all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in all_rows:
            if row.get("kind") in ("log_key", "checkpoint"):
                body = json.loads(row["body"])
                body["introduced" if row["kind"] == "log_key" else "device"] = spoof
                row["body"] = json.dumps(body)
        return all_rows

    rewrite(path, forge)
    capture = tmp_path / "capture.txt"
    capture.write_text(json.dumps({"device": spoof, "log_seq": 1, "signature": "x"}) + "\n")
    result = CliRunner().invoke(
        app, ["log", "verify", "--db", str(path), "--checkpoints", str(capture)]
    )
    assert result.exit_code == 1
    assert "NOT intact" in result.output
    assert "\x1b" not in result.output and "\r" not in result.output


def test_the_witnessed_checkpoints_own_record_is_not_called_proven(tmp_path: Path) -> None:
    made: list[Checkpoint] = []
    path = tmp_path / "s.db"
    with open_log(path, signing_key=DeviceKey.generate(), device=DEVICE, on_checkpoint=made.append):
        pass
    [checkpoint] = made
    witness = {"device": DEVICE, **checkpoint.wire()}
    assert verify_against(path, [witness]).proven_seq == checkpoint.log_seq

    def backdate(all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        last = all_rows[-1]  # the checkpoint's own record: its time and reason are not signed
        body = json.loads(last["body"])
        body["reason"] = "periodic"
        return [*all_rows[:-1], {**last, "at_ns": last["at_ns"] - 30 * 86_400 * 10**9,
                                  "session_id": 1, "body": json.dumps(body)}]  # fmt: skip

    rewrite(path, backdate)  # no key needed: the signed fields are untouched
    report = verify_against(path, [witness])
    assert report.ok  # nothing witnessed covers the change ...
    assert report.proven_seq == checkpoint.log_seq  # ... so it is not called proven
    assert any(
        f"records {checkpoint.log_seq + 1}..{report.head_seq}" in text
        for text in report.cannot_rule_out()
    )


def test_a_log_cut_before_a_rotation_is_caught_with_the_first_enrolled_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    source = key_source(None, tmp_path, {})
    made: list[Checkpoint] = []
    with open_log(path, signing_key=source, device=DEVICE, on_checkpoint=made.append) as slog:
        slog.record_event(None, "note", "op-anna", {})
    first = load_or_create(source)[0]
    stage_rotation(source)
    with open_log(path, signing_key=source, on_checkpoint=made.append) as slog:
        slog.flush()
        slog.record_event(None, "note", "op-anna", {})
    assert [cp.key_id == first.key_id for cp in made] == [True, True, False]
    # what the retained topic holds later: the newest checkpoint, signed with the new key
    retained = {"device": DEVICE, **made[-1].wire()}
    assert made[0].record_seq is not None
    truncate_with_copied_head(path, made[0].record_seq)  # back to before the rotation
    report = verify_against(path, [retained], first.public_raw)
    assert not report.ok
    assert [f.problem for f in report.findings] == ["witness_key_unknown"]
    assert f"record {made[-1].log_seq}" in report.findings[0].message


def test_a_log_re_signed_for_another_device_id_is_still_contradicted_by_the_witnesses(
    tmp_path: Path,
) -> None:
    made: list[Checkpoint] = []
    path = tmp_path / "s.db"
    with open_log(path, signing_key=DeviceKey.generate(), device=DEVICE, on_checkpoint=made.append):
        pass
    with open_log(path, device=DEVICE, on_checkpoint=made.append) as slog:
        slog.record_event(None, "note", "op-anna", {})
    witnessed = [{"device": DEVICE, **cp.wire()} for cp in made]
    other: list[Checkpoint] = []
    with open_log(
        tmp_path / "other.db",
        signing_key=DeviceKey.generate(),
        device="0000FFFF",
        on_checkpoint=other.append,
    ):
        pass
    fleet = [*witnessed, {"device": "0000FFFF", **other[0].wire()}]
    untouched = verify_against(path, fleet)  # a capture of many devices: only this one's used
    assert untouched.ok
    assert [w.status for w in untouched.witnesses][-1] == "ignored"

    def elsewhere(all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in all_rows:
            if row.get("kind") == "checkpoint":
                row["body"] = json.dumps({**json.loads(row["body"]), "device": "0000FFFF"})
        return all_rows

    # no key of the device's needed: the whole log made over to a key and a device id of one's own
    rewrite(path, elsewhere, new_key=DeviceKey.generate())
    report = verify_against(path, witnessed)
    assert not report.ok
    assert {f.problem for f in report.findings} == {"witness_key_unknown"}


def test_the_proof_names_the_device_it_is_for(tmp_path: Path) -> None:
    """A whole log copied from another device of the fleet is proven by that device's witnesses
    (a capture of many devices holds them): the verdict must say whose log it proved."""
    from typer.testing import CliRunner

    from devicectl.cli import app

    made: list[Checkpoint] = []
    path = tmp_path / "s.db"
    with open_log(path, signing_key=DeviceKey.generate(), device=DEVICE, on_checkpoint=made.append):
        pass
    capture = tmp_path / "capture.txt"
    capture.write_text(json.dumps({"device": DEVICE, **made[0].wire()}) + "\n")
    result = CliRunner().invoke(
        app, ["log", "verify", "--db", str(path), "--checkpoints", str(capture)]
    )
    assert result.exit_code == 0, result.output
    [proven] = [line for line in result.output.splitlines() if line.startswith("PROVEN")]
    assert f"device {DEVICE}" in proven
