"""The agent runs from a bundle made by ``maskfl-provision``, over mTLS, through the ACL.

The generated broker (TLS only, per-device ACL) and the bundle's agent.toml, key and
certificate are used as they are; only the broker host (the bundle names the public
one) and the state directory are overridden, the way an operator would, through
``MASKFL__SECTION__KEY``. The coordinator's TLS identity reads the agent's heartbeat,
which must verify against the fleet CA.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.agent.cli import main as agent_main
from maskfl.agent.config import load_config
from maskfl.broker_coordinator.config import load_config as load_coordinator_config
from maskfl.protocol.keys import public_key_from_pem
from maskfl.protocol.messages import Heartbeat, MessageType, decode_message, verify_sender
from maskfl.protocol.topics import Topics
from maskfl.transport import MqttConfig, MqttTransport, TlsConfig, broker_identity
from tests.agent.test_daemon import running_agent
from tests.broker_coordinator.provision.conftest import Broker, running_fleet_broker

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    with running_fleet_broker(tmp_path, ["dev-a"]) as broker:
        yield broker


async def test_agent_from_a_provisioned_bundle(
    fleet_broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = fleet_broker.root / "devices" / "dev-a"
    monkeypatch.setenv("MASKFL__BROKER__HOST", "localhost")
    monkeypatch.setenv("MASKFL__BROKER__PORT", str(fleet_broker.port))
    monkeypatch.setenv("MASKFL__STATE__DIR", str(tmp_path / "state"))
    assert agent_main(["check", "--config", str(bundle / "agent.toml")]) == 0
    config = load_config(bundle / "agent.toml")
    assert config.broker.tls and config.device.id == "dev-a"

    coordinator_cfg = load_coordinator_config(
        fleet_broker.root / "coordinator" / "coordinator.toml", env={}
    )
    b = coordinator_cfg.broker
    listener = MqttTransport(
        MqttConfig(
            host="localhost",
            port=fleet_broker.port,
            client_id=broker_identity(TlsConfig(cert_file=b.cert_file, key_file=b.key_file), None)
            or "",
            tls=TlsConfig(ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file),
        )
    )
    topics = Topics(config.device.fleet)
    async with asyncio.timeout(60), listener:
        await listener.subscribe(topics.status("dev-a"), qos=1)
        async with running_agent(bundle / "agent.toml") as agent:
            message = await listener.receive()
            signed = decode_message(message.payload, max_size=65536)
            signed.expect(fleet=config.device.fleet, types=(MessageType.HEARTBEAT,))
            assert isinstance(signed.body, Heartbeat)
            ca = public_key_from_pem(config.device.ca_public_key_file.read_bytes())
            cert = verify_sender(
                signed,
                ca_public_key=ca,
                fleet=config.device.fleet,
                now=time.time(),
                revocations=None,
            )
            assert cert.subject == "dev-a"
            assert agent.handler_errors == 0
