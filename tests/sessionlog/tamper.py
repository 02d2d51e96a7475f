"""What someone with write access to the device can do to a closed session log, by hand.

:func:`rewrite` is the strongest such attacker: it takes every row, lets ``change`` edit or drop
any, renumbers the chain, recomputes every hash with :mod:`devicectl.sessionlog.chain` and, given
the device's key (root can read it), re-signs every stored checkpoint so that the file agrees with
itself completely. Only a checkpoint that left the device before can contradict the result.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devicectl.sessionlog.chain import GENESIS, pulse_hash, record_hash
from devicectl.sessionlog.checkpoint import CHECKPOINT_KIND, KEY_KIND, make_checkpoint
from devicectl.sessionlog.keys import DeviceKey

Row = dict[str, Any]


def rows(path: Path) -> list[Row]:
    conn = sqlite3.connect(path)
    try:
        pulses = [
            {"table": "pulses", "seq": r[0], "session_id": r[1], "pulse_no": r[2], "t_us": r[3],
             "host_ns": r[4], "energy_uj": r[5], "zone": r[6]}
            for r in conn.execute(
                "SELECT seq, session_id, pulse_no, t_us, host_ns, energy_uj, zone FROM pulses"
            )
        ]  # fmt: skip
        records = [
            {"table": "records", "seq": r[0], "session_id": r[1], "kind": r[2], "at_ns": r[3],
             "body": r[4]}
            for r in conn.execute("SELECT seq, session_id, kind, at_ns, body FROM records")
        ]  # fmt: skip
    finally:
        conn.close()
    return sorted(pulses + records, key=lambda r: r["seq"])


def rewrite(
    path: Path,
    change: Callable[[list[Row]], list[Row]],
    *,
    key: DeviceKey | None = None,
    new_key: DeviceKey | None = None,
) -> None:
    """Apply ``change`` and recompute the chain. With ``key`` the stored checkpoints are re-signed
    with it (an attacker holding the device's key); with ``new_key`` every key record and
    checkpoint is made over to that key instead (a replaced key)."""
    changed = change(rows(path))
    signer = new_key or key
    prev, out = GENESIS, []
    for seq, original in enumerate(changed, start=1):
        row = {**original, "seq": seq}
        if row["table"] == "pulses":
            prev = pulse_hash(
                prev, seq, row["session_id"], row["pulse_no"], row["t_us"], row["host_ns"],
                row["energy_uj"], row["zone"],
            )  # fmt: skip
        else:
            body = json.loads(row["body"])
            if row["kind"] == KEY_KIND and new_key is not None:
                body.update(key_id=new_key.key_id, public_key=new_key.public_b64)
            if row["kind"] == CHECKPOINT_KIND and signer is not None:
                signed = make_checkpoint(
                    signer, body["device"], seq - 1, prev, row["at_ns"], body["reason"]
                )
                body = signed.body()
            row["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
            prev = record_hash(prev, seq, row["session_id"], row["at_ns"], row["kind"], row["body"])
        out.append({**row, "hash": prev})
    conn = sqlite3.connect(path)
    try:
        conn.execute("DELETE FROM pulses")
        conn.execute("DELETE FROM records")
        for row in out:
            if row["table"] == "pulses":
                conn.execute(
                    "INSERT INTO pulses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row["seq"], row["session_id"], row["pulse_no"], row["t_us"],
                     row["host_ns"], row["energy_uj"], row["zone"], row["hash"]),
                )  # fmt: skip
            else:
                conn.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
                    (row["seq"], row["session_id"], row["kind"], row["at_ns"], row["body"],
                     row["hash"]),
                )  # fmt: skip
        conn.execute(
            "UPDATE chain_head SET seq = ?, hash = ?",
            (len(out), out[-1]["hash"] if out else GENESIS),
        )
        conn.commit()
    finally:
        conn.close()


def truncate_with_copied_head(path: Path, keep: int) -> None:
    """Delete every row after ``keep`` and copy row ``keep``'s stored hash into chain_head: one
    UPDATE, no hashing, no key."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("DELETE FROM pulses WHERE seq > ?", (keep,))
        conn.execute("DELETE FROM records WHERE seq > ?", (keep,))
        stored = conn.execute(
            "SELECT hash FROM pulses WHERE seq = ? "
            "UNION ALL SELECT hash FROM records WHERE seq = ?",
            (keep, keep),
        ).fetchone()
        conn.execute("UPDATE chain_head SET seq = ?, hash = ?", (keep, stored[0]))
        conn.commit()
    finally:
        conn.close()


def delete_row(path: Path, seq: int) -> None:
    """Delete one row in place (no renumbering, no hashing)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("DELETE FROM pulses WHERE seq = ?", (seq,))
        conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
        conn.commit()
    finally:
        conn.close()


def first_pulse_seq(path: Path, after: int = 0) -> int:
    conn = sqlite3.connect(path)
    try:
        seq: int = conn.execute("SELECT min(seq) FROM pulses WHERE seq > ?", (after,)).fetchone()[0]
    finally:
        conn.close()
    return seq
