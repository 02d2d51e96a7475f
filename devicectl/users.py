"""Who may change a treatment: registered users, their roles, and the proof of who is asking.

A user is an id (``OP-7``), a role (``operator`` or ``supervisor``) and a PIN only its holder
knows, stored as an argon2id hash (``argon2-cffi``) in ``DATA_DIR/users.json``, mode 0600 (a hash of
a short PIN must not be readable: offline guessing would be quick). ``devicectl users add|list|
disable`` manage the file; a user is disabled, never deleted, so that old records still name them.

Every control request that changes a treatment names a user and proves it with that user's PIN:
two distinct components, the id and the secret (docs/users.md explains why a PIN checked by the
daemon and not the socket's peer credentials). :class:`Authenticator` checks them at the edge, in
the control layer, before the request reaches the daemon, and turns them into an :class:`Actor`:
the user id and role and, for the acts that need one (overriding a contraindication,
acknowledging a safety breach), a supervisor's :class:`SignOff` with a reason code from a list and
free text. A supervisor signs their own act; an operator needs a second identity, a supervisor's,
proven with that supervisor's PIN. There is no fall-back to the OS account.

Failed proofs are counted per user: after :data:`MAX_FAILURES` in a row the user is locked out
for :data:`LOCKOUT_S` seconds (a 6-digit PIN must not be guessable at the socket's pace).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from devicectl.errors import DevicectlError

__all__ = [
    "ACK_REASON_CODES",
    "LOCKOUT_S",
    "MAX_FAILURES",
    "MAX_WAITING_CHECKS",
    "MIN_PIN_LENGTH",
    "OVERRIDE_REASON_CODES",
    "READABLE",
    "RESERVED_USER_IDS",
    "USERS_FILENAME",
    "USER_ID_PATTERN",
    "Actor",
    "AuthRefused",
    "Authenticator",
    "Credentials",
    "Role",
    "SignOff",
    "SignOffCredentials",
    "User",
    "UserStore",
    "UserStoreError",
]

USERS_FILENAME = "users.json"
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{1,31}$"
MIN_PIN_LENGTH = 6
MAX_FAILURES = 5
LOCKOUT_S = 300.0
MAX_WAITING_CHECKS = 8  # PIN checks queued at once (one runs at a time: about 0.2 s each)
_FILE_MODE = 0o600
# The names the records give the system (and its own parts) as actors: never a user's id, or a
# user would read as the system and the system's acts as theirs.
RESERVED_USER_IDS = frozenset(
    {"devicectl", "device", "mqtt", "supervisor", "operator", "unidentified", "console", "log"}
)

# Why a supervisor lets a treatment go ahead despite a contraindication answered yes.
OVERRIDE_REASON_CODES: dict[str, str] = {
    "physician_clearance": "a physician cleared the treatment in writing",
    "resolved_since_assessment": "the condition has resolved since it was recorded",
    "outside_treatment_area": "the condition is outside every zone to be treated",
    "benefit_outweighs_risk": "the documented benefit outweighs the risk, patient informed",
}
# Why a supervisor lets the laser be armed again after a safety breach.
ACK_REASON_CODES: dict[str, str] = {
    "cause_found_and_fixed": "the cause was found and removed",
    "handpiece_checked": "the handpiece and its energy were checked and are within tolerance",
    "patient_checked": "the patient's skin was checked and treatment may continue",
    "transient_cause": "a transient cause (contact lost, movement) that has passed",
}


class Role(StrEnum):
    OPERATOR = "operator"
    SUPERVISOR = "supervisor"


class UserStoreError(DevicectlError):
    """The user file cannot be used (missing, unsafe permissions, malformed) or a change to it
    is refused (an id taken, a PIN too short)."""


class AuthRefused(DevicectlError):
    """A request's identity could not be established or may not do what it asks. ``rule`` says
    which check (``auth.unknown_user``, ``auth.bad_pin``, ``signoff.required`` ...)."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(message)


# ---------------------------------------------------------------- the wire: proofs and actors


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Text people read later (terminal, report, broker): no control characters (a line break could
# forge a line, an escape sequence recolour or hide what follows, a direction override reverse
# it) and not blank.
_UNREADABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _readable(text: str) -> str:
    if _UNREADABLE.search(text):
        raise ValueError(
            "control characters (line breaks, tabs, terminal escapes, direction overrides) are "
            "not accepted in text people read"
        )
    if not text.strip():
        raise ValueError("the text is blank")
    return text


READABLE = AfterValidator(_readable)

UserId = Annotated[str, Field(pattern=USER_ID_PATTERN)]
Pin = Annotated[str, Field(min_length=1, max_length=128)]


class Credentials(_Frozen):
    """``"auth": {"user": "OP-7", "pin": "..."}`` on a request: who asks, and the proof."""

    user: UserId
    pin: Pin = Field(repr=False)


class SignOffCredentials(_Frozen):
    """``"signoff": {...}``: a supervisor's sign-off. ``user``/``pin`` name a second identity;
    left out when the requester is a supervisor signing their own act."""

    user: UserId | None = None
    pin: Pin | None = Field(default=None, repr=False)
    reason_code: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Annotated[str, Field(min_length=10, max_length=500), READABLE]


class SignOff(_Frozen):
    """A verified supervisor sign-off, as recorded."""

    user: str
    role: Role
    reason_code: str
    reason: str


class Actor(_Frozen):
    """A verified requester: carried on the request from the control layer to the daemon, and
    recorded with everything the request changes."""

    user: str
    role: Role
    signoff: SignOff | None = None


# ---------------------------------------------------------------- the store


class User(_Frozen):
    user_id: UserId
    role: Role
    pin_hash: str = Field(repr=False)
    created_ns: int
    disabled_ns: int | None = None
    disabled_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_ns is None


def default_hasher() -> PasswordHasher:
    """argon2id, 64 MiB and 3 passes as RFC 9106's low-memory profile, but one lane: the device
    has two cores and the supervisor's event loop must keep one (four lanes measurably slowed
    it; one does not). About 0.2 s per check, off the event loop; slow for a guesser."""
    return PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1)


class UserStore:
    """``DATA_DIR/users.json``: read at every check (a user added or disabled counts at once),
    written atomically under a lock, always mode 0600 and owned by the data directory's owner."""

    def __init__(self, path: Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self._hasher = hasher or default_hasher()
        self._dummy_hash: str | None = None

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, hasher: PasswordHasher | None = None) -> UserStore:
        return cls(Path(data_dir) / USERS_FILENAME, hasher=hasher)

    # -- reading

    def load(self) -> dict[str, User]:
        """Every user by id (none when the file does not exist yet)."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return {}
        if not stat.S_ISREG(info.st_mode):
            raise UserStoreError(f"user file {self.path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise UserStoreError(
                f"user file {self.path} has mode {stat.S_IMODE(info.st_mode):o}: others could "
                f"read the PIN hashes; `chmod 600 {self.path}`"
            )
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {user["user_id"]: User.model_validate(user) for user in data.get("users", [])}
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            raise UserStoreError(f"user file {self.path} cannot be read: {exc}") from None

    def get(self, user_id: str) -> User | None:
        return self.load().get(user_id)

    # -- changing

    def add(self, user_id: str, role: Role | str, pin: str) -> User:
        if re.fullmatch(USER_ID_PATTERN, user_id) is None:
            raise UserStoreError(
                f"user id {user_id!r} is not accepted: 2-32 letters, digits, '.', '_' or '-'"
            )
        if user_id.casefold() in RESERVED_USER_IDS:
            raise UserStoreError(
                f"user id {user_id!r} is reserved: the records name the system with it"
            )
        try:
            role = Role(role)
        except ValueError:
            raise UserStoreError(f"role {role!r} is not one of operator, supervisor") from None
        if len(pin) < MIN_PIN_LENGTH:
            raise UserStoreError(f"the PIN must have at least {MIN_PIN_LENGTH} characters")
        user = User(
            user_id=user_id,
            role=role,
            pin_hash=self._hasher.hash(pin),
            created_ns=time.time_ns(),
        )
        with self._locked() as users:
            if user_id in users:
                raise UserStoreError(
                    f"user {user_id} exists already (ids are never reused: records name them)"
                )
            # Records and reports would tell two people apart by letter case only.
            alike = [u for u in users if u.casefold() == user_id.casefold()]
            if alike:
                raise UserStoreError(
                    f"user id {user_id} differs from the registered {alike[0]} only in letter "
                    "case: choose an id a reader cannot take for theirs"
                )
            users[user_id] = user
        return user

    def disable(self, user_id: str, reason: str) -> User:
        with self._locked() as users:
            user = users.get(user_id)
            if user is None:
                raise UserStoreError(f"no user {user_id}")
            if not user.active:
                return user
            users[user_id] = user = user.model_copy(
                update={"disabled_ns": time.time_ns(), "disabled_reason": reason}
            )
        return user

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, User]]:
        """The users, to change in place; written back atomically (0600) on a clean exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self.load()
            yield users
            self._write(users)
        finally:
            os.close(fd)

    def _write(self, users: dict[str, User]) -> None:
        body = {"format": "devicectl-users/1", "users": [u.model_dump() for u in users.values()]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)
            owner = self.path.parent.stat()
            if os.geteuid() == 0 and owner.st_uid != 0:  # root adds users for the daemon's user
                os.fchown(fd, owner.st_uid, owner.st_gid)
            os.write(fd, (json.dumps(body, indent=1) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    # -- proving

    def verify(self, user_id: str, pin: str) -> User:
        """The active user ``user_id`` if ``pin`` is theirs; raises :class:`AuthRefused`.
        Slow on purpose (argon2): call it off the event loop."""
        user = self.get(user_id)
        if user is None:
            # Hash anyway, so that timing does not tell a registered id from an unknown one.
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash("not a registered user")
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(self._dummy_hash, pin)
            raise AuthRefused("auth.unknown_user", f"no registered user {user_id}")
        if not user.active:
            raise AuthRefused("auth.disabled", f"user {user_id} is disabled")
        try:
            self._hasher.verify(user.pin_hash, pin)
        except (VerificationError, InvalidHashError):
            raise AuthRefused("auth.bad_pin", f"wrong PIN for user {user_id}") from None
        return user


# ---------------------------------------------------------------- the edge check


class Authenticator:
    """Turns a request's credentials into an :class:`Actor`, or refuses. Lives in the control
    layer: the daemon only ever sees requests whose actor was verified here.

    ``on_refused(user, command, refusal)`` is told of every refusal before it is answered; it may
    return an awaitable (the daemon's audit, run on the daemon's own loop), which is awaited.
    Keep to one event loop: the lockout counts are that loop's alone."""

    def __init__(
        self,
        store: UserStore,
        *,
        on_refused: Callable[[str | None, str, AuthRefused], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
    ) -> None:
        self.store = store
        self._on_refused = on_refused
        self._clock = clock
        self._log = log or structlog.get_logger("devicectl.users")
        self._failures: dict[str, tuple[int, float]] = {}  # user -> (count, last failure)
        self._in_flight: dict[str, int] = {}  # user -> PIN checks started, not yet answered
        # One argon2 check at a time: it is meant to take one of the two cores, not all of them
        # (twenty requests at once ran six checks in parallel and starved every other process,
        # `devicectl stop` included). Bounded: beyond it a request is refused, never queued.
        self._checking = asyncio.Semaphore(1)
        self._waiting = 0

    async def actor(
        self,
        command: str,
        auth: Credentials | None,
        signoff: SignOffCredentials | None,
        *,
        signoff_needed: tuple[str, dict[str, str]] | None,
    ) -> Actor:
        """The verified actor of ``command``. ``signoff_needed`` not None: (what the act is,
        its reason codes): it needs a supervisor's sign-off with one of these codes."""
        try:
            return await self._actor(command, auth, signoff, signoff_needed)
        except AuthRefused as exc:
            user = auth.user if auth is not None else None
            self._log.warning("control_auth_refused", user=user, command=command, rule=exc.rule)
            if self._on_refused is not None:
                recorded = self._on_refused(user, command, exc)
                if recorded is not None:  # on another thread's loop: answer once it has run
                    await recorded
            raise

    async def _actor(
        self,
        command: str,
        auth: Credentials | None,
        signoff: SignOffCredentials | None,
        needed: tuple[str, dict[str, str]] | None,
    ) -> Actor:
        if auth is None:
            raise AuthRefused(
                "auth.required",
                f"{command} changes the treatment: identify with a registered user and PIN "
                "(--user, PIN prompted or from DEVICECTL_PIN)",
            )
        user = await self._prove(auth.user, auth.pin)
        if needed is None:
            if signoff is not None:
                raise AuthRefused("signoff.unexpected", f"{command} here takes no sign-off")
            return Actor(user=user.user_id, role=user.role)
        act, reasons = needed
        if signoff is None:
            raise AuthRefused(
                "signoff.required",
                f"{act} needs a supervisor's sign-off with a reason code "
                f"({', '.join(reasons)}) and a reason",
            )
        if signoff.reason_code not in reasons:
            raise AuthRefused(
                "signoff.reason_code",
                f"reason code {signoff.reason_code!r} is not one of {', '.join(reasons)}",
            )
        if signoff.user is None or signoff.user == user.user_id:
            if user.role is not Role.SUPERVISOR:
                raise AuthRefused(
                    "signoff.supervisor",
                    f"{user.user_id} is an operator: {act} needs a supervisor's sign-off "
                    "(--supervisor ID, with their PIN)",
                )
            supervisor = user
        else:
            if signoff.pin is None:
                raise AuthRefused(
                    "signoff.pin", f"the sign-off by {signoff.user} needs {signoff.user}'s PIN"
                )
            supervisor = await self._prove(signoff.user, signoff.pin)
            if supervisor.role is not Role.SUPERVISOR:
                raise AuthRefused("signoff.supervisor", f"{supervisor.user_id} is not a supervisor")
        return Actor(
            user=user.user_id,
            role=user.role,
            signoff=SignOff(
                user=supervisor.user_id,
                role=supervisor.role,
                reason_code=signoff.reason_code,
                reason=signoff.reason,
            ),
        )

    async def _prove(self, user_id: str, pin: str) -> User:
        count, last = self._failures.get(user_id, (0, 0.0))
        now = self._clock()
        if count >= MAX_FAILURES and now - last < LOCKOUT_S:
            raise AuthRefused(
                "auth.locked",
                f"user {user_id} is locked for {LOCKOUT_S - (now - last):.0f} s after "
                f"{count} wrong PINs",
            )
        # Checks still in flight count as failures until answered: guesses sent in parallel
        # must not all pass the test above before the first of them is counted.
        in_flight = self._in_flight.get(user_id, 0)
        if (count if now - last < LOCKOUT_S else 0) + in_flight >= MAX_FAILURES:
            raise AuthRefused(
                "auth.locked",
                f"user {user_id} has {in_flight} PIN checks in progress after {count} wrong "
                "PINs: try again when they are answered",
            )
        if self._waiting >= MAX_WAITING_CHECKS:
            raise AuthRefused(
                "auth.busy", f"{self._waiting} PIN checks are waiting already: try again"
            )
        self._in_flight[user_id] = in_flight + 1
        self._waiting += 1
        try:
            async with self._checking:
                user = await asyncio.to_thread(self.store.verify, user_id, pin)
        except AuthRefused as exc:
            if exc.rule != "auth.unknown_user":  # bounded: only registered users are counted
                count, last = self._failures.get(user_id, (0, 0.0))  # as it is now
                now = self._clock()
                self._failures[user_id] = (count + 1 if now - last < LOCKOUT_S else 1, now)
            raise
        except UserStoreError as exc:
            raise AuthRefused("auth.user_file", str(exc)) from None
        finally:
            self._waiting -= 1
            if self._in_flight[user_id] > 1:
                self._in_flight[user_id] -= 1
            else:
                del self._in_flight[user_id]
        self._failures.pop(user_id, None)
        return user
