"""The daemon's settings: a TOML file, ``DEVICECTL_*`` environment variables, and CLI flags.

Precedence, highest first: CLI flags (the ``overrides`` of :func:`load_settings`), environment
variables (``DEVICECTL_PORT``, nested with ``__``: ``DEVICECTL_MQTT__URL``), the TOML file, the
defaults below. Pydantic validates at this edge; a bad value is refused at start with one
:class:`~devicectl.errors.ConfigError` naming the key, the value and what is allowed.

Default paths (chosen so that one machine can run a system daemon and a developer's at once):

==========  ==========================================  ==========================================
            root under systemd (``INVOCATION_ID`` set)   otherwise
==========  ==========================================  ==========================================
data_dir    ``/var/lib/devicectl``                       ``$XDG_DATA_HOME/devicectl``
                                                         (``~/.local/share/devicectl``)
control     ``/run/devicectl/control.sock``              ``$XDG_RUNTIME_DIR/devicectl.sock``, or
                                                         ``DATA_DIR/control.sock`` without it
==========  ==========================================  ==========================================

The CLI's client commands compute the same default, so ``devicectl status`` finds a daemon started
in the same environment without ``--control``. See ``examples/devicectl.toml``.

The file commands read: ``--config FILE``, else ``$DEVICECTL_CONFIG``, else
``/etc/devicectl/devicectl.toml`` when it exists (:func:`default_config_file`).

Types are strict where a source has types: in the TOML file (and in ``load_settings``' keyword
overrides, which are Python values) an integer setting takes a TOML integer, a real one an integer
or a finite float, ``log_json`` a TOML boolean or ``"auto"``; ``true`` is not 1, ``"9600"`` is not
9600, ``9600.0`` is not an integer, and ``inf``/``nan`` are refused. An environment variable is only
ever text, so its text is read as the type its key wants first (``DEVICECTL_BAUDRATE=9600``,
``DEVICECTL_LOG_JSON=false``; integers in decimal digits, booleans as true/false, 1/0, yes/no,
on/off); text that does not read as that type (``DEVICECTL_BAUDRATE=true``) is refused by key.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from devicectl.errors import ConfigError
from devicectl.policy import Policy, load_policy
from protocols.bounded import BoundedInputError, loads_toml
from protocols.mqtt import ID_ALLOWED, is_valid_id

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "CheckpointSettings",
    "ClinicSettings",
    "LogLevel",
    "MqttSettings",
    "PrivacySettings",
    "RealtimeSettings",
    "Settings",
    "default_config_file",
    "default_control_socket",
    "default_data_dir",
    "load_settings",
]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# What a key allows, in words, for the constraint errors whose pydantic message would not say.
_ALLOWED: dict[str, str] = {
    "port": "sim, a serial device path such as /dev/ttyUSB0, or a pyserial URL such as "
    "socket://HOST:PORT",
    "baudrate": "an integer from 9600 to 921600",
    "status_period_ms": "an integer from 10 to 10000 (ms)",
    "log_commit_interval_ms": "an integer from 0 to 1000 (ms)",
    "log_level": "one of debug, info, warning, error, critical",
    "log_json": "true or false (unquoted in TOML), or auto (JSON unless stderr is a terminal)",
    "sim_max_rate_hz": "a finite number from 1 to 100000 (Hz)",
    "control_group": "the name of an existing group",
    "mqtt.outbox_max_bytes": "an integer from 65536 to 2**40 (bytes)",
    "mqtt.protocol": "auto (MQTT 5, else 3.1.1), 5, or 3.1.1",
    "mqtt.url": "mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (also ws://, wss://)",
    "checkpoints.every_records": "an integer from 1 to 10000000 (records)",
    "checkpoints.interval_s": "a number of seconds above 0, at most 3600",
    "checkpoints.idle_interval_s": "a number of seconds above 0, at most 86400",
}
_PYSERIAL_SCHEMES = frozenset({"socket", "rfc2217", "loop", "spy", "hwgrep", "alt", "cp2110"})
_MQTT_SCHEMES = frozenset({"mqtt", "mqtts", "ws", "wss"})
_TOPIC_FORBIDDEN = re.compile(r"[/+#\x00]")
_HIDDEN = "***"  # what a secret shows as in `config show` and in errors


class _Refused(ValueError):
    """Raised inside validation; becomes ConfigError(key, value, allowed) at the boundary."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(allowed)


def default_data_dir(environ: Mapping[str, str], euid: int) -> Path:
    """``/var/lib/devicectl`` for root under systemd, else ``$XDG_DATA_HOME/devicectl``."""
    if euid == 0 and environ.get("INVOCATION_ID"):
        return Path("/var/lib/devicectl")
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", "~")).expanduser() / ".local" / "share"
    return base / "devicectl"


def default_control_socket(environ: Mapping[str, str], euid: int, data_dir: Path) -> Path:
    """The control socket: ``/run/devicectl/control.sock`` for root under systemd, else
    ``$XDG_RUNTIME_DIR/devicectl.sock``, else ``DATA_DIR/control.sock``."""
    if euid == 0 and environ.get("INVOCATION_ID"):
        return Path("/run/devicectl/control.sock")
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "devicectl.sock"
    return data_dir / "control.sock"


DEFAULT_CONFIG_FILE = Path("/etc/devicectl/devicectl.toml")

# Variables of an older vocabulary (one underscore, read below the file and hidden from
# `config show`). Refused by name rather than silently ignored: a broker password that stopped
# being read would look like a broker refusing the daemon.
_RENAMED_VARIABLES = {
    "DEVICECTL_MQTT_USERNAME": "DEVICECTL_MQTT__USERNAME",
    "DEVICECTL_MQTT_PASSWORD": "DEVICECTL_MQTT__PASSWORD",
    "DEVICECTL_MQTT_CA": "DEVICECTL_MQTT__CA_FILE",
    "DEVICECTL_MQTT_CERT": "DEVICECTL_MQTT__CERT_FILE",
    "DEVICECTL_MQTT_KEY": "DEVICECTL_MQTT__KEY_FILE",
}


def default_config_file(environ: Mapping[str, str]) -> Path | None:
    """The config file a command reads when given no ``--config``: ``$DEVICECTL_CONFIG``, else
    ``/etc/devicectl/devicectl.toml`` when it exists, else none (defaults and environment)."""
    named = environ.get("DEVICECTL_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _refuse_renamed_variables(environ: Mapping[str, str]) -> None:
    for old, new in _RENAMED_VARIABLES.items():
        if old in environ:
            value = _HIDDEN if "PASSWORD" in old else environ[old]
            raise ConfigError(
                old, value, f"an old name: use {new} (nested keys take two underscores)"
            )


def _expand_user(value: Path) -> Path:
    """``~`` and ``~user`` expanded; an unknown user is a refusal, not a RuntimeError."""
    try:
        return value.expanduser()
    except RuntimeError:
        raise ValueError(f"a path whose ~user exists (no home directory for {value})") from None


def _existing_file(value: Path | None, key: str) -> Path | None:
    if value is None:
        return None
    path = _expand_user(value)
    if not path.is_file():
        raise _Refused(key, str(value), "an existing, readable file")
    return path


class MqttSettings(BaseModel):
    """The ``[mqtt]`` table. No ``url``: telemetry waits in the outbox; the laser still works."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    prefix: str = "lasers"
    site: str = "default"
    device: str | None = Field(default=None, description="default: from the device serial")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=65536, le=2**40, strict=True)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # Ask the fleet recorder for the patient's course at session start (docs/recorder.md).
    course_from_recorder: bool = Field(default=False, strict=True)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in _MQTT_SCHEMES or not parts.hostname:
            raise _Refused("mqtt.url", value, _ALLOWED["mqtt.url"])
        try:
            _ = parts.port
        except ValueError:
            raise _Refused("mqtt.url", value, "a port from 1 to 65535") from None
        return value

    @field_validator("prefix")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        if not value or _TOPIC_FORBIDDEN.search(value):
            raise _Refused("mqtt.prefix", value, "a non-empty MQTT topic level without / + #")
        return value

    @field_validator("site", "device")
    @classmethod
    def _identity(cls, value: str | None, info: Any) -> str | None:
        # What every consumer accepts as an id (docs/mqtt.md): nothing that looks like another.
        if value is not None and not is_valid_id(value):
            raise _Refused(f"mqtt.{info.field_name}", value, ID_ALLOWED)
        return value

    @model_validator(mode="after")
    def _files(self) -> Self:
        self.ca_file = _existing_file(self.ca_file, "mqtt.ca_file")
        self.cert_file = _existing_file(self.cert_file, "mqtt.cert_file")
        self.key_file = _existing_file(self.key_file, "mqtt.key_file")
        if (self.cert_file is None) != (self.key_file is None):
            given = "cert_file" if self.cert_file is not None else "key_file"
            both = "cert_file and key_file together (a client certificate and its key)"
            raise _Refused(f"mqtt.{given}", str(self.cert_file or self.key_file), both)
        if self.password is not None and not self.username:
            raise _Refused("mqtt.username", self.username, "a user name when a password is set")
        return self

    def device_id(self, serial: int) -> str:
        """The topic level for this device: configured, or IDENT's serial as 8 hex digits."""
        return self.device if self.device is not None else f"{serial:08X}"


# ── issue 14: patient privacy on the wire and the clinic's time zone (self-contained block) ──


class PrivacySettings(BaseModel):
    """The ``[privacy]`` table: what of a patient MQTT payloads carry (docs/mqtt.md, "Patient
    data"). Default: nothing. ``patient_key_secret`` (shared by the devices of one site): a keyed
    pseudonym. ``publish_patient_ref = true``: the reference itself, readable by anyone who can
    read the broker."""

    model_config = ConfigDict(extra="forbid")

    patient_key_secret: SecretStr | None = Field(
        default=None, description="the site's secret keying the patient pseudonym (HMAC-SHA-256)"
    )
    publish_patient_ref: bool = Field(default=False, strict=True)

    @field_validator("patient_key_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            # An empty key would still pseudonymise, but anyone could recompute it from a guess.
            raise _Refused(
                "privacy.patient_key_secret",
                "",
                "a non-empty secret (32+ random characters advised)",
            )
        return value


class ClinicSettings(BaseModel):
    """The ``[clinic]`` table. Records are stored in UTC; reports show the clinic's local time."""

    model_config = ConfigDict(extra="forbid")

    time_zone: str = Field(default="UTC", description="an IANA time zone, e.g. Europe/Paris")

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise _Refused(
                "clinic.time_zone", value, "an IANA time zone name such as Europe/Paris or UTC"
            ) from None
        return value


# ── end of issue 14's block ──


def _int_from_text(text: str) -> object:
    # At most 18 digits: a longer number is no setting, and int() of thousands would raise
    return int(text) if re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", text) else text


def _float_from_text(text: str) -> object:
    try:
        return float(text)  # "inf" and "nan" too: the field refuses them with the key
    except ValueError:
        return text


def _bool_from_text(text: str) -> object:
    word = text.strip().lower()
    if word in {"true", "1", "yes", "on"}:
        return True
    if word in {"false", "0", "no", "off"}:
        return False
    return text


_FROM_TEXT: dict[object, Callable[[str], object]] = {
    int: _int_from_text,
    float: _float_from_text,
    bool: _bool_from_text,
}


def _typed_from_text(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """Environment text read as the int, float or bool each field wants; other text unchanged
    (for the strict model to refuse by key, with the text as written)."""
    typed = dict(values)
    for name, value in values.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        kinds = [
            k for k in get_args(field.annotation) or (field.annotation,) if k is not type(None)
        ]
        if len(kinds) != 1:
            continue
        kind = kinds[0]
        if isinstance(value, str) and kind in _FROM_TEXT:
            typed[name] = _FROM_TEXT[kind](value)
        elif isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, BaseModel):
            typed[name] = _typed_from_text(kind, value)
    return typed


class _EnvironmentText(PydanticBaseSettingsSource):
    """The ``DEVICECTL_*`` variables, their text read as their fields' types.

    The model is strict so that the TOML file's ``true`` or ``"5"`` for a number is refused; an
    environment variable has no types, so only here is text a fair way to write a number.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], environment: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._environment = environment

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._environment.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return _typed_from_text(self.settings_cls, self._environment())


class CheckpointSettings(BaseModel):
    """The ``[checkpoints]`` table: the session log's signed checkpoints (docs/session-log.md).

    A checkpoint is written at the first commit after ``every_records`` records, or
    ``interval_s`` after the first record it would cover while a session is open
    (``idle_interval_s`` outside one), at every session end and at shutdown."""

    model_config = ConfigDict(extra="forbid")

    key_file: Path | None = Field(
        default=None,
        description="the Ed25519 signing key (PKCS#8 PEM); default: the systemd credential "
        "devicectl-log-key if present, else DATA_DIR/log-key.pem, generated (0600) at first start",
    )
    every_records: int = Field(default=10_000, ge=1, le=10_000_000, strict=True)
    interval_s: float = Field(default=2.0, gt=0, le=3600, strict=True, allow_inf_nan=False)
    idle_interval_s: float = Field(default=300.0, gt=0, le=86400, strict=True, allow_inf_nan=False)

    @field_validator("key_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return _expand_user(value) if value is not None else None


class RealtimeSettings(BaseModel):
    """The ``[realtime]`` table: how `devicectl run` asks for the CPU before anything else
    (devicectl/realtime.py, docs/reliability.md). Each is best effort: what the system refuses is
    logged once, with the unit setting that grants it, and the daemon runs on."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(
        default=40,
        ge=0,
        le=99,
        strict=True,
        description="SCHED_FIFO priority of the daemon's process (0: ordinary scheduling); "
        "needs LimitRTPRIO (or CAP_SYS_NICE)",
    )
    lock_memory: bool = Field(
        default=True,
        strict=True,
        description="mlockall the daemon's memory when the memory-lock limit is unlimited "
        "(LimitMEMLOCK=infinity) or the daemon runs as root",
    )
    switch_interval_ms: float = Field(
        default=0.5,
        ge=0.05,
        le=10,
        strict=True,
        allow_inf_nan=False,
        description="the interpreter's thread switch interval: the longest the safety loop "
        "waits for the log writer thread to let go of the interpreter",
    )


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("devicectl_config_file", default=None)


class Settings(BaseSettings):
    """devicectl's configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="DEVICECTL_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
    )

    port: str = "sim"
    baudrate: int = Field(default=115200, ge=9600, le=921600, strict=True)
    data_dir: Path = Field(default_factory=lambda: default_data_dir(os.environ, os.geteuid()))
    control: Path = Field(  # after data_dir: its default may live there
        default_factory=lambda data: default_control_socket(
            os.environ,
            os.geteuid(),
            data.get("data_dir") or default_data_dir(os.environ, os.geteuid()),
        )
    )
    control_group: str | None = Field(
        default=None,
        description="only members of this group (and root, and the daemon's user) may use the "
        "control socket; checked per connection with SO_PEERCRED",
    )
    policy: Path | None = Field(default=None, description="default: the packaged policy")
    session_log: Path | None = Field(
        default=None, description="the session log's SQLite file; default: DATA_DIR/sessions.db"
    )
    status_period_ms: int = Field(default=100, ge=10, le=10000, strict=True)
    log_commit_interval_ms: int = Field(
        default=10,
        ge=0,
        le=1000,
        strict=True,
        description="group commit: the session log commits (one fdatasync each) at most once "
        "per this many ms (0: after every batch, as fast as the disk allows); see "
        "docs/reliability.md",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings)
    log_level: LogLevel = "info"
    log_json: bool | None = Field(default=None, strict=True)
    patient_ref_pattern: str = r"^[A-Z0-9-]{4,32}$"
    sim_max_rate_hz: float = Field(default=500.0, ge=1, le=100000, strict=True, allow_inf_nan=False)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    clinic: ClinicSettings = Field(default_factory=ClinicSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_source = InitSettingsSource(settings_cls, init_kwargs=_FILE_VALUES.get() or {})
        return (init_settings, _EnvironmentText(settings_cls, env_settings), file_source)

    @field_validator("control", "data_dir", "session_log", "policy", mode="before")
    @classmethod
    def _not_empty(cls, value: Any, info: Any) -> Any:
        # An empty path would become "." and put the session log in the current directory.
        if isinstance(value, str | Path) and not str(value).strip():
            raise _Refused(info.field_name, str(value), "a path (an empty one is refused)")
        return value

    @field_validator("control", "data_dir", "session_log")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return _expand_user(value) if value is not None else None

    @property
    def session_log_path(self) -> Path:
        # the name is sessionlog.store.DB_FILENAME, not imported: config loads nothing heavy
        return self.session_log if self.session_log is not None else self.data_dir / "sessions.db"

    @field_validator("policy")
    @classmethod
    def _policy_file(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "policy")

    @field_validator("port")
    @classmethod
    def _port(cls, value: str) -> str:
        if value == "sim" or (value.startswith("/") and len(value) > 1):
            return value
        if "://" in value:
            parts = urlsplit(value)
            if parts.scheme in _PYSERIAL_SCHEMES:
                if parts.scheme in {"socket", "rfc2217"}:
                    try:
                        port = parts.port
                    except ValueError:
                        port = None
                    if not parts.hostname or port is None:
                        raise _Refused("port", value, "socket://HOST:PORT with a port 1-65535")
                return value
        raise _Refused("port", value, _ALLOWED["port"])

    @field_validator("control_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            grp.getgrnam(value)
        except KeyError:
            raise _Refused("control_group", value, _ALLOWED["control_group"]) from None
        return value

    @field_validator("log_json", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"auto", ""}:
            return None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("patient_ref_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise _Refused(
                "patient_ref_pattern", value, f"a valid regular expression ({exc})"
            ) from None
        if re.fullmatch(value, "") is not None:
            raise _Refused(
                "patient_ref_pattern", value, "a pattern that refuses an empty reference"
            )
        return value

    def patient_ref_regex(self) -> re.Pattern[str]:
        """The compiled pattern; use ``fullmatch``."""
        return re.compile(self.patient_ref_pattern)

    def load_policy(self) -> Policy:
        """The clinic policy this configuration names (the packaged default when none)."""
        return load_policy(self.policy)

    def redacted_dict(self) -> dict[str, Any]:
        """Every setting as JSON-ready values, secrets as ``***``: ``devicectl config show``."""
        data = self.model_dump(mode="json")
        if self.mqtt.password is not None:
            data["mqtt"]["password"] = _HIDDEN
        if self.privacy.patient_key_secret is not None:
            data["privacy"]["patient_key_secret"] = _HIDDEN
        return data


def _redact(key: str, value: object) -> object:
    return (
        _HIDDEN
        if key.rsplit(".", 1)[-1] in {"password", "key_password", "patient_key_secret"} and value
        else value
    )


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _Refused):
        return ConfigError(cause.key, _redact(cause.key, cause.value), cause.allowed)
    key = ".".join(str(part) for part in first["loc"]) or "<config>"
    value: object = None if first["type"] == "missing" else first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = "not a known setting (see examples/devicectl.toml)"
    else:
        allowed = _ALLOWED.get(key, first["msg"])
    if isinstance(value, Path):
        value = str(value)
    return ConfigError(key, _redact(key, value), allowed)


def _read_file(path: Path) -> dict[str, Any]:
    if not str(path).strip() or str(path) == ".":
        raise ConfigError("config", str(path), "a TOML file path (an empty one is refused)")
    try:
        data = _expand_user(path).read_bytes()
    except ValueError as exc:
        raise ConfigError("config", str(path), str(exc)) from None
    except OSError as exc:
        raise ConfigError("config", str(path), f"a readable TOML file ({exc.strerror})") from None
    try:
        return loads_toml(data)  # UTF-8, at most 1 MiB and 16 levels deep
    except BoundedInputError as exc:
        raise ConfigError("config", str(path), f"a UTF-8 TOML file: {exc.reason}") from None


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"mqtt__url": u}`` -> ``{"mqtt": {"url": u}}``; a None value means "not given"."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split("__")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (optional), the environment, and CLI ``overrides``.

    Overrides are CLI flags by setting name, nested with ``__`` (``mqtt__url="mqtt://h"``); a
    ``None`` override means the flag was not given. Raises ConfigError on the first bad value.
    """
    _refuse_renamed_variables(os.environ)
    file_values = _read_file(config_file) if config_file is not None else {}
    token = _FILE_VALUES.set(file_values)
    try:
        return Settings(**_nest(overrides))
    except ValidationError as exc:
        raise _config_error(exc) from None
    except SettingsError as exc:  # a table given as one variable: DEVICECTL_MQTT=...
        field = re.search(r'field "([a-z_]+)"', str(exc))
        name = f"DEVICECTL_{field.group(1).upper()}" if field else "DEVICECTL_*"
        raise ConfigError(
            name, "<set>", f"unset it; set the table's keys one by one, e.g. {name}__URL"
        ) from None
    finally:
        _FILE_VALUES.reset(token)
