"""The tamper-evident treatment session log (docs/session-log.md).

- :mod:`.model` — what a session is (:class:`SessionInfo`, checklist, course, zones) and its
  :class:`Summary`;
- :mod:`.store` — the SQLite file: default path, schema, migrations;
- :mod:`.chain` — the SHA-256 chain over a canonical encoding of every record;
- :mod:`.writer` — :class:`SessionLog`, what the daemon calls (non-blocking; a writer thread
  group-commits);
- :mod:`.keys` — the device's Ed25519 signing key; :mod:`.checkpoint` — signed checkpoints of
  the chain, what leaves the device;
- :mod:`.verify` — :func:`verify_log` and :func:`verify_against` (``devicectl log verify``, with
  checkpoints captured off the device);
- :mod:`.reader` — reading sessions back; :mod:`.export` and :mod:`.report` — JSON, CSV, HTML.
"""

from devicectl.sessionlog.checkpoint import Checkpoint
from devicectl.sessionlog.keys import DeviceKey, KeySource, SigningKeyError
from devicectl.sessionlog.model import (
    DEFAULT_PATIENT_REF_PATTERN,
    Checklist,
    Concern,
    Contraindications,
    Course,
    CourseWarning,
    InvalidSessionInfo,
    LimitsInForce,
    PostCare,
    SessionInfo,
    SessionOpened,
    SessionRefused,
    SkinType,
    Summary,
    Zone,
    parse_session_info,
)
from devicectl.sessionlog.store import default_data_dir, default_db_path
from devicectl.sessionlog.verify import (
    ChainBreak,
    Finding,
    VerifyReport,
    Witness,
    verify_against,
    verify_log,
)
from devicectl.sessionlog.writer import Recovery, SessionLog

__all__ = [
    "DEFAULT_PATIENT_REF_PATTERN",
    "ChainBreak",
    "Checklist",
    "Checkpoint",
    "Concern",
    "Contraindications",
    "Course",
    "CourseWarning",
    "DeviceKey",
    "Finding",
    "InvalidSessionInfo",
    "KeySource",
    "LimitsInForce",
    "PostCare",
    "Recovery",
    "SessionInfo",
    "SessionLog",
    "SessionOpened",
    "SessionRefused",
    "SigningKeyError",
    "SkinType",
    "Summary",
    "VerifyReport",
    "Witness",
    "Zone",
    "default_data_dir",
    "default_db_path",
    "parse_session_info",
    "verify_against",
    "verify_log",
]
