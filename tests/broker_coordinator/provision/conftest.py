"""Fleets made with the real CLI, and mTLS MQTT clients built from their bundles."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from maskfl.broker_coordinator.provision.cli import main
from maskfl.testing.broker import Mosquitto, free_port

WAIT_S = 10.0


def provision(root: Path, *args: str) -> None:
    """Run ``maskfl-provision --dir root ARGS``; the test fails on a non-zero exit."""
    assert main(["--dir", str(root), *args]) == 0


class Broker:
    """A fleet directory and a mosquitto started with its generated mosquitto.conf."""

    def __init__(self, root: Path, mosquitto: Mosquitto) -> None:
        self.root = root
        self.mosquitto = mosquitto
        self.clients: list[TlsClient] = []

    @property
    def port(self) -> int:
        return self.mosquitto.port

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads the ACL and the CRL; returns once it logged the reload."""
        assert self.mosquitto.proc is not None
        before = self.mosquitto.log().count("Reloading config")
        self.mosquitto.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while self.mosquitto.log().count("Reloading config") == before:
            assert time.monotonic() < deadline, "mosquitto did not reload"
            time.sleep(0.02)  # inherent: mosquitto's log file, written by another process

    def device(self, name: str, *, bundle: Path | None = None) -> TlsClient:
        folder = bundle or self.root / "devices" / name
        return self.client(
            name, folder / "broker-ca.pem", folder / "device-tls.pem", folder / "device-tls.key"
        )

    def observer(self, name: str) -> TlsClient:
        folder = self.root / "observers" / name
        return self.client(
            name, folder / "broker-ca.pem", folder / "observer-tls.pem", folder / "observer-tls.key"
        )

    def coordinator(self) -> TlsClient:
        folder = self.root / "coordinator"
        return self.client(
            "coordinator",
            folder / "broker-ca.pem",
            folder / "coordinator-tls.pem",
            folder / "coordinator-tls.key",
        )

    def client(self, client_id: str, ca: Path, cert: Path | None, key: Path | None) -> TlsClient:
        """A client with any files (the tests' intruders use this)."""
        client = TlsClient(client_id, self.port, ca, cert, key)
        self.clients.append(client)
        return client


class TlsClient:
    """A paho MQTT 5 client over mTLS (tests only: package code goes through transport/)."""

    def __init__(
        self, client_id: str, port: int, ca: Path, cert: Path | None, key: Path | None
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(ca),
            certfile=None if cert is None else str(cert),
            keyfile=None if key is None else str(key),
        )
        # mosquitto 2.0.11 closes an MQTT 5 link after refusing a publish on it; paho's
        # loop reconnects (and resends what waits for its PUBACK) after this delay.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=1)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self._started = False

    def _on_connect(
        self, _c: object, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        self._connack = rc
        self.session_present = flags.session_present
        self._connected.set()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if self._connack is None:
            self._connack = rc
        self.disconnect_reason = rc
        self.disconnected.set()
        self._connected.set()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, rcs: list[ReasonCode], _p: object
    ) -> None:
        with self._acked:
            self._acks[mid] = rcs[0]
            self._acked.notify_all()

    def connect(self, *, clean_start: bool = True, session_expiry_s: int = 0) -> bool:
        """True when the broker answered CONNACK success; False for any refusal.

        ``clean_start=False`` with ``session_expiry_s`` > 0 asks to resume a persistent
        session under this client's id (``session_present`` tells whether it did)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry_s:
            props.SessionExpiryInterval = session_expiry_s
        try:
            self.client.connect(
                "localhost", self.port, keepalive=30, clean_start=clean_start, properties=props
            )
        except OSError:
            return False
        self.client.loop_start()
        self._started = True
        if not self._connected.wait(WAIT_S):
            return False
        return (
            self._connack is not None
            and not self._connack.is_failure
            and (self.client.is_connected())
        )

    def _wait_ack(self, mid: int) -> ReasonCode:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, WAIT_S), "no ack"
            return self._acks[mid]

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def allowed(self, topic: str) -> bool:
        return not self.publish(topic).is_failure

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        self._wait_ack(mid)

    def receive_until(self, marker: bytes) -> list[bytes]:
        """Payloads received until ``marker`` arrives (the marker last).

        A broker delivers one publisher's messages to a subscriber in order, so
        whatever was published before the marker and not received was filtered.
        """
        got: list[bytes] = []
        while True:
            payload = self.messages.get(timeout=WAIT_S).payload
            got.append(payload)
            if payload == marker:
                return got

    def close(self) -> None:
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()
            self._started = False


def start_fleet_broker(
    root: Path, workdir: Path, devices: list[str], extra: Sequence[str] = ()
) -> Broker:
    """``init`` (plus ``extra`` options) and ``add-device``, then mosquitto with the conf."""
    port = free_port()
    while str(port) in extra:  # the caller's --dev-port came from free_port() as well
        port = free_port()
    data = workdir / "data"
    data.mkdir(parents=True)
    args = [
        "init",
        "--fleet",
        "demo",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--broker-config-dir",
        str(root / "broker"),
        "--broker-data-dir",
        str(data),
        *extra,
    ]
    if os.geteuid() == 0:
        # mosquitto started as root drops to user "mosquitto", who cannot read tmp files.
        args += ["--broker-user", "root"]
    provision(root, *args)
    for device in devices:
        provision(root, "add-device", device)
    conf = root / "broker" / "mosquitto.conf"
    broker = Mosquitto.from_config(conf, port, log_path=workdir / "mosquitto" / "mosquitto.log")
    broker.start()
    return Broker(root=root, mosquitto=broker)


@contextlib.contextmanager
def running_fleet_broker(workdir: Path, devices: list[str]) -> Iterator[Broker]:
    """:func:`start_fleet_broker` in ``workdir/fleet``; its clients closed and the broker
    stopped afterwards."""
    broker = start_fleet_broker(workdir / "fleet", workdir, devices)
    try:
        yield broker
    finally:
        for client in broker.clients:
            client.close()
        broker.clients.clear()
        broker.mosquitto.stop()


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh fleet (devices dev-a, dev-b, dev-c) behind its own TLS-only mosquitto."""
    with running_fleet_broker(tmp_path, ["dev-a", "dev-b", "dev-c"]) as broker:
        yield broker


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Like fleet_broker, shared by the tests of a module that change nothing."""
    with running_fleet_broker(
        tmp_path_factory.mktemp("shared"), ["dev-a", "dev-b", "dev-c"]
    ) as broker:
        yield broker


@pytest.fixture
def broker(shared_broker: Broker) -> Iterator[Broker]:
    """The shared broker, with this test's clients closed afterwards."""
    yield shared_broker
    for client in shared_broker.clients:
        client.close()
    shared_broker.clients.clear()
