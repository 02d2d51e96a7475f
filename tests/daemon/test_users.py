"""Registered users: the file (argon2 hashes, 0600, never a PIN), the CLI, the edge check."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from devicectl.users import (
    ACK_REASON_CODES,
    Authenticator,
    AuthRefused,
    Credentials,
    Role,
    SignOffCredentials,
    UserStore,
    UserStoreError,
)

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
