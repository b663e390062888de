"""maskfl.transport: our one asyncio MQTT 5 adapter over paho-mqtt, and its in-memory twin.

Nothing else in maskfl imports paho. Services code against :class:`Transport`;
production uses :class:`MqttTransport` (a real broker), unit tests of phase
logic use :class:`MemoryBroker` / :class:`MemoryTransport`. The module
docstring of ``_mqtt`` says what happens on a lost link, on a full incoming
queue and with oversize payloads.
"""

from __future__ import annotations

from ._config import MQTT_MAX_PACKET, LastWill, MqttConfig, TlsConfig
from ._errors import (
    NotConnectedError,
    PayloadTooLargeError,
    RefusedError,
    TransportClosedError,
)
from ._memory import MemoryBroker, MemoryTransport
from ._mqtt import MqttTransport, publish_packet_size
from ._passwd import (
    mosquitto_passwd_line,
    mosquitto_password_hash,
    verify_mosquitto_password,
)
from ._topics import check_filter, check_topic, topic_matches
from ._types import LinkEvent, LinkListener, LinkState, Message, Transport, TransportStats

__all__ = [
    "MQTT_MAX_PACKET",
    "LastWill",
    "LinkEvent",
    "LinkListener",
    "LinkState",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttConfig",
    "MqttTransport",
    "NotConnectedError",
    "PayloadTooLargeError",
    "RefusedError",
    "TlsConfig",
    "Transport",
    "TransportClosedError",
    "TransportStats",
    "check_filter",
    "check_topic",
    "mosquitto_passwd_line",
    "mosquitto_password_hash",
    "publish_packet_size",
    "topic_matches",
    "verify_mosquitto_password",
]
