"""Telemetry configuration: broker URL, topic base, TLS material, credentials, outbox bound.

Credentials and TLS files come from the config, else from the URL's user info (``mqtt://u:p@h``),
else from the environment, named as the daemon's settings are (``devicectl.config``):
``DEVICECTL_MQTT__USERNAME``, ``DEVICECTL_MQTT__PASSWORD``, ``DEVICECTL_MQTT__CA_FILE``,
``DEVICECTL_MQTT__CERT_FILE``, ``DEVICECTL_MQTT__KEY_FILE``. (The daemon reads them through its
settings, where they rank above the config file; client commands such as ``watch`` read them here.)
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from devicectl.errors import ConfigError
from protocols.mqtt import DEFAULT_PREFIX, TopicBase

__all__ = ["BrokerAddress", "TelemetryConfig", "parse_broker_url", "tls_context_for"]


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883 by default)."""
    allowed = "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("mqtt.url", url, allowed) from exc
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname or parts.path not in {"", "/"}:
        raise ConfigError("mqtt.url", url, allowed)
    if port == 0:
        raise ConfigError("mqtt.url", url, "a broker port from 1 to 65535")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class TelemetryConfig(BaseModel):
    """Everything :class:`devicectl.telemetry.Telemetry` needs; validated at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        default=None,
        description="Broker URL; None or empty: no broker, QoS 1 messages wait in the outbox.",
    )
    prefix: str = DEFAULT_PREFIX
    site: str = "default"
    device: str = Field(description="Device id: the controller's serial number.")
    data_dir: Path = Field(description="Holds telemetry-outbox.sqlite (outbox, seq, boot).")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="auto: MQTT 5, falling back to 3.1.1 if the broker refuses it"
    )
    keepalive_s: int = Field(default=15, ge=2, le=600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60, description="Wait for CONNACK.")
    flush_timeout_s: float = Field(default=1.0, ge=0, le=10)
    in_flight: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="QoS 1 publishes outstanding at once (20 measured best on loopback; paho "
        "walks its in-flight list on every PUBACK, so more is slower there).",
    )
    backoff_initial_s: float = Field(default=0.25, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    batch_interval_s: float = Field(default=0.1, gt=0, le=1.0)
    handoff_capacity: int = Field(default=50_000, ge=100)
    resume_boot: int | None = Field(
        default=None,
        ge=1,
        description="The boot of this daemon run, for a telemetry worker started again within it "
        "(devicectl.telemetry.process): the same run, not a new start; None: a new boot.",
    )

    @property
    def topics(self) -> TopicBase:
        try:
            return TopicBase(self.prefix, self.site, self.device)
        except ValueError as exc:
            raise ConfigError(
                "mqtt.topic", f"{self.prefix}/{self.site}/{self.device}", str(exc)
            ) from exc

    @property
    def client_id(self) -> str:
        """Derived from the device serial, so a second daemon for the same device takes over."""
        return f"devicectl-{self.device}"[:64]

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "telemetry-outbox.sqlite"

    @property
    def has_broker(self) -> bool:
        return bool(self.url)

    def address(self, environ: Mapping[str, str] | None = None) -> BrokerAddress:
        env = os.environ if environ is None else environ
        parsed = parse_broker_url(self.url or "")
        username = self.username or parsed.username or env.get("DEVICECTL_MQTT__USERNAME")
        password = (
            (self.password.get_secret_value() if self.password is not None else None)
            or parsed.password
            or env.get("DEVICECTL_MQTT__PASSWORD")
        )
        return BrokerAddress(parsed.host, parsed.port, parsed.tls, username, password)

    def tls_context(self, environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
        """The client TLS context for ``mqtts://``; None for ``mqtt://``. Raises ConfigError."""
        if not self.url:
            return None
        return tls_context_for(self.url, self.ca_file, self.cert_file, self.key_file, environ)


def tls_context_for(
    url: str,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ssl.SSLContext | None:
    """A verifying client TLS context for an ``mqtts://`` URL (None for ``mqtt://``).

    Files not given come from ``DEVICECTL_MQTT__CA_FILE``/``__CERT_FILE``/``__KEY_FILE``; with
    no CA the system's
    trust store is used. Unreadable files raise :class:`ConfigError` naming the file.
    """
    env = os.environ if environ is None else environ
    if not parse_broker_url(url).tls:
        return None

    def pick(value: Path | None, var: str) -> Path | None:
        if value is not None:
            return value
        return Path(env[var]) if env.get(var) else None

    ca = pick(ca_file, "DEVICECTL_MQTT__CA_FILE")
    cert = pick(cert_file, "DEVICECTL_MQTT__CERT_FILE")
    key = pick(key_file, "DEVICECTL_MQTT__KEY_FILE")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("mqtt.ca_file", str(ca), f"a readable PEM CA file ({exc})") from exc
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "mqtt.cert_file", str(cert), f"a readable PEM certificate and key ({exc})"
            ) from exc
    return context
