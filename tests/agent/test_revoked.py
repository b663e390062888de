"""A revoked device stops for good: ``maskfl-agent run`` exits 2 (no systemd restart).

A real mosquitto, a real agent process with a real NOTIFY_SOCKET, and the fleet CA's
revocation list retained on the broker, as the coordinator publishes it.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.agent.config import load_config
from maskfl.protocol.identity import Certificate, issue_revocation_list
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto
from maskfl.transport import MqttConfig, MqttTransport
from tests.agent.fleet import Fleet
from tests.agent.test_process import AgentProcess, _recv_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="mfl") as path:
        yield Path(path)


async def publish_revocations(
    fleet: Fleet, broker: Mosquitto, *, version: int, serials: list[int]
) -> None:
    revocations = issue_revocation_list(
        fleet.ca, fleet=fleet.name, version=version, issued_at=int(time.time()), serials=serials
    )
    config = MqttConfig(host=broker.host, port=broker.port, client_id=f"ca-{version}")
    async with MqttTransport(config) as transport:
        await transport.publish(
            Topics(fleet.name).revocations, revocations.to_bytes(), qos=1, retain=True
        )


def test_a_revoked_device_exits_2_after_stopping(
    mosquitto: Mosquitto, tmp_path: Path, short_dir: Path
) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config_path = fleet.device("dev-r", mosquitto)
    serial = Certificate.from_bytes(
        load_config(config_path).device.certificate_file.read_bytes()
    ).serial
    other = fleet.identity("dev-other").certificate.serial
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        address = str(short_dir / "notify")
        server.bind(address)
        agent = AgentProcess(config_path, tmp_path / "agent.log", env={"NOTIFY_SOCKET": address})
        try:
            _recv_until(server, lambda ms: any(m.startswith("STATUS=connected") for m in ms))
            # Another device's revocation changes nothing for this one.
            asyncio.run(publish_revocations(fleet, mosquitto, version=1, serials=[other]))
            _recv_until(server, lambda ms: any(m.startswith("STATUS=connected") for m in ms))
            assert agent.proc.poll() is None, agent.text()
            asyncio.run(publish_revocations(fleet, mosquitto, version=2, serials=[other, serial]))
            messages = _recv_until(server, lambda ms: "STOPPING=1" in ms)
            assert agent.proc.wait(15) == 2, agent.text()
        finally:
            if agent.proc.poll() is None:
                agent.kill()
    assert any(m.startswith("STATUS=revoked") for m in messages), messages
    errors = [line for line in agent.text().splitlines() if "ERROR" in line]
    assert len(errors) == 1, agent.text()
    assert f"serial {serial}" in errors[0] and "is revoked" in errors[0]
    assert "Traceback" not in agent.text()
