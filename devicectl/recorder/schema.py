"""The recorder's schema as versioned migrations, one SQL text for PostgreSQL and SQLite alike.

Only types, constraints and statements both engines read the same way are used: TEXT, BIGINT,
INTEGER, ``ON CONFLICT``, window functions in views. Times are RFC 3339 UTC text with
microseconds (``intake.utc_text``), so text order is time order in both engines.

A migration is applied once, in order, in one transaction with its row in ``schema_migrations``;
the store takes a lock first (an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) so
that several recorders starting at once migrate exactly once. Append new migrations; never edit
one that has shipped.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "TABLES"]

# Column order of each table the recorder writes: intake builds its rows in this order.
TABLES: dict[str, tuple[str, ...]] = {
    "messages": (
        "device",
        "topic",
        "boot",
        "seq",
        "site",
        "stream",
        "session",
        "ts",
        "recorded",
        "historical",
        "retained",
        "payload",
    ),
    "pulse_batches": (
        "device",
        "topic",
        "boot",
        "seq",
        "session",
        "zone",
        "first_pulse_no",
        "last_pulse_no",
        "pulse_count",
        "energy_uj_sum",
        "energy_uj_min",
        "energy_uj_max",
        "dropped",
        "ts",
        "payload",
    ),
    "sessions": ("device", "session", "site", "patient", "operator", "skin_type", "started"),
    "session_ends": (
        "device",
        "session",
        "ended",
        "pulses",
        "energy_uj",
        "faults",
        "summary",
    ),
    "boots": ("device", "boot", "first_ts"),
    "availability": ("device", "boot", "status", "recorded"),
    "checkpoints": (
        "device",
        "key_id",
        "log_seq",
        "hash",
        "checkpoint_time",
        "public_key",
        "signature",
        "boot",
        "seq",
        "ts",
        "payload",
    ),
}

# What makes a row the same row again (redeliveries, replays, retained copies are absorbed).
KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("device", "topic", "boot", "seq"),
    "pulse_batches": ("device", "topic", "boot", "seq"),
    "sessions": ("device", "session"),
    "session_ends": ("device", "session"),
    "boots": ("device", "boot"),
    "availability": ("device", "boot", "status"),
    "checkpoints": ("device", "key_id", "log_seq"),
}

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "tables: every message, pulse batches, sessions, boots, availability, checkpoints",
        (
            """CREATE TABLE messages (
                device TEXT NOT NULL, topic TEXT NOT NULL, boot BIGINT NOT NULL,
                seq BIGINT NOT NULL, site TEXT NOT NULL, stream TEXT NOT NULL, session TEXT,
                ts TEXT NOT NULL, recorded TEXT NOT NULL, historical INTEGER NOT NULL,
                retained INTEGER NOT NULL, payload TEXT,
                PRIMARY KEY (device, topic, boot, seq))""",
            """CREATE TABLE pulse_batches (
                device TEXT NOT NULL, topic TEXT NOT NULL, boot BIGINT NOT NULL,
                seq BIGINT NOT NULL, session TEXT, zone TEXT, first_pulse_no BIGINT NOT NULL,
                last_pulse_no BIGINT NOT NULL, pulse_count INTEGER NOT NULL,
                energy_uj_sum BIGINT NOT NULL, energy_uj_min BIGINT NOT NULL,
                energy_uj_max BIGINT NOT NULL, dropped INTEGER NOT NULL, ts TEXT NOT NULL,
                payload TEXT NOT NULL,
                PRIMARY KEY (device, topic, boot, seq))""",
            """CREATE TABLE sessions (
                device TEXT NOT NULL, session TEXT NOT NULL, site TEXT NOT NULL, patient TEXT,
                operator TEXT, skin_type TEXT, started TEXT NOT NULL,
                PRIMARY KEY (device, session))""",
            """CREATE TABLE session_ends (
                device TEXT NOT NULL, session TEXT NOT NULL, ended TEXT NOT NULL,
                pulses BIGINT NOT NULL, energy_uj BIGINT NOT NULL, faults INTEGER NOT NULL,
                summary TEXT NOT NULL,
                PRIMARY KEY (device, session))""",
            """CREATE TABLE boots (
                device TEXT NOT NULL, boot BIGINT NOT NULL, first_ts TEXT NOT NULL,
                PRIMARY KEY (device, boot))""",
            """CREATE TABLE availability (
                device TEXT NOT NULL, boot BIGINT NOT NULL, status TEXT NOT NULL,
                recorded TEXT NOT NULL,
                PRIMARY KEY (device, boot, status))""",
            """CREATE TABLE checkpoints (
                device TEXT NOT NULL, key_id TEXT NOT NULL, log_seq BIGINT NOT NULL,
                hash TEXT NOT NULL, checkpoint_time TEXT NOT NULL, public_key TEXT NOT NULL,
                signature TEXT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
                ts TEXT NOT NULL, payload TEXT NOT NULL,
                PRIMARY KEY (device, key_id, log_seq))""",
            """CREATE TABLE rejects (
                recorded TEXT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
                size INTEGER NOT NULL, payload_hex TEXT NOT NULL)""",
        ),
    ),
    (
        2,
        "history indexes; seq gaps and boot changes as views over what is stored",
        (
            "CREATE INDEX sessions_by_patient ON sessions (patient, started)",
            "CREATE INDEX sessions_by_start ON sessions (started)",
            "CREATE INDEX pulse_batches_by_session ON pulse_batches (device, session)",
            "CREATE INDEX messages_by_session ON messages (device, session)",
            # Seq runs on across boots (a device keeps it), so a gap is looked for per topic
            # in (boot, seq) order: whichever recorder stored which message, the view is whole.
            """CREATE VIEW seq_gaps AS
                SELECT device, topic, previous_boot, previous_seq, boot, seq,
                       seq - previous_seq - 1 AS missing
                FROM (SELECT device, topic, boot, seq,
                             LAG(seq) OVER (PARTITION BY device, topic ORDER BY boot, seq)
                                 AS previous_seq,
                             LAG(boot) OVER (PARTITION BY device, topic ORDER BY boot, seq)
                                 AS previous_boot
                      FROM messages WHERE stream <> 'metrics') AS ordered
                WHERE seq > previous_seq + 1""",
            """CREATE VIEW boot_changes AS
                SELECT device, boot, first_ts,
                       LAG(boot) OVER (PARTITION BY device ORDER BY boot) AS previous_boot
                FROM boots""",
        ),
    ),
)
