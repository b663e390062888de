"""Connection settings of one MQTT client, as one frozen dataclass.

The service configs (pydantic, at the edges) build a :class:`MqttConfig`; inside
the process only this plain value travels. ``__post_init__`` checks the fields
that would otherwise fail late and obscurely (a persistent session without an
expiry silently queues nothing in MQTT 5) and names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from maskfl.protocol.errors import ConfigError

#: The largest MQTT packet: 1 byte header, 4 bytes remaining length, 268,435,455 bytes.
MQTT_MAX_PACKET = 268_435_460


@dataclass(frozen=True, slots=True)
class LastWill:
    """The message the broker publishes for us when the link dies without DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for the broker connection.

    ``ca_file`` None uses the system trust store. ``cert_file`` and ``key_file``
    (both or neither) are the client certificate for mutual TLS. ``insecure``
    skips the host name check only (the chain is still verified); leave it off
    outside tests.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "tls.cert_file and tls.key_file go together: set both for mutual TLS, or neither",
                field="tls.cert_file",
            )


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Everything needed to open and keep one MQTT 5 connection.

    Persistent sessions: MQTT 5 needs ``clean_start=False`` *and*
    ``session_expiry_s > 0``; with an expiry of 0 the broker ends the session at
    disconnect and queues nothing (dependency-facts §2), so that combination is
    refused here.

    ``receive_maximum`` is how many unacknowledged QoS 1 messages the broker may
    send us at once (with ``manual_ack`` each message we hold and have not acked
    takes a slot); ``max_inflight`` is how many of our own QoS 1 publishes may
    wait for PUBACK on the wire (more wait in paho's queue, bounded by
    ``max_queued_publishes``). ``incoming_queue_size`` bounds the messages
    received and not yet taken by the consumer; ``max_incoming_payload`` is the
    largest payload we accept (larger ones are acked, dropped and counted, and
    the broker is told our maximum packet size so it does not send far larger).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    clean_start: bool = True
    session_expiry_s: int = 0
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    will: LastWill | None = None
    manual_ack: bool = False
    receive_maximum: int = 20
    max_inflight: int = 20
    max_queued_publishes: int = 1000
    incoming_queue_size: int = 1000
    max_incoming_payload: int = 4 * 1024 * 1024
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0

    def __post_init__(self) -> None:  # noqa: PLR0912 one check per field, each naming it
        def bad(name: str, fix: str) -> ConfigError:
            return ConfigError(f"mqtt.{name} = {getattr(self, name)!r}: {fix}", field=name)

        if not self.host:
            raise bad("host", "set the broker host name or address")
        if not 0 < self.port < 65536:
            raise bad("port", "use a TCP port between 1 and 65535")
        if not 0 <= self.session_expiry_s < 2**32:
            raise bad("session_expiry_s", "use 0 .. 4294967295 seconds")
        if not self.clean_start and self.session_expiry_s == 0:
            raise bad(
                "session_expiry_s",
                "a persistent session (clean_start = false) needs session_expiry_s > 0 in MQTT 5",
            )
        if not self.clean_start and not self.client_id:
            raise bad("client_id", "a persistent session needs a fixed, non-empty client_id")
        if not 0 <= self.keepalive_s < 65536:
            raise bad("keepalive_s", "use 0 (off) .. 65535 seconds")
        if self.password is not None and self.username is None:
            raise bad("username", "a password needs a username")
        if not 0 < self.receive_maximum < 65536:
            raise bad("receive_maximum", "use 1 .. 65535")
        if not 0 < self.max_inflight < 65536:
            raise bad("max_inflight", "use 1 .. 65535")
        if self.max_queued_publishes < 1:
            raise bad("max_queued_publishes", "use at least 1")
        if self.incoming_queue_size < 1:
            raise bad("incoming_queue_size", "use at least 1")
        if not 0 < self.max_incoming_payload <= MQTT_MAX_PACKET:
            raise bad("max_incoming_payload", f"use 1 .. {MQTT_MAX_PACKET} bytes")
        if self.connect_timeout_s <= 0:
            raise bad("connect_timeout_s", "use a positive number of seconds")
        if self.reconnect_min_s <= 0:
            raise bad("reconnect_min_s", "use a positive number of seconds")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise bad("reconnect_max_s", "must be at least reconnect_min_s")
        if self.will is not None and self.will.qos not in (0, 1):
            raise ConfigError("mqtt.will.qos: use 0 or 1", field="will.qos")

    @property
    def address(self) -> str:
        """``host:port``, as error messages and logs show it."""
        return f"{self.host}:{self.port}"


def broker_identity(tls: TlsConfig | None, username: str | None) -> str | None:
    """The name the broker knows this client by, which is also its MQTT client id.

    A provisioned broker takes the common name of the TLS client certificate as the
    username (``use_identity_as_username``) and the username as the client id
    (``use_username_as_clientid``), whatever client id the client sends; a broker
    with password logins does the same with the username. maskfl clients connect
    with exactly this id, so the broker's logs and ours name one client alike.
    ``None``: no certificate and no username (an anonymous development listener).
    Raises :class:`ConfigError` naming ``tls.cert_file`` if the certificate cannot
    be read or has no single common name.
    """
    if tls is not None and tls.cert_file is not None:
        return certificate_common_name(tls.cert_file)
    return username or None


def certificate_common_name(path: Path) -> str:
    """The subject common name of the PEM certificate at ``path`` (its first certificate)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(
            f"tls.cert_file: cannot read {path}: {exc.strerror or exc}", field="tls.cert_file"
        ) from exc
    except ValueError as exc:
        raise ConfigError(
            f"tls.cert_file: {path} is not a PEM certificate ({exc})", field="tls.cert_file"
        ) from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise ConfigError(
            f"tls.cert_file: {path} must name exactly one subject common name (the broker "
            f"takes it as this client's username and client id); it has {len(names)}",
            field="tls.cert_file",
        )
    return names[0].value
