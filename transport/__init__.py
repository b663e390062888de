"""maskfl.transport: our one asyncio MQTT 5 adapter over paho-mqtt, and its in-memory twin.

Nothing else in maskfl imports paho. Services code against :class:`Transport`;
production uses :class:`MqttTransport` (a real broker), unit tests of phase
logic use :class:`MemoryBroker` / :class:`MemoryTransport`. The module
docstring of ``_mqtt`` says what happens on a lost link, on a full incoming
queue and with oversize payloads.

Typical use (the coordinator: persistent session, ack after commit)::

    config = MqttConfig(host="broker", port=8883, client_id="coordinator",
                        clean_start=False, session_expiry_s=7 * 24 * 3600,
                        manual_ack=True, receive_maximum=200,
                        tls=TlsConfig(ca_file=ca, cert_file=crt, key_file=key))
    async with MqttTransport(config) as mqtt:
        mqtt.add_listener(lambda event: metrics.connected.set(event.state == "connected"))
        await mqtt.subscribe(["maskfl/v1/f/round/+/sum/+", "maskfl/v1/f/status/+"])
        async for message in mqtt.messages():
            await store(message)      # durable first ...
            mqtt.ack(message)         # ... then the broker may forget it

Reconnecting, everywhere (the transport after a lost link, the agent and the
coordinator around their first connect): :class:`Backoff` (exponential, equal
jitter), :func:`diagnose` (a failure's likely :class:`Cause` and advice) and
:class:`LinkReport` (one log line per change of cause, not per attempt).
:func:`broker_identity` is the name the broker knows a client by, which maskfl
clients use as their client id. :func:`decode_off_loop` decodes a received message
in a worker thread once it is :data:`OFF_LOOP_BYTES` or more (one threshold for all).

Time: the agent and the coordinator read and wait on an injected :class:`Clock`
(:data:`SYSTEM_CLOCK` in production, a fake one in the round harness); :func:`wait_for`
bounds a wait on it.
Reconnect back-off and acknowledgement waits are the link's and stay on real time.

Errors: everything the link does wrong is a ``TransportError``:
:class:`RefusedError` (a failing MQTT 5 reason code, ``.reason_code``),
:class:`PayloadTooLargeError`, :class:`NotConnectedError` (QoS 0 while down),
:class:`TransportClosedError`. Bad topics, filters or QoS values are caller
bugs: ``LocalProtocolError``. Bad settings: ``ConfigError`` naming the field.
"""

from __future__ import annotations

from ._blocking import probe_broker
from ._clock import SYSTEM_CLOCK, Clock, SystemClock, wait_for
from ._config import (
    MQTT_MAX_PACKET,
    LastWill,
    MqttConfig,
    TlsConfig,
    broker_identity,
    certificate_common_name,
)
from ._errors import (
    NotConnectedError,
    PayloadTooLargeError,
    RefusedError,
    TransportClosedError,
)
from ._logging import LOG_FORMATS, LogFormat, resolve_log_format, setup_logging
from ._memory import MemoryBroker, MemoryTransport
from ._mqtt import MqttTransport
from ._offloop import OFF_LOOP_BYTES, decode_off_loop, off_loop
from ._paho import publish_packet_size
from ._passwd import (
    mosquitto_passwd_line,
    mosquitto_password_hash,
    verify_mosquitto_password,
)
from ._retry import Backoff, Cause, Diagnosis, LinkReport, diagnose
from ._settings import BrokerSettings, Section, ServiceSettings, check_private_mode
from ._topics import check_filter, check_topic, topic_matches
from ._types import (
    LinkEvent,
    LinkListener,
    LinkState,
    Message,
    Transport,
    TransportFactory,
    TransportStats,
)

__all__ = [
    "LOG_FORMATS",
    "MQTT_MAX_PACKET",
    "OFF_LOOP_BYTES",
    "SYSTEM_CLOCK",
    "Backoff",
    "BrokerSettings",
    "Cause",
    "Clock",
    "Diagnosis",
    "LastWill",
    "LinkEvent",
    "LinkListener",
    "LinkReport",
    "LinkState",
    "LogFormat",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttConfig",
    "MqttTransport",
    "NotConnectedError",
    "PayloadTooLargeError",
    "RefusedError",
    "Section",
    "ServiceSettings",
    "SystemClock",
    "TlsConfig",
    "Transport",
    "TransportClosedError",
    "TransportFactory",
    "TransportStats",
    "broker_identity",
    "certificate_common_name",
    "check_filter",
    "check_private_mode",
    "check_topic",
    "decode_off_loop",
    "diagnose",
    "mosquitto_passwd_line",
    "mosquitto_password_hash",
    "off_loop",
    "probe_broker",
    "publish_packet_size",
    "resolve_log_format",
    "setup_logging",
    "topic_matches",
    "verify_mosquitto_password",
    "wait_for",
]
