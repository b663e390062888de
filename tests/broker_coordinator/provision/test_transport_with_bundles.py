"""The bundles drive our own transport (maskfl.transport) against the generated broker:
the keys the agent and the coordinator read from their config files are enough to
connect over mTLS, and the ACL answers with MQTT 5 reason codes the transport raises."""

from __future__ import annotations

import asyncio

import pytest

from maskfl.agent.config import load_config as load_agent_config
from maskfl.broker_coordinator.config import load_config as load_coordinator_config
from maskfl.protocol.topics import Topics
from maskfl.transport import (
    LastWill,
    MqttConfig,
    MqttTransport,
    RefusedError,
    TlsConfig,
    broker_identity,
)
from tests.broker_coordinator.provision.conftest import Broker

pytestmark = pytest.mark.broker

T = Topics("demo")


def agent_transport(broker: Broker, device: str) -> MqttTransport:
    config = load_agent_config(broker.root / "devices" / device / "agent.toml")
    b = config.broker
    assert b.tls and b.ca_file and b.cert_file and b.key_file
    return MqttTransport(
        MqttConfig(
            host="localhost",  # the bundle says the public host; the test broker is local
            port=broker.port,
            client_id=config.device.id,
            tls=TlsConfig(ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file),
            will=LastWill(T.status(config.device.id), b"offline", qos=1),
        )
    )


def coordinator_transport(broker: Broker) -> MqttTransport:
    config = load_coordinator_config(broker.root / "coordinator" / "coordinator.toml", env={})
    b = config.broker
    return MqttTransport(
        MqttConfig(
            host="localhost",
            port=broker.port,
            client_id=broker_identity(TlsConfig(cert_file=b.cert_file, key_file=b.key_file), None)
            or "",
            clean_start=False,
            session_expiry_s=60,
            manual_ack=True,
            tls=TlsConfig(ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file),
        )
    )


async def test_agent_and_coordinator_talk_through_the_generated_broker(
    broker: Broker,
) -> None:
    coordinator = coordinator_transport(broker)
    agent = agent_transport(broker, "dev-a")
    async with asyncio.timeout(30):
        await coordinator.connect()
        await agent.connect()
        try:
            await coordinator.subscribe(list(T.coordinator_filters()))
            await agent.subscribe(list(T.agent_filters("dev-a")))
            await agent.publish(T.update(3, "dev-a"), b"masked words")
            got = await coordinator.receive()
            assert (got.topic, got.payload) == (T.update(3, "dev-a"), b"masked words")
            coordinator.ack(got)
            await coordinator.publish(T.receipts("dev-a"), b"accepted")
            receipt = await agent.receive()
            assert (receipt.topic, receipt.payload) == (T.receipts("dev-a"), b"accepted")
            with pytest.raises(RefusedError) as refused:
                await agent.publish(T.update(3, "dev-b"), b"impersonation")
            assert refused.value.reason_code == 135  # Not authorized
            with pytest.raises(RefusedError):
                await agent.publish(T.round, b"forged round parameters")
        finally:
            await agent.disconnect()
            await coordinator.disconnect()
