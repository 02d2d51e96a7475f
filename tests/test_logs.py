"""The daemon's own log stays bounded whatever happens: per-kind rate limit with a count of what
was held back, safety events never held back, long values cut."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from devicectl.logs import (
    ALWAYS_LOGGED,
    MAX_VALUE_CHARS,
    EventRateLimit,
    QueuedStream,
    cap_values,
    configure_logging,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _passed(limit: EventRateLimit, event: str, **fields: Any) -> dict[str, Any] | None:
    try:
        return dict(limit(None, "warning", {"event": event, **fields}))
    except structlog.DropEvent:
        return None


def test_a_flood_of_one_kind_is_held_to_its_bucket_and_counted() -> None:
    clock = _Clock()
    limit = EventRateLimit(per_s=5.0, burst=20, clock=clock)
    passed = [_passed(limit, "control_busy") for _ in range(1000)]
    assert sum(p is not None for p in passed) == 20
    # another kind is not held back by the flood, and carries the count of what was
    other = _passed(limit, "mqtt_connected")
    assert other is not None and other["suppressed"] == {"control_busy": 980}
    clock.now += 1.0  # five more a second
    passed = [_passed(limit, "control_busy") for _ in range(100)]
    assert sum(p is not None for p in passed) == 5
    clock.now += 0.2
    after = _passed(limit, "control_busy")
    assert after is not None and after["suppressed"] == {"control_busy": 95}


@pytest.mark.parametrize("event", sorted(ALWAYS_LOGGED))
def test_safety_events_are_never_held_back(event: str) -> None:
    limit = EventRateLimit(per_s=1.0, burst=1, clock=_Clock())
    assert all(_passed(limit, event) is not None for _ in range(500))


def test_long_values_are_cut_with_a_marker() -> None:
    event = cap_values(None, "info", {"event": "x", "topic": "y" * 60_000, "n": 3})
    assert event["topic"].startswith("y" * MAX_VALUE_CHARS)
    assert event["topic"].endswith(f"[{60_000 - MAX_VALUE_CHARS} more chars]")
    assert event["n"] == 3


@pytest.fixture
def configured() -> Iterator[None]:
    """configure_logging() for one test, then the process's logging as it was."""
    handlers = list(logging.getLogger().handlers)
    try:
        yield
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = handlers


@pytest.mark.usefixtures("configured")
def test_the_configured_log_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True)
    topic = "cmd/" + "x" * 60_000
    try:
        log = structlog.get_logger("devicectl.test")
        started = time.monotonic()
        for _ in range(10_000):
            log.warning("mqtt_command_refused", topic=topic)
        elapsed = time.monotonic() - started
        log.error("safety_breach", code="energy_out_of_tolerance")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    # 20 at once, then 5 a second of however long the loop took, and the breach
    assert len(lines) <= 20 + 5 * elapsed + 2, (len(lines), elapsed)
    assert all(len(json.dumps(line)) < MAX_VALUE_CHARS + 500 for line in lines)
    assert lines[-1]["event"] == "safety_breach"
    # nothing held back silently: every event is either logged or counted
    refused = sum(1 for line in lines if line["event"] == "mqtt_command_refused")
    counted = sum(line.get("suppressed", {}).get("mqtt_command_refused", 0) for line in lines)
    assert refused + counted == 10_000


@pytest.mark.usefixtures("configured")
def test_the_libraries_logging_is_bounded_too(capsys: pytest.CaptureFixture[str]) -> None:
    """What once filled 9 MB in 15 s: asyncio logging an accept() failure in a tight loop."""
    configure_logging(json=True)
    log = logging.getLogger("asyncio")
    started = time.monotonic()
    # (pytest's own capture of every record costs time: fewer and shorter than the real thing)
    for _ in range(2_000):
        log.error("socket.accept() out of system resource\nsocket: %s", "x" * 10_000)
    elapsed = time.monotonic() - started
    logging.getLogger("mqtt").warning("connected to mqtt://user:secret@broker")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "out of system resource" in line]
    assert len(lines) <= 20 + 5 * elapsed + 2, (len(lines), elapsed)
    assert all(len(line) < 2 * MAX_VALUE_CHARS + 100 for line in err.splitlines())
    assert "mqtt://***@broker" in err and "secret" not in err


def test_a_queued_stream_never_blocks_on_a_reader_that_stopped_reading() -> None:
    """The daemon's log goes through a QueuedStream: a pipe nobody reads (a stalled journal)
    fills, and the writer goes on at once; lines beyond the bound are dropped whole and
    counted, and said so once the reader is back."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    stream = QueuedStream(os.fdopen(write_fd, "w"), max_bytes=64 * 1024)
    line = '{"event": "tick", "n": %d, "pad": "' + "x" * 200 + '"}\n'
    started = time.monotonic()
    for n in range(20_000):  # ~4.5 MB, far beyond a pipe's 64 KiB and the bound
        stream.write(line % n)
    assert time.monotonic() - started < 5  # a generous bound: it would block forever
    assert stream.dropped > 0
    received = b""
    deadline = time.monotonic() + 10
    while b"log_lines_dropped" not in received and time.monotonic() < deadline:
        try:
            received += os.read(read_fd, 1 << 16)
        except BlockingIOError:
            stream.write(line % -1)  # one more line: the notice goes out with it
            time.sleep(0.01)
    stream.close()
    os.close(read_fd)
    lines = received.decode().split("\n")[:-1]  # the last may be cut by the read
    notice = [json.loads(x) for x in lines if "log_lines_dropped" in x]
    assert notice and notice[0]["count"] > 0
    assert all(x.startswith("{") and x.endswith("}") for x in lines)  # whole lines only


def test_a_queued_stream_keeps_the_lines_of_two_threads_whole() -> None:
    """The daemon logs from two threads now (its loop, the control socket's): structlog writes
    a line in two pieces (the message, then its newline), the libraries' logging in one, each
    under a lock of its own. A line of one thread arriving between the two pieces of another's
    is still a line of its own, and neither is cut or lost."""
    target = io.StringIO()
    stream = QueuedStream(target)
    first_half = threading.Event()
    other_written = threading.Event()

    def structlog_like() -> None:
        stream.write('{"event": "from_the_loop"}')
        first_half.set()
        other_written.wait(10)
        stream.write("\n")
        stream.flush()

    thread = threading.Thread(target=structlog_like)
    thread.start()
    assert first_half.wait(10)
    stream.write('{"event": "from_the_control_thread"}\n')  # the other thread's whole line
    other_written.set()
    thread.join(10)
    stream.close()
    lines = target.getvalue().splitlines()
    assert sorted(lines) == ['{"event": "from_the_control_thread"}', '{"event": "from_the_loop"}']
