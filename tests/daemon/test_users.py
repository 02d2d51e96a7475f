"""Registered users: the file (argon2 hashes, 0600, never a PIN), the CLI, the edge check."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from devicectl.sessionlog import store
from devicectl.users import (
    ACK_REASON_CODES,
    MAX_FAILURES,
    MAX_WAITING_CHECKS,
    Authenticator,
    AuthRefused,
    Credentials,
    Role,
    SignOffCredentials,
    User,
    UserStore,
    UserStoreError,
)
from tests.daemon.conftest import Driver

DEVICECTL = [sys.executable, "-c", "from devicectl.cli import main; main()"]
CHEAP = PasswordHasher.from_parameters(CHEAPEST)


def _store(tmp_path: Path) -> UserStore:
    return UserStore.in_data_dir(tmp_path / "data", hasher=CHEAP)


def test_the_user_file_holds_argon2_hashes_with_mode_0600(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add("OP-7", "operator", "secret-pin-77")
    info = os.stat(store.path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    text = store.path.read_text()
    assert "secret-pin-77" not in text
    (user,) = json.loads(text)["users"]
    assert user["pin_hash"].startswith("$argon2id$")
    assert store.verify("OP-7", "secret-pin-77").role is Role.OPERATOR
    with pytest.raises(AuthRefused) as caught:
        store.verify("OP-7", "wrong-pin-77")
    assert caught.value.rule == "auth.bad_pin"


def test_ids_are_never_reused_and_short_pins_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add("OP-7", "operator", "123456")
    with pytest.raises(UserStoreError, match="exists already"):
        store.add("OP-7", "supervisor", "654321")
    with pytest.raises(UserStoreError, match="at least 6"):
        store.add("OP-8", "operator", "12345")
    with pytest.raises(UserStoreError, match="not one of"):
        store.add("OP-9", "admin", "123456")
    with pytest.raises(UserStoreError, match="not accepted"):
        store.add("a b", "operator", "123456")
    store.disable("OP-7", "left")
    assert store.get("OP-7") is not None and not store.get("OP-7").active  # type: ignore[union-attr]


def test_a_user_file_others_could_read_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add("OP-7", "operator", "123456")
    store.path.chmod(0o644)
    with pytest.raises(UserStoreError, match="chmod 600"):
        store.load()


async def test_a_supervisor_signs_their_own_act_an_operator_needs_a_second_identity(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.add("OP-7", "operator", "op-pin-77")
    store.add("SUP-1", "supervisor", "sup-pin-11")
    store.add("SUP-2", "supervisor", "sup-pin-22")
    auth = Authenticator(store)
    needed = ("acknowledging a safety breach", ACK_REASON_CODES)
    reason = "energy re-measured after cleaning the handpiece"
    own = SignOffCredentials(reason_code="handpiece_checked", reason=reason)
    actor = await auth.actor(
        "fault_ack", Credentials(user="SUP-1", pin="sup-pin-11"), own, signoff_needed=needed
    )
    assert actor.signoff is not None and actor.signoff.user == "SUP-1"
    with pytest.raises(AuthRefused) as caught:
        await auth.actor(
            "fault_ack", Credentials(user="OP-7", pin="op-pin-77"), own, signoff_needed=needed
        )
    assert caught.value.rule == "signoff.supervisor"
    second = SignOffCredentials(
        user="SUP-2", pin="sup-pin-22", reason_code="handpiece_checked", reason=reason
    )
    actor = await auth.actor(
        "fault_ack", Credentials(user="OP-7", pin="op-pin-77"), second, signoff_needed=needed
    )
    assert (actor.user, actor.role, actor.signoff.user) == ("OP-7", "operator", "SUP-2")  # type: ignore[union-attr]
    not_a_supervisor = SignOffCredentials(
        user="OP-7", pin="op-pin-77", reason_code="handpiece_checked", reason=reason
    )
    with pytest.raises(AuthRefused):
        await auth.actor(
            "fault_ack",
            Credentials(user="SUP-1", pin="sup-pin-11"),
            not_a_supervisor,
            signoff_needed=needed,
        )


@pytest.mark.system
def test_users_cli_add_list_disable(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DEVICECTL, "users", *args, "--data-dir", str(data)],
            input=stdin, check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    added = cli("add", "SUP-1", "--role", "supervisor", "--pin-stdin", stdin="sup-pin-11\n")
    assert added.returncode == 0, added.stderr
    assert cli("add", "SUP-1", "--role", "operator", "--pin-stdin", stdin="x" * 8).returncode == 1
    short = cli("add", "OP-7", "--role", "operator", "--pin-stdin", stdin="123\n")
    assert short.returncode == 1 and "at least 6" in short.stderr
    no_terminal = cli("add", "OP-7", "--role", "operator")
    assert no_terminal.returncode == 2 and "--pin-stdin" in no_terminal.stderr
    assert cli("disable", "SUP-1", "--reason", "left the clinic").returncode == 0
    listed = cli("list")
    assert listed.returncode == 0
    assert "SUP-1" in listed.stdout and "supervisor" in listed.stdout
    assert "left the clinic" in listed.stdout
    with pytest.raises(AuthRefused, match="disabled"):
        UserStore.in_data_dir(data).verify("SUP-1", "sup-pin-11")


async def test_concurrent_wrong_pins_count_toward_the_lockout(tmp_path: Path) -> None:
    """Guesses sent in parallel (many connections at once) must not escape the count: each
    one read the failure count before any had been answered, and the lockout never came."""
    store = _store(tmp_path)
    store.add("SUP-1", "supervisor", "sup-pin-11")
    auth = Authenticator(store)

    async def guess(pin: str) -> str:
        try:
            await auth.actor("arm", Credentials(user="SUP-1", pin=pin), None, signoff_needed=None)
        except AuthRefused as exc:
            return exc.rule
        return "ok"

    rules = await asyncio.gather(*(guess(f"guess-{n:06d}") for n in range(4 * MAX_FAILURES)))
    assert rules.count("auth.bad_pin") <= MAX_FAILURES
    assert set(rules) == {"auth.bad_pin", "auth.locked"}
    assert await guess("sup-pin-11") == "auth.locked"  # the right PIN, too late


async def test_one_pin_check_runs_at_a_time_and_a_flood_is_refused_not_queued(
    tmp_path: Path,
) -> None:
    """argon2 is meant to take one core of two: twenty requests at once ran six checks in
    parallel (the default thread pool) and starved every other process, `devicectl stop`
    included. Checks run one at a time; beyond a bounded queue a request is refused."""
    running = peak = 0

    class Counting(UserStore):
        def verify(self, user_id: str, pin: str) -> User:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                time.sleep(0.01)
                return super().verify(user_id, pin)
            finally:
                running -= 1

    store = Counting.in_data_dir(tmp_path / "data", hasher=CHEAP)
    store.add("OP-7", "operator", "op-pin-77")
    auth = Authenticator(store)

    async def attempt(user: str) -> str:
        try:
            await auth.actor(
                "arm", Credentials(user=user, pin="0000000"), None, signoff_needed=None
            )
        except AuthRefused as exc:
            return exc.rule
        return "ok"

    rules = await asyncio.gather(*(attempt(f"NOBODY-{n}") for n in range(3 * MAX_WAITING_CHECKS)))
    assert peak == 1
    assert rules.count("auth.unknown_user") == MAX_WAITING_CHECKS
    assert rules.count("auth.busy") == 2 * MAX_WAITING_CHECKS
    assert await attempt("OP-7") == "auth.bad_pin"  # answered again once the flood has passed


def test_an_id_differing_only_in_case_from_a_registered_one_is_refused(tmp_path: Path) -> None:
    """`op-7` beside `OP-7` would be two people whom every record, report and sign-off line
    tells apart only by letter case: an auditor reads them as one."""
    store = _store(tmp_path)
    store.add("SUP-1", "supervisor", "sup-pin-11")
    with pytest.raises(UserStoreError, match="SUP-1"):
        store.add("sup-1", "operator", "op-pin-77")
    store.disable("SUP-1", "left")
    with pytest.raises(UserStoreError, match="SUP-1"):  # disabled ids stay taken, in any case
        store.add("Sup-1", "supervisor", "sup-pin-22")
    assert set(store.load()) == {"SUP-1"}


def test_the_names_the_record_uses_for_the_system_cannot_be_user_ids(tmp_path: Path) -> None:
    """Records name the system as `devicectl`, `device`, `mqtt`, `supervisor` (the safety
    supervisor), `operator` (a STOP from the socket), `unidentified`, `console`: a user
    registered as one of them would read as the system, and the system's acts as theirs."""
    store = _store(tmp_path)
    for name in (
        "devicectl",
        "Device",
        "mqtt",
        "supervisor",
        "operator",
        "unidentified",
        "console",
    ):
        with pytest.raises(UserStoreError, match="reserved"):
            store.add(name, "supervisor", "sup-pin-11")
    assert store.load() == {}


def _audited_refusals(drv: Driver) -> list[dict[str, object]]:
    """The ``auth_refused`` audit records the daemon's log holds (no session is open)."""
    log = drv.daemon.sessionlog
    assert log is not None
    log.flush()
    conn = store.connect(log.path, readonly=True)
    try:
        rows = conn.execute("SELECT body FROM records WHERE kind = 'event'").fetchall()
    finally:
        conn.close()
    bodies = [json.loads(row[0]) for row in rows]
    return [b for b in bodies if b["event"] == "auth_refused"]


async def test_a_flood_of_refused_identities_is_audited_within_a_bound(driver: Driver) -> None:
    """An unidentified local client cannot fill the disk with audit records (a full disk stops
    the laser): after a burst they are recorded at a bounded rate, the rest counted."""
    nobody = {"user": "NOBODY-1", "pin": "000000"}
    started = time.monotonic()
    replies = []
    for _ in range(6):  # 300 refusals, 50 at once (most refused as busy: no PIN check queued)
        replies += await asyncio.gather(*(driver.call("arm", auth=nobody) for _ in range(50)))
    elapsed = time.monotonic() - started
    assert all(r["rule"].startswith("auth.") for r in replies), replies
    refusals = _audited_refusals(driver)
    assert 20 <= len(refusals) <= 20 + 2 * elapsed + 1, (len(refusals), elapsed)
    await asyncio.sleep(1.0)  # a token comes back: the next refusal carries what is left
    await driver.call("arm", auth=nobody)
    audited = _audited_refusals(driver)
    held = sum(r["detail"].get("held_back_before", 0) for r in audited)  # type: ignore[attr-defined]
    assert len(audited) + held == 301, (len(audited), held)  # every refusal accounted for
