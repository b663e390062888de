"""paho-mqtt as the MQTT adapter uses it: the client configured, the size of the PUBLISH
packet paho sends, its writes from a memoryview for large packets, and its socket-error
log lines demoted to DEBUG (the adapter reports a lost link once, with its cause)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ._blocking import tls_context
from ._config import MqttConfig

LARGE_PUBLISH = 1 << 20
"""Publishes from this size on are sent from a memoryview (see :func:`zero_copy_writes`)."""


class _SocketErrorsAsDebug(logging.Filter):
    """paho logs a broken socket at ERROR; the transport reports the lost link once, with
    its likely cause, so these lines are DEBUG (kept only when DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(
            ("failed to receive on socket", "failed to send")
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return _paho_log.isEnabledFor(logging.DEBUG)
        return True


_paho_log = logging.getLogger("maskfl.transport.paho")
_paho_log.addFilter(_SocketErrorsAsDebug())


def publish_packet_size(topic: str, payload_len: int, qos: int) -> int:
    """Bytes of the PUBLISH packet paho sends for this message (no properties).

    This is what the broker compares with its maximum packet size: fixed
    header byte, remaining-length varint, topic, packet id (QoS > 0), the
    empty property length byte, payload.
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + 1 + payload_len
    varint = 1
    while remaining >= 128**varint and varint < 4:
        varint += 1
    return 1 + varint + remaining


def make_client(cfg: MqttConfig) -> paho.Client:
    """A paho MQTT 5 client as ``cfg`` says (identity, limits, will, TLS); its callbacks are
    the adapter's to set."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=cfg.manual_ack,
    )
    # An exception escaping one of our callbacks would leave paho's packet
    # reader half-reset; let paho log it (ERROR, on this logger) and go on.
    client.suppress_exceptions = True
    client.enable_logger(_paho_log)
    client.connect_timeout = cfg.connect_timeout_s  # TCP connect and TLS handshake
    client.max_inflight_messages_set(cfg.max_inflight)
    client.max_queued_messages_set(cfg.max_queued_publishes)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.will is not None:
        client.will_set(cfg.will.topic, cfg.will.payload, cfg.will.qos, cfg.will.retain)
    if cfg.tls is not None:
        client.tls_set_context(tls_context(cfg))
        client.tls_insecure_set(cfg.tls.insecure)
    return client


def zero_copy_writes(client: paho.Client) -> None:
    """Let paho send queued packets from a memoryview.

    paho (2.1) writes a packet with ``sock.send(packet[pos:])`` on a ``bytearray``,
    which copies everything not yet sent at every partial write: quadratic in the
    packet size (a 100 MB global model took 0.8 s and 0.6 CPU-s to publish). A
    memoryview slices without copying; paho only slices and sends it.
    """
    queue: Iterable[dict[str, Any]] = getattr(client, "_out_packet", ())
    for queued in queue:  # a paho without this private queue: nothing to do
        packet = queued.get("packet")
        if isinstance(packet, bytearray):
            queued["packet"] = memoryview(packet)
