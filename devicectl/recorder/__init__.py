"""The clinic's fleet recorder: every device's telemetry into PostgreSQL (or embedded SQLite),
the fleet's history, and each patient's course across devices. See docs/recorder.md.

    MQTT broker ──$share/{group}/lasers/# (QoS 1, persistent)──▶ service.Recorder
        intake.take (bounds, JSON, the contract's models) ──▶ store (batched, idempotent)
        ──▶ PUBACK only after commit
    queries / courses ──▶ devicectl fleet …, the dashboard's /history, course replies
    course_client.ask_course ◀── a daemon at `session start` (MQTT 5 request/response)
"""

from devicectl.recorder.courses import Course, CourseSession, compute_course
from devicectl.recorder.queries import load_witnessed_checkpoints
from devicectl.recorder.service import Recorder, RecorderConfig, RecorderStats
from devicectl.recorder.store import RecorderStore, StoreUnavailable, open_store

__all__ = [
    "Course",
    "CourseSession",
    "Recorder",
    "RecorderConfig",
    "RecorderStats",
    "RecorderStore",
    "StoreUnavailable",
    "compute_course",
    "load_witnessed_checkpoints",
    "open_store",
]
