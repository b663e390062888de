"""The agent's broker link settings: its ``[broker]`` section as transport settings."""

from __future__ import annotations

import dataclasses

from maskfl.agent.config import AgentConfig
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.topics import Topics
from maskfl.transport import LastWill, MqttConfig, broker_identity

__all__ = ["MAX_PUBLISH_PAYLOAD", "build_mqtt_config"]

#: The largest single PUBLISH payload we ask for: MQTT's 268,435,455-byte packet limit less
#: the room the transport adds for topic and properties (larger messages come in chunks).
MAX_PUBLISH_PAYLOAD = 268_000_000


def build_mqtt_config(config: AgentConfig, will: bytes | None = b"") -> MqttConfig:
    """The transport settings of the agent's broker section."""
    broker = config.broker
    tls = broker.tls_config()
    topics = Topics(config.device.fleet)
    # The broker knows the device by its certificate (or username) and files its session
    # under that name whatever client id is sent (use_username_as_clientid); one that is
    # not device.id would get no rights on this device's topics.
    known_as = broker_identity(tls, broker.username)
    if known_as is not None and known_as != config.device.id:
        field = "broker.cert_file" if tls is not None and tls.cert_file else "broker.username"
        raise ConfigError(
            f"{field}: the broker knows this client as {known_as!r}, but device.id is "
            f"{config.device.id!r}; use the certificate (or username) issued for "
            f"{config.device.id!r}, as in its bundle",
            field=field,
        )
    return dataclasses.replace(
        broker.mqtt_config(config.device.id, clean_start=broker.session_expiry_s == 0),
        will=None if will is None else LastWill(topics.status(config.device.id), will, qos=1),
        max_incoming_payload=min(config.limits.max_message_bytes, MAX_PUBLISH_PAYLOAD),
    )
