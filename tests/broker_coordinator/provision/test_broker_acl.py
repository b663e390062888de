"""The generated mosquitto config against a real mosquitto: mTLS, ACL, CRL, revocation.

Every client is built from the files of a bundle written by ``maskfl-provision``.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from maskfl.broker_coordinator.provision import _tls
from maskfl.protocol.errors import CertificateError, Reason
from maskfl.protocol.identity import Certificate, RevocationList, verify_certificate
from maskfl.protocol.keys import public_key_from_pem
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import free_port
from tests.broker_coordinator.provision.conftest import Broker, provision, start_fleet_broker

pytestmark = pytest.mark.broker

P = "maskfl/v1/demo"
T = Topics("demo")


def test_device_publishes_its_participant_messages_and_status(broker: Broker) -> None:
    dev = broker.device("dev-a")
    assert dev.connect()
    for topic in (T.sum(7, "dev-a"), T.update(7, "dev-a"), T.sum2(7, "dev-a")):
        assert dev.allowed(topic), topic
    assert dev.allowed(T.status("dev-a"))


@pytest.mark.parametrize(
    "topic",
    [
        f"{P}/round",  # round parameters
        f"{P}/revocations",
        f"{P}/model/mlp/latest",
        f"{P}/model/mlp/graph",
        f"{P}/round/7/sums",
        f"{P}/round/7/seeds/dev-a",  # even its own seeds come from the coordinator only
        f"{P}/receipts/dev-a",
        f"{P}/status/dev-b",  # another device's status
        f"{P}/round/7/update/dev-b",  # impersonating another participant
        f"{P}/round/7/sum/dev-b",
        f"{P}/round/7/sum2/dev-b",
        "maskfl/v1/other-fleet/round/7/update/dev-a",
        "anything/else",
    ],
)
def test_device_is_denied_everything_else(broker: Broker, topic: str) -> None:
    dev = broker.device("dev-a")
    assert dev.connect()
    rc = dev.publish(topic)
    assert rc.is_failure and rc.getName() == "Not authorized", (topic, rc)


def test_device_reads_what_it_needs_and_nothing_else(fleet_broker: Broker) -> None:
    coord = fleet_broker.coordinator()
    assert coord.connect()
    readable = [
        f"{P}/round",
        f"{P}/revocations",
        f"{P}/model/mlp/graph",
        f"{P}/model/mlp/latest",
        f"{P}/round/7/sums",
        f"{P}/round/7/seeds/dev-a",
        f"{P}/receipts/dev-a",
    ]
    forbidden = [
        f"{P}/round/7/seeds/dev-b",
        f"{P}/receipts/dev-b",
        f"{P}/status/dev-b",
        f"{P}/round/7/update/dev-b",
    ]
    # Retained copies arrive at subscribe time; live ones after. Check both.
    for topic in readable + forbidden:
        assert not coord.publish(topic, f"retained {topic}".encode(), retain=True).is_failure
    dev = fleet_broker.device("dev-a")
    assert dev.connect()
    # The broker grants a forbidden subscription and then filters deliveries (mosquitto 2).
    for topic in [*forbidden, f"{P}/#"]:
        dev.subscribe(topic)
    for topic in T.agent_filters("dev-a"):  # what the agent really subscribes to
        dev.subscribe(topic)
    assert not coord.publish(f"{P}/receipts/dev-a", b"marker 1").is_failure
    got = dev.receive_until(b"marker 1")
    for topic in forbidden + readable:
        assert not coord.publish(topic, f"live {topic}".encode()).is_failure
    assert not coord.publish(f"{P}/receipts/dev-a", b"marker 2").is_failure
    got += dev.receive_until(b"marker 2")
    text = {payload.decode() for payload in got}
    for topic in readable:
        assert f"live {topic}" in text
    for topic in forbidden:
        assert f"retained {topic}" not in text
        assert f"live {topic}" not in text


def test_coordinator_reads_participant_topics(broker: Broker) -> None:
    coord = broker.coordinator()
    assert coord.connect()
    for topic in T.coordinator_filters():
        coord.subscribe(topic)
    dev = broker.device("dev-b")
    assert dev.connect()
    assert dev.allowed(f"{P}/round/3/update/dev-b")
    assert dev.allowed(f"{P}/status/dev-b")
    assert dev.publish(f"{P}/status/dev-b", b"marker").getName() == "Success"
    assert coord.receive_until(b"marker") == [b"x", b"x", b"marker"]


def test_unknown_certificate_cannot_connect(broker: Broker, tmp_path: Path) -> None:
    # A certificate named like a real device but from another fleet's TLS CA.
    other = tmp_path / "other"
    provision(other, "init", "--fleet", "demo")
    provision(other, "add-device", "dev-a")
    bundle = other / "devices" / "dev-a"
    intruder = broker.client(
        "dev-a",
        broker.root / "devices" / "dev-a" / "broker-ca.pem",
        bundle / "device-tls.pem",
        bundle / "device-tls.key",
    )
    assert not intruder.connect()
    # And one with no client certificate at all.
    ca = broker.root / "devices" / "dev-a" / "broker-ca.pem"
    assert not broker.client("dev-a", ca, None, None).connect()


def test_revoked_device_is_shut_out_and_others_are_untouched(fleet_broker: Broker) -> None:
    root = fleet_broker.root
    before = {
        name: (root / "devices" / name / "device-tls.pem").read_bytes()
        for name in ("dev-a", "dev-b")
    }
    dev_a = fleet_broker.device("dev-a")
    dev_c = fleet_broker.device("dev-c")
    assert dev_a.connect() and dev_c.connect()
    assert dev_c.allowed(f"{P}/round/1/update/dev-c")

    provision(root, "revoke", "dev-c")
    fleet_broker.reload()

    # Its ACL entries are gone: the connection it still holds can do nothing.
    assert dev_c.publish(f"{P}/round/1/update/dev-c").is_failure
    # Its TLS certificate is in the CRL: it cannot connect again.
    assert not fleet_broker.device("dev-c").connect()
    # Every other device carries on, with its files untouched.
    assert dev_a.allowed(f"{P}/round/1/update/dev-a")
    fresh_b = fleet_broker.device("dev-b")
    assert fresh_b.connect() and fresh_b.allowed(f"{P}/round/1/update/dev-b")
    for name, pem in before.items():
        assert (root / "devices" / name / "device-tls.pem").read_bytes() == pem
    acl = (root / "broker" / "acl").read_text()
    assert "dev-c" not in acl and "user dev-a" in acl

    # Even if it still reached the broker, the coordinator rejects its enrollment.
    coordinator = root / "coordinator"
    ca = public_key_from_pem((coordinator / "ca.pub").read_bytes())
    revocations = RevocationList.from_bytes((coordinator / "revocations.bin").read_bytes())
    revocations.verify(ca_public_key=ca, fleet="demo")
    cert = Certificate.from_bytes((root / "devices" / "dev-c" / "device.cert").read_bytes())
    now = dt.datetime.now(dt.UTC).timestamp()
    with pytest.raises(CertificateError) as caught:
        verify_certificate(cert, ca_public_key=ca, fleet="demo", now=now, revocations=revocations)
    assert caught.value.reason is Reason.REVOKED
    cert_a = Certificate.from_bytes((root / "devices" / "dev-a" / "device.cert").read_bytes())
    verify_certificate(cert_a, ca_public_key=ca, fleet="demo", now=now, revocations=revocations)


def test_rotated_device_connects_with_new_files_only(fleet_broker: Broker, tmp_path: Path) -> None:
    root = fleet_broker.root
    old = tmp_path / "old-dev-b"
    old.mkdir()
    for name in ("broker-ca.pem", "device-tls.pem", "device-tls.key"):
        (old / name).write_bytes((root / "devices" / "dev-b" / name).read_bytes())
    provision(root, "rotate", "dev-b")
    fleet_broker.reload()
    assert not fleet_broker.device("dev-b", bundle=old).connect()
    new = fleet_broker.device("dev-b")
    assert new.connect() and new.allowed(f"{P}/round/2/update/dev-b")
    tls_cert = _tls.cert_from_pem((root / "devices" / "dev-b" / "device-tls.pem").read_bytes())
    assert (
        tls_cert.serial_number
        != _tls.cert_from_pem((old / "device-tls.pem").read_bytes()).serial_number
    )


def test_rotated_coordinator_keeps_its_rights(fleet_broker: Broker) -> None:
    provision(fleet_broker.root, "rotate", "coordinator")
    fleet_broker.reload()
    coord = fleet_broker.coordinator()
    assert coord.connect()
    assert coord.allowed(f"{P}/round")


def test_development_listener_is_plain_and_loopback_only_when_asked(tmp_path: Path) -> None:
    dev_port = free_port()
    broker = start_fleet_broker(tmp_path / "fleet", tmp_path, [], ["--dev-port", str(dev_port)])
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=mqtt.MQTTv5)
    try:
        conf = (tmp_path / "fleet" / "broker" / "mosquitto.conf").read_text()
        assert f"\nlistener {dev_port} 127.0.0.1\n" in conf
        # start() waited for the TLS listener; mosquitto opens the second one just after.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", dev_port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the development listener never opened"
                time.sleep(0.02)  # inherent: a port another process opens
        assert plain.connect("127.0.0.1", dev_port) == mqtt.MQTT_ERR_SUCCESS
        plain.loop_start()
        info = plain.publish(f"{P}/round", b"anything goes here", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        # The TLS listener still wants a client certificate.
        ca = tmp_path / "fleet" / "coordinator" / "broker-ca.pem"
        assert not broker.client("nobody", ca, None, None).connect()
        # The documented limit (threat model, operations guide): client ids are not
        # bound here, so a plain client takes over the coordinator's TLS session.
        coordinator = broker.coordinator()
        assert coordinator.connect()
        intruder = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="coordinator", protocol=mqtt.MQTTv5
        )
        assert intruder.connect("127.0.0.1", dev_port) == mqtt.MQTT_ERR_SUCCESS
        intruder.loop_start()
        try:
            assert coordinator.disconnected.wait(10), "the coordinator kept its link"
        finally:
            intruder.disconnect()
            intruder.loop_stop()
    finally:
        plain.disconnect()
        plain.loop_stop()
        for client in broker.clients:
            client.close()
        broker.mosquitto.stop()
