"""Real mosquitto brokers for tests (a pytest plugin: ``pytest_plugins = ["tests.brokers"]``).

``Broker`` runs one ``mosquitto`` process on a free port of 127.0.0.1 with a config written to its
own directory, and can be stopped and started again on the same port (outage tests); the broker's
persistence survives that (a persistent subscriber keeps its session). ``make_pki`` writes a test
CA, a server certificate for 127.0.0.1/localhost and a client certificate with the ``openssl`` CLI,
for the TLS listener (``Broker(..., tls=pki)``).

Pitfalls handled (measured; docs/mqtt.md): ``set_tcp_nodelay true`` (Nagle stalls QoS 1 bursts),
``max_queued_messages 0`` (no silent drops to a slow subscriber), ``persistence true`` in a
directory the broker owns, log to stdout (captured into ``mosquitto.log``) and, when the tests run
as root, ``user`` set to the current user so mosquitto can write its directory.

Fixtures: ``mosquitto`` (function scope, a started plain broker) and ``pki`` (a fresh test PKI).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool

__all__ = ["Broker", "Pki", "free_port", "make_pki", "mosquitto", "pki"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Pki:
    """Files of a test PKI: a CA, a server key pair signed by it, a client key pair signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(directory: Path, *, name: str = "devicectl-test") -> Pki:
    """Create a test CA and server/client certificates in ``directory`` with the openssl CLI."""
    require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    days = "2"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        days,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        f"/CN={name} CA",
        cwd=directory,
    )
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for role in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{role}.key",
            "-out",
            f"{role}.csr",
            "-subj",
            f"/CN={name} {role}",
            cwd=directory,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{role}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            f"{role}.ext",
            "-out",
            f"{role}.crt",
            cwd=directory,
        )
    for key in directory.glob("*.key"):
        key.chmod(0o644)  # mosquitto may run as another user and must read its own key
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


class Broker:
    """One mosquitto process, restartable on the same ports.

    ``port`` is the plain listener; with ``tls`` there is also ``tls_port`` (server certificate
    from the PKI, and with ``require_client_cert`` clients must present a certificate signed by
    its CA). ``extra_config`` lines are appended to the config verbatim.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: Pki | None = None,
        require_client_cert: bool = False,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        self.executable = require_tool("mosquitto")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls is not None else None
        self.tls = tls
        self.config = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            "allow_anonymous true",
            "max_queued_messages 0",
            "persistence true",
            f"persistence_location {directory / 'data'}/",
            "autosave_interval 1",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            lines.insert(0, f"user {getpass.getuser()}")
        if tls is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                "set_tcp_nodelay true",
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                f"require_certificate {'true' if require_client_cert else 'false'}",
            ]
        lines += list(extra_config)
        self.config.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener")
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """What the broker has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and return once every listener accepts connections."""
        if self.running:
            return
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        deadline = time.monotonic() + timeout
        for port in ports:
            while not self._accepts(port):
                if self._process.poll() is not None:
                    self._process = None
                    raise RuntimeError(f"mosquitto exited at start-up:\n{self.log()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on {port}:\n{self.log()}")
                time.sleep(0.02)

    def _accepts(self, port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, port), 0.2):
            return True
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop mosquitto gracefully (it saves its persistence) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A started mosquitto with a plain listener on 127.0.0.1 (``.url``, ``.port``)."""
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh test CA with server and client certificates (openssl CLI)."""
    return make_pki(tmp_path / "pki")
