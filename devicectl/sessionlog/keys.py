"""The device's Ed25519 signing key: where it lives, how it is made, how it is named.

The key signs the session log's checkpoints (:mod:`devicectl.sessionlog.checkpoint`). It is found,
in this order:

1. a configured file (``[checkpoints] key_file``);
2. a systemd credential: ``$CREDENTIALS_DIRECTORY/devicectl-log-key`` (``LoadCredential=`` or
   ``LoadCredentialEncrypted=`` in the unit, so the key can live in a TPM-sealed blob);
3. ``DATA_DIR/log-key.pem``, generated at the daemon's first start with mode 0600.

The file is an unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519`` writes). A key
is named by its **key id**: the first 16 bytes of SHA-256 over the raw 32-byte public key, as 32
lower-case hex digits. ``devicectl log key`` prints the public key and its id for enrolment.

Rotation is staged, never done behind the writer's back: ``devicectl log rotate-key`` writes the
new key beside the current one (``<key file>.next``, 0600); the daemon's session log introduces it
at its next checkpoint (a ``log_key`` record covered by a checkpoint signed with the OLD key) and
only then moves it over the old file. A credential cannot be rewritten by the daemon, so it is not
rotated this way (see docs/session-log.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from devicectl.errors import DevicectlError

__all__ = [
    "CREDENTIAL_NAME",
    "KEY_FILENAME",
    "DeviceKey",
    "KeySource",
    "SigningKeyError",
    "finish_rotation",
    "key_id_of",
    "key_source",
    "load_or_create",
    "load_pending",
    "loosely_protected",
    "parse_public_key",
    "public_key_b64",
    "signature_valid",
    "stage_rotation",
]

KEY_FILENAME = "log-key.pem"
CREDENTIAL_NAME = "devicectl-log-key"
PUBLIC_KEY_BYTES = 32


class SigningKeyError(DevicectlError):
    """The signing key cannot be read, created or parsed; the message names the file and why."""


def key_id_of(public_raw: bytes) -> str:
    """The key id: SHA-256 of the raw 32-byte public key, first 16 bytes, lower-case hex."""
    return sha256(public_raw).digest()[:16].hex()


def public_key_b64(public_raw: bytes) -> str:
    return base64.b64encode(public_raw).decode("ascii")


def signature_valid(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_raw``'s Ed25519 signature over ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class DeviceKey:
    """A private Ed25519 key with its public half and key id."""

    __slots__ = ("_private", "key_id", "public_b64", "public_raw")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id_of(self.public_raw)
        self.public_b64 = public_key_b64(self.public_raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes, where: str = "key") -> DeviceKey:
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(
                f"{where} is not an unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(f"{where} holds a {type(private).__name__}, not an Ed25519 key")
        return cls(private)

    def to_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> str:
        public = self._private.public_key()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        return public.public_bytes(serialization.Encoding.PEM, spki).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:  # never the private half
        return f"DeviceKey(key_id={self.key_id!r})"


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where the signing key is read from, and whether devicectl may create or replace it."""

    path: Path
    origin: Literal["configured", "credential", "data_dir"]

    @property
    def writable(self) -> bool:
        return self.origin != "credential"

    @property
    def pending(self) -> Path:
        """Where a staged rotation waits for the daemon's next checkpoint."""
        return self.path.with_name(self.path.name + ".next")


def key_source(configured: Path | None, data_dir: Path, environ: Mapping[str, str]) -> KeySource:
    """The key file to use: configured, else a systemd credential, else ``DATA_DIR/log-key.pem``."""
    if configured is not None:
        return KeySource(configured.expanduser(), "configured")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.is_file():
            return KeySource(candidate, "credential")
    return KeySource(data_dir / KEY_FILENAME, "data_dir")


def _read(path: Path, *, staged: bool = False) -> DeviceKey:
    """The key in the regular file at ``path``; never blocks on a FIFO or a device. A ``staged``
    key (a rotation waiting for the daemon) must also be this service's own file, not a symlink,
    and closed to group and others: whoever else could have written it could have planted a key
    they hold, which the daemon would otherwise introduce as a properly signed rotation."""
    what = "next signing key" if staged else "signing key"
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if staged else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "it is a symlink" if staged and path.is_symlink() else exc.strerror or str(exc)
        raise SigningKeyError(f"{what} {path} cannot be read: {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SigningKeyError(f"{what} {path} is not a regular file")
        if staged and info.st_uid != os.geteuid():
            raise SigningKeyError(
                f"{what} {path} is owned by uid {info.st_uid}, not by this service (uid "
                f"{os.geteuid()}): not introduced; remove it and stage one with "
                "`devicectl log rotate-key`"
            )
        if staged and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SigningKeyError(
                f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: others could have "
                "written or read it, so it is not introduced; remove it and stage one with "
                "`devicectl log rotate-key`"
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read()
    except OSError as exc:
        raise SigningKeyError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return DeviceKey.from_pem(data, f"{what} {path}")


def _write_new(path: Path, key: DeviceKey) -> None:
    """Write ``key`` to ``path`` (mode 0600) unless a file is there already; never a partial file
    at ``path``: written to a temporary name, synced, then linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, unpredictable name created exclusively (never a planted file or symlink that the
    # key, or root's truncation, would be written through).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, key.to_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if a key appeared meanwhile: that one wins
    finally:
        tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def loosely_protected(path: Path) -> bool:
    """Whether group or others may read the key file (they never should)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def load_or_create(source: KeySource) -> tuple[DeviceKey, bool]:
    """The key at ``source`` and whether it was created now. A missing data-dir or configured
    file is generated (0600); a missing credential is an error (systemd provides it)."""
    if source.path.is_file():
        return _read(source.path), False
    if not source.writable:
        raise SigningKeyError(f"signing key credential {source.path} is missing")
    key = DeviceKey.generate()
    try:
        _write_new(source.path, key)
    except FileExistsError:
        return _read(source.path), False
    except OSError as exc:
        raise SigningKeyError(
            f"signing key {source.path} cannot be created: {exc.strerror or exc}"
        ) from None
    return key, True


def load_pending(source: KeySource) -> DeviceKey | None:
    """A staged rotation's new key, if one waits; :class:`SigningKeyError` if the file there is
    not one this service staged (another owner, open to others, a symlink, not a key)."""
    if not os.path.lexists(source.pending):
        return None
    return _read(source.pending, staged=True)


def stage_rotation(source: KeySource) -> DeviceKey:
    """Generate the next key beside the current one (0600); the daemon introduces it at its next
    checkpoint. A rotation already staged is kept (returned), not replaced."""
    if not source.writable:
        raise SigningKeyError(
            f"the signing key is the systemd credential {source.path}, which devicectl cannot "
            "rewrite; configure [checkpoints] key_file to rotate it"
        )
    if not source.path.is_file():
        raise SigningKeyError(
            f"no signing key at {source.path} yet: it is generated at the daemon's first start"
        )
    pending = load_pending(source)
    if pending is not None:
        return pending
    key = DeviceKey.generate()
    try:
        _write_new(source.pending, key)
    except FileExistsError:
        return _read(source.pending, staged=True)
    except OSError as exc:
        raise SigningKeyError(
            f"next signing key {source.pending} cannot be written: {exc.strerror or exc}"
        ) from None
    return key


def finish_rotation(source: KeySource) -> None:
    """Move the staged key over the current one, once the log has introduced it."""
    try:
        os.replace(source.pending, source.path)
    except OSError as exc:
        raise SigningKeyError(
            f"next signing key {source.pending} cannot replace {source.path}: {exc.strerror or exc}"
        ) from None


def parse_public_key(text: str) -> bytes:
    """An enrolled public key as given on a command line or in a file: base64 or hex of the raw 32
    bytes, or a PEM ``PUBLIC KEY`` block. Returns the raw bytes; raises ValueError naming why."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            public = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM public key ({exc})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError(f"a {type(public).__name__}, not an Ed25519 public key")
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw: bytes | None = None
    if len(text) == 2 * PUBLIC_KEY_BYTES:
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(text)
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(
            "not an Ed25519 public key: give the base64 (44 characters) or hex (64) of its raw "
            "32 bytes, or a PEM PUBLIC KEY block, as `devicectl log key` prints it"
        )
    return raw
