"""The blocking calls of the MQTT adapter, run in worker threads: paho's ``reconnect()``
without leaking sockets, the TLS context, and the probes that read what a broker says of
our certificate without sending an MQTT CONNECT."""

from __future__ import annotations

import contextlib
import socket
import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from maskfl.protocol.errors import ConfigError, TransportError

from ._config import MqttConfig
from ._retry import TLS_HANDSHAKE_RESET, Diagnosis, diagnose

#: How long the alert probe waits for the broker's verdict on our certificate.
_PROBE_TIMEOUT_S = 3.0


def reconnect(client: paho.Client) -> MQTTErrorCode:
    """``client.reconnect()``, run in a worker thread, without leaking sockets.

    paho 2.2's ``_ssl_wrap_socket`` does not close the TCP/TLS socket when the
    handshake (or its timeout, or the host name check) fails; the socket is then
    reachable only from the traceback's frames and would be closed by the
    garbage collector with a ResourceWarning. Close it here, in the thread,
    where the traceback still holds those frames (asyncio drops them when it
    hands the exception to the loop).
    """
    try:
        return client.reconnect()
    except BaseException as exc:
        _close_sockets_in(exc)
        raise


def _close_sockets_in(exc: BaseException) -> None:
    """Close every socket a frame of ``exc``'s traceback holds."""
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def tls_probe(cfg: MqttConfig) -> tuple[ssl.SSLError | None, bool]:
    """The TLS alert the broker answers our certificate with, if any, and whether a TLS
    handshake completed at all (blocking).

    A handshake that then only reads: a broker that refuses the certificate sends its
    alert (``certificate revoked``, ``unknown ca``, ...) and closes; one that accepts
    it waits for CONNECT, which never comes, and the read times out. Sending nothing
    keeps the alert from being lost to a TCP reset, as it often is after a CONNECT with
    TLS 1.3. A peer that resets or closes in the handshake itself does not speak TLS."""
    context = tls_context(cfg)
    tls = cfg.tls
    assert tls is not None
    if tls.insecure:
        context.check_hostname = False
    handshake = False
    try:
        with (
            socket.create_connection((cfg.host, cfg.port), timeout=_PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=cfg.host) as sock,
        ):
            handshake = True
            sock.recv(1)
    except ssl.SSLError as exc:
        if "ALERT" in str(exc.reason or "").upper():
            return exc, True
        return None, handshake or isinstance(exc, ssl.SSLCertVerificationError)
    except (OSError, ValueError):
        return None, handshake
    return None, True


def probe_broker(cfg: MqttConfig) -> Diagnosis | None:
    """Whether the broker at ``cfg``'s address would take this client, without an MQTT
    CONNECT, so no session is taken over (blocking; for ``check`` commands).

    A TCP connect; with TLS also the handshake with this client's certificate and a
    short read for the alert a broker sends when it refuses the certificate. None when
    nothing went wrong, else the :func:`diagnose` of what did."""
    address = (cfg.host, cfg.port)
    try:
        raw = socket.create_connection(address, timeout=max(cfg.connect_timeout_s, 1.0))
    except OSError as exc:
        error = TransportError(f"cannot connect to MQTT broker {cfg.address}: {exc}")
        error.__cause__ = exc
        return diagnose(error)
    if cfg.tls is None:
        raw.close()
        return None
    handshake = False
    try:
        context = tls_context(cfg)
        if cfg.tls.insecure:
            context.check_hostname = False
        with raw, context.wrap_socket(raw, server_hostname=cfg.host) as sock:
            handshake = True
            sock.settimeout(_PROBE_TIMEOUT_S / 3)
            with contextlib.suppress(TimeoutError):
                sock.recv(1)
    except (OSError, ValueError) as exc:
        detail = f"cannot connect to MQTT broker {cfg.address}: {exc}"
        if not handshake and isinstance(exc, ConnectionResetError | ssl.SSLEOFError):
            detail += f": {TLS_HANDSHAKE_RESET}"
        error = TransportError(detail)
        error.__cause__ = exc
        return diagnose(error)
    return None


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """An SSLContext that verifies the broker (and presents our certificate for mTLS)."""
    tls = cfg.tls
    assert tls is not None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"mqtt.tls.ca_file: cannot load CA certificates from {tls.ca_file}: {exc}",
            field="tls.ca_file",
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls.cert_file: cannot load {tls.cert_file} with key {tls.key_file}: {exc}",
                field="tls.cert_file",
            ) from exc
    return context
