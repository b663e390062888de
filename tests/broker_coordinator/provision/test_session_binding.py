"""No certificate can take over another client's MQTT session (issue 10, item 1).

The generated mosquitto.conf binds the client id to the TLS certificate
(``use_identity_as_username`` + ``use_username_as_clientid``). Device dev-001, with its
own valid certificate, asks for the client id of dev-002 or of the coordinator: the
broker files it under ``dev-001`` instead, the victim keeps its connection, and the
victim's persistent session (with a message queued while it was away) is neither
resumed by the intruder nor wiped by its clean start. The victims are maskfl's own
clients, built from the provisioned config files by the code the agent and the
coordinator run.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.agent.cli import main as agent_main
from maskfl.agent.config import load_config as load_agent_config
from maskfl.agent.daemon import build_mqtt_config
from maskfl.broker_coordinator.config import load_config as load_coordinator_config
from maskfl.broker_coordinator.service import mqtt_config
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.topics import Topics
from maskfl.transport import LinkEvent, LinkState, MqttConfig, MqttTransport
from tests.broker_coordinator.provision.conftest import (
    WAIT_S,
    Broker,
    TlsClient,
    running_fleet_broker,
)

pytestmark = pytest.mark.broker

T = Topics("demo")
VICTIMS = ["dev-002", "coordinator"]


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    with running_fleet_broker(tmp_path, ["dev-001", "dev-002"]) as broker:
        monkeypatch.setenv("MASKFL__BROKER__HOST", "localhost")
        monkeypatch.setenv("MASKFL__BROKER__PORT", str(broker.port))
        yield broker


def victim_config(broker: Broker, victim: str) -> MqttConfig:
    """The MQTT settings maskfl's own code builds from the provisioned files."""
    if victim == "coordinator":
        env = {"MASKFL__BROKER__HOST": "localhost", "MASKFL__BROKER__PORT": str(broker.port)}
        return mqtt_config(
            load_coordinator_config(broker.root / "coordinator" / "coordinator.toml", env=env)
        )
    return build_mqtt_config(load_agent_config(broker.root / "devices" / victim / "agent.toml"))


def victim_topic(victim: str) -> tuple[str, str]:
    """(what the victim subscribes to, a topic someone else may publish there)."""
    if victim == "coordinator":
        return f"{T.prefix}round/+/update/+", T.update(1, "dev-002")
    return T.receipts(victim), T.receipts(victim)


def publisher(broker: Broker, victim: str) -> TlsClient:
    """Who may publish on the victim's topic: the coordinator (receipts) or dev-002."""
    client = broker.coordinator() if victim != "coordinator" else broker.device("dev-002")
    assert client.connect()
    return client


class Victim:
    """A maskfl transport that records its link events."""

    def __init__(self, config: MqttConfig) -> None:
        self.transport = MqttTransport(config)
        self.events: list[LinkEvent] = []
        self.transport.add_listener(self.events.append)

    @property
    def session_present(self) -> bool:
        ups = [e for e in self.events if e.state is LinkState.CONNECTED]
        return bool(ups and ups[-1].session_present)

    @property
    def kicked(self) -> list[LinkEvent]:
        return [e for e in self.events if e.state is LinkState.DISCONNECTED]


def wait_for_log(broker: Broker, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while broker.mosquitto.log().count(text) < count:
        assert time.monotonic() < deadline, (
            f"mosquitto never logged {text!r}:\n{broker.mosquitto.log()}"
        )
        time.sleep(0.02)  # inherent: mosquitto's log file, written by another process


@pytest.mark.parametrize("victim", VICTIMS)
async def test_a_device_cannot_take_over_a_live_session(fleet: Broker, victim: str) -> None:
    config = victim_config(fleet, victim)
    assert config.client_id == victim  # maskfl connects with the name on its certificate
    subscribe, publish = victim_topic(victim)
    me = Victim(config)
    async with asyncio.timeout(30), me.transport:
        await me.transport.subscribe(subscribe)
        wait_for_log(fleet, f"as {victim} (p5")
        for clean_start in (False, True):  # resume the victim's session, or start anew
            intruder = fleet.client(
                victim,
                fleet.root / "devices/dev-001/broker-ca.pem",
                fleet.root / "devices/dev-001/device-tls.pem",
                fleet.root / "devices/dev-001/device-tls.key",
            )
            assert intruder.connect(clean_start=clean_start, session_expiry_s=600)
            # Filed under its own name, with a new session of its own, not the victim's.
            assert intruder.session_present is False
            intruder.close()
        assert "as dev-001 (p5" in fleet.mosquitto.log()
        assert f"Client {victim} already connected" not in fleet.mosquitto.log()
        source = publisher(fleet, victim)
        assert not source.publish(publish, b"live").is_failure
        got = await me.transport.receive()
        assert (got.topic, got.payload) == (publish, b"live")
        me.transport.ack(got)
        assert me.kicked == [] and me.transport.stats.connects == 1


@pytest.mark.parametrize("victim", VICTIMS)
async def test_a_device_cannot_resume_or_wipe_a_stored_session(fleet: Broker, victim: str) -> None:
    config = victim_config(fleet, victim)
    subscribe, publish = victim_topic(victim)
    first = Victim(config)
    async with asyncio.timeout(30):
        async with first.transport:
            await first.transport.subscribe(subscribe)
        # The victim is away; a message is queued in its persistent session.
        source = publisher(fleet, victim)
        assert not source.publish(publish, b"queued while away").is_failure
        files = fleet.root / "devices/dev-001"
        for clean_start in (False, True):  # resume it, then wipe it
            intruder = fleet.client(
                victim, files / "broker-ca.pem", files / "device-tls.pem", files / "device-tls.key"
            )
            assert intruder.connect(clean_start=clean_start, session_expiry_s=600)
            assert intruder.session_present is False
            intruder.subscribe(subscribe)
            intruder.close()
            assert intruder.messages.empty()
        again = Victim(config)
        async with again.transport:
            assert again.session_present  # its session survived both
            got = await again.transport.receive()
            assert (got.topic, got.payload) == (publish, b"queued while away")
            again.transport.ack(got)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("victim", VICTIMS)
async def test_the_reported_mosquitto_sub_takeover_is_refused(fleet: Broker, victim: str) -> None:
    """The issue's reproduction, as written: mosquitto_sub -i <victim> with dev-001's files."""
    subscribe, publish = victim_topic(victim)
    me = Victim(victim_config(fleet, victim))
    files = fleet.root / "devices/dev-001"
    async with asyncio.timeout(30), me.transport:
        await me.transport.subscribe(subscribe)
        sub = await asyncio.create_subprocess_exec(
            *[
                "mosquitto_sub",
                "-V",
                "mqttv5",
                "-h",
                "localhost",
                "-p",
                str(fleet.port),
                "-i",
                victim,
                "--cert",
                str(files / "device-tls.pem"),
                "--key",
                str(files / "device-tls.key"),
                "--cafile",
                str(files / "broker-ca.pem"),
                "-t",
                subscribe,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_log(fleet, "as dev-001 (p5")
        finally:
            sub.terminate()
            await sub.wait()
        source = publisher(fleet, victim)
        assert not source.publish(publish, b"live").is_failure
        got = await me.transport.receive()
        assert got.payload == b"live"
        assert me.kicked == [] and me.transport.stats.connects == 1


def test_maskfl_clients_refuse_a_client_id_that_is_not_their_certificates(
    fleet: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent given another device's certificate, or a coordinator told to use a client
    id of its own, stops at start with one line naming the key, not at the broker."""
    other = fleet.root / "devices/dev-001"
    monkeypatch.setenv("MASKFL__BROKER__CERT_FILE", str(other / "device-tls.pem"))
    monkeypatch.setenv("MASKFL__BROKER__KEY_FILE", str(other / "device-tls.key"))
    config = load_agent_config(fleet.root / "devices/dev-002/agent.toml")
    with pytest.raises(
        ConfigError, match=r"broker\.cert_file: the broker knows this client as 'dev-001'"
    ):
        build_mqtt_config(config)
    env = {
        "MASKFL__BROKER__HOST": "localhost",
        "MASKFL__BROKER__CLIENT_ID": "maskfl-coordinator",
    }
    coordinator = load_coordinator_config(fleet.root / "coordinator/coordinator.toml", env=env)
    with pytest.raises(ConfigError, match=r"broker\.client_id = 'maskfl-coordinator'") as info:
        mqtt_config(coordinator)
    assert info.value.field == "broker.client_id"


def test_agent_check_names_a_certificate_of_another_device(
    fleet: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = fleet.root / "devices/dev-001"
    monkeypatch.setenv("MASKFL__BROKER__CERT_FILE", str(other / "device-tls.pem"))
    monkeypatch.setenv("MASKFL__BROKER__KEY_FILE", str(other / "device-tls.key"))
    bundle = fleet.root / "devices/dev-002/agent.toml"
    assert agent_main(["check", "--config", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "broker.cert_file: the broker knows this client as 'dev-001'" in err
    assert len(err.strip().splitlines()) == 1, err
