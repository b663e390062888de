"""MqttTransport against real mosquitto brokers started by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from maskfl.protocol.errors import LocalProtocolError, TransportError
from maskfl.testing.broker import Mosquitto, free_port
from maskfl.testing.tls import TestPki
from maskfl.transport import (
    LastWill,
    LinkEvent,
    LinkState,
    Message,
    MqttConfig,
    MqttTransport,
    NotConnectedError,
    PayloadTooLargeError,
    RefusedError,
    TlsConfig,
    TransportClosedError,
    mosquitto_passwd_line,
    publish_packet_size,
)

pytestmark = pytest.mark.broker


def config(broker: Mosquitto, **overrides: Any) -> MqttConfig:
    base: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "connect_timeout_s": 5.0,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
    }
    base.update(overrides)
    return MqttConfig(**base)


async def recv(transport: MqttTransport) -> Message:
    async with asyncio.timeout(10):
        return await transport.receive()


async def recv_until(transport: MqttTransport, topic: str) -> list[Message]:
    """Messages up to and including the first one on ``topic`` (a marker)."""
    got = []
    while True:
        message = await recv(transport)
        got.append(message)
        if message.topic == topic:
            return got


class Events:
    """Records link events; lets a test await a state without sleeping."""

    def __init__(self, transport: MqttTransport) -> None:
        self.seen: list[LinkEvent] = []
        self._changed = asyncio.Event()
        transport.add_listener(self._on_event)

    def _on_event(self, event: LinkEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    async def wait_for(self, state: LinkState, count: int = 1) -> None:
        async with asyncio.timeout(20):
            while sum(e.state is state for e in self.seen) < count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def pair(mosquitto: Mosquitto) -> AsyncIterator[tuple[MqttTransport, MqttTransport]]:
    async with (
        MqttTransport(config(mosquitto, client_id="pub")) as pub,
        MqttTransport(config(mosquitto, client_id="sub")) as sub,
    ):
        yield pub, sub


async def test_publish_subscribe_wildcards_and_qos(
    pair: tuple[MqttTransport, MqttTransport],
) -> None:
    pub, sub = pair
    assert await sub.subscribe(["r/+/sum/+", "m/#"]) == [1, 1]
    assert await sub.subscribe("end", qos=0) == [0]
    await pub.publish("r/7/sum/dev1", b"s1")
    await pub.publish("r/7/sum", b"not matched")
    await pub.publish("m", b"m0", qos=0)
    await pub.publish("m/a/b", b"m1")
    await pub.publish("end", b"")
    got = await recv_until(sub, "end")
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("r/7/sum/dev1", b"s1", 1),
        ("m", b"m0", 0),
        ("m/a/b", b"m1", 1),
        ("end", b"", 0),
    ]
    assert all(not m.retain and not m.dup for m in got)
    assert pub.stats.published == 5
    assert sub.stats.received == 4


async def test_retained_messages(pair: tuple[MqttTransport, MqttTransport]) -> None:
    pub, sub = pair
    await pub.publish("model/latest", b"v1", retain=True)
    await pub.publish("model/latest", b"v2", retain=True)
    await pub.publish("model/gone", b"x", retain=True)
    await pub.publish("model/gone", b"", retain=True)  # an empty retained payload clears it
    await sub.subscribe(["model/#", "end"])
    await pub.publish("model/latest", b"v3")
    await pub.publish("end", b"")
    got = await recv_until(sub, "end")
    assert [(m.topic, m.payload, m.retain) for m in got] == [
        ("model/latest", b"v2", True),  # retained copy, sent on subscribe
        ("model/latest", b"v3", False),  # live delivery
        ("end", b"", False),
    ]


async def test_a_subscription_without_retained_messages_gets_only_live_ones(
    pair: tuple[MqttTransport, MqttTransport],
) -> None:
    """retained=False (MQTT 5 retain handling 2): no retained copy on subscribing, nor on
    subscribing again after an unsubscribe (the coordinator's status topics each round)."""
    pub, sub = pair
    await pub.publish("status/a", b"kept", retain=True)
    for live in (b"live1", b"live2"):
        await sub.subscribe(["status/+", "end"], qos=0, retained=False)
        await pub.publish("status/b", live)
        await pub.publish("end", b"")
        got = await recv_until(sub, "end")
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            ("status/b", live, False),
            ("end", b"", False),
        ]
        await sub.unsubscribe(["status/+", "end"])
    await sub.subscribe("mark", qos=0)
    await pub.publish("status/b", b"after the unsubscribe")
    await pub.publish("mark", b"")
    assert [m.topic for m in await recv_until(sub, "mark")] == ["mark"]


async def test_large_publishes_arrive_intact(mosquitto: Mosquitto) -> None:
    """Payloads from 1 MiB on are written from a memoryview (paho copied the unsent rest of
    the packet at every partial write): every byte must still arrive, in order."""
    big = bytes(range(256)) * (24 * 1024 + 7)  # 6 MB, not a multiple of any buffer
    async with (
        MqttTransport(config(mosquitto, client_id="pub")) as pub,
        MqttTransport(config(mosquitto, client_id="sub", max_incoming_payload=8 << 20)) as sub,
    ):
        await sub.subscribe(["big/#", "end"])
        await asyncio.gather(
            pub.publish("big/a", big, retain=True), pub.publish("big/b", big[::-1])
        )
        await pub.publish("end", b"")
        got = await recv_until(sub, "end")
    assert sorted((m.topic, m.payload) for m in got[:-1]) == [("big/a", big), ("big/b", big[::-1])]


async def test_manual_ack_redelivers_only_unacked_messages(mosquitto: Mosquitto) -> None:
    coordinator = config(
        mosquitto,
        client_id="coordinator",
        clean_start=False,
        session_expiry_s=300,
        manual_ack=True,
    )
    async with MqttTransport(config(mosquitto, client_id="dev")) as dev:
        async with MqttTransport(coordinator) as coord:
            await coord.subscribe("up/#")
            await dev.publish("up/1", b"one")
            await dev.publish("up/2", b"two")
            first, second = await recv(coord), await recv(coord)
            assert (first.payload, second.payload) == (b"one", b"two")
            coord.ack(first)
            coord.ack(first)  # a second ack is a no-op
        # Offline: the persistent session queues new messages too.
        await dev.publish("up/3", b"three")
        async with MqttTransport(coordinator) as coord:
            again = await recv(coord)
            assert (again.payload, again.dup) == (b"two", True)
            assert (await recv(coord)).payload == b"three"
            coord.ack(again)
            assert coord.stats.redelivered >= 1  # b"three" too if it raced our DISCONNECT
        async with MqttTransport(coordinator) as coord:
            # b"three" was never acked: it comes back, b"one" and b"two" do not.
            rest = await recv(coord)
            assert (rest.payload, rest.dup) == (b"three", True)
            coord.ack(rest)
            await dev.publish("up/end", b"")
            assert (await recv(coord)).topic == "up/end"


@contextlib.asynccontextmanager
async def coordinator_and_device(
    broker: Mosquitto,
) -> AsyncIterator[tuple[MqttTransport, MqttTransport]]:
    """A coordinator-like client (persistent session, manual acks) subscribed to ``up/#``
    and a device, both connected to ``broker``."""
    coordinator = config(
        broker, client_id="coord", clean_start=False, session_expiry_s=300, manual_ack=True
    )
    async with (
        MqttTransport(coordinator) as coord,
        MqttTransport(config(broker, client_id="dev")) as dev,
    ):
        await coord.subscribe("up/#")
        yield coord, dev


async def test_broker_restart_with_persistence_redelivers_and_ignores_stale_acks(
    tmp_path: Path,
) -> None:
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        async with coordinator_and_device(broker) as (coord, dev):
            events = Events(coord)
            await dev.publish("up/1", b"one")
            stale = await recv(coord)
            broker.restart()  # graceful: the session and its inflight message are saved
            await events.wait_for(LinkState.CONNECTED)
            assert events.seen[0].state is LinkState.DISCONNECTED
            assert events.seen[-1].session_present
            fresh = await recv(coord)
            assert (fresh.payload, fresh.dup) == (b"one", True)
            assert fresh.link == stale.link + 1
            coord.ack(stale)  # from the old link: ignored, must not ack another message
            coord.ack(fresh)
        async with coordinator_and_device(broker) as (coord, dev):
            await dev.publish("up/end", b"")
            assert (await recv(coord)).topic == "up/end"  # b"one" was acked: not redelivered


async def test_broker_kill_mid_stream_reconnects_and_keeps_working(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        async with (
            MqttTransport(config(broker, client_id="pub")) as pub,
            MqttTransport(config(broker, client_id="sub")) as sub,
        ):
            pub_events, sub_events = Events(pub), Events(sub)
            await sub.subscribe("data/#")
            for i in range(20):
                await pub.publish(f"data/{i}", b"x")
            assert [(await recv(sub)).topic for _ in range(20)] == [f"data/{i}" for i in range(20)]

            broker.kill()
            await pub_events.wait_for(LinkState.DISCONNECTED)
            await sub_events.wait_for(LinkState.DISCONNECTED)
            assert not pub.is_connected
            with pytest.raises(NotConnectedError):
                await pub.publish("data/q0", b"lost", qos=0)
            # A QoS 1 publish made while the broker is down waits, then completes.
            pending = asyncio.create_task(pub.publish("status/pub", b"during outage"))
            await asyncio.sleep(0.2)  # inherent: a negative check, it must NOT complete meanwhile
            assert not pending.done()

            broker.start()
            await pub_events.wait_for(LinkState.CONNECTED)
            await sub_events.wait_for(LinkState.CONNECTED)  # resubscribed by then
            async with asyncio.timeout(10):
                await pending
            for i in range(20, 40):
                await pub.publish(f"data/{i}", b"x")
            topics = [(await recv(sub)).topic for _ in range(20)]
            assert topics == [f"data/{i}" for i in range(20, 40)]
            assert pub.stats.disconnects == 1 and pub.stats.connects == 2
            assert not sub_events.seen[-1].session_present
    finally:
        broker.stop()


async def test_publish_during_an_outage_reaches_a_persistent_session(tmp_path: Path) -> None:
    """At least once, end to end: the device's publish waits out the outage, the
    broker restarts with the coordinator's session, the coordinator gets it."""
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        async with coordinator_and_device(broker) as (coord, dev):
            dev_events, coord_events = Events(dev), Events(coord)
            broker.stop()  # graceful: mosquitto saves the session
            await dev_events.wait_for(LinkState.DISCONNECTED)
            pending = asyncio.create_task(dev.publish("up/late", b"sent while down"))
            broker.start()
            async with asyncio.timeout(20):
                await pending
            await coord_events.wait_for(LinkState.CONNECTED)
            got = await recv(coord)
            assert (got.topic, got.payload) == ("up/late", b"sent while down")
            coord.ack(got)
            assert coord_events.seen[-1].session_present


async def test_outgoing_queue_is_bounded_while_the_link_is_down(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        # No reconnect attempt (its thread holds publishes back) during the test's first steps.
        slow = config(
            broker, client_id="c", max_queued_publishes=2, reconnect_min_s=2.0, reconnect_max_s=2.0
        )
        async with MqttTransport(slow) as t:
            events = Events(t)
            broker.kill()
            await events.wait_for(LinkState.DISCONNECTED)
            waiting = [asyncio.create_task(t.publish("a", b"")) for _ in range(2)]
            await asyncio.sleep(0)  # one loop turn: both publishes are queued, nothing waits
            with pytest.raises(TransportError, match="already wait"):
                await t.publish("a", b"third")
            broker.start()
            async with asyncio.timeout(20):
                await asyncio.gather(*waiting)
    finally:
        broker.stop()


async def test_oversize_publish_is_refused_locally_at_the_exact_limit(tmp_path: Path) -> None:
    limit = 2000
    broker = Mosquitto(
        tmp_path / "broker",
        config=["listener {port} 127.0.0.1", "allow_anonymous true", f"max_packet_size {limit}"],
    ).start()
    try:
        async with MqttTransport(config(broker, client_id="c")) as t:
            assert t.max_packet_size == limit
            await t.subscribe("big")
            fits = limit - publish_packet_size("big", 0, 1)
            while publish_packet_size("big", fits, 1) > limit:  # the length varint grows
                fits -= 1
            assert publish_packet_size("big", fits, 1) == limit
            await t.publish("big", bytes(fits))  # exactly the limit: accepted and delivered
            assert len((await recv(t)).payload) == fits
            with pytest.raises(PayloadTooLargeError) as info:
                await t.publish("big", bytes(fits + 1))
            assert (info.value.size, info.value.limit) == (limit + 1, limit)
            assert "refused locally" in str(info.value)
            await t.publish("big", b"still working")
            assert (await recv(t)).payload == b"still working"
            assert t.stats.disconnects == 0
    finally:
        broker.stop()


async def test_oversize_incoming_messages_are_dropped_and_counted(mosquitto: Mosquitto) -> None:
    sub_cfg = config(mosquitto, client_id="sub", manual_ack=True, max_incoming_payload=1000)
    async with (
        MqttTransport(config(mosquitto, client_id="pub")) as pub,
        MqttTransport(sub_cfg) as sub,
    ):
        await sub.subscribe("in/#")
        await pub.publish("in/a", bytes(1500))  # over our limit, within the announced packet size
        await pub.publish("in/b", bytes(300_000))  # beyond our announced maximum: broker drops it
        await pub.publish("in/c", bytes(1000))
        got = await recv(sub)
        assert (got.topic, len(got.payload)) == ("in/c", 1000)
        sub.ack(got)
        assert sub.stats.dropped_oversize == 1
    # The dropped QoS 1 message was acked: a persistent session would not resend it.


async def test_full_queue_applies_backpressure_without_loss(mosquitto: Mosquitto) -> None:
    sub_cfg = config(mosquitto, client_id="sub", incoming_queue_size=4, receive_maximum=100)
    async with (
        MqttTransport(config(mosquitto, client_id="pub", max_inflight=50)) as pub,
        MqttTransport(sub_cfg) as sub,
    ):
        await sub.subscribe("q/#")
        await asyncio.gather(*(pub.publish(f"q/{i}", bytes(100)) for i in range(60)))
        await pub.publish("q/end", b"")
        got = await recv_until(sub, "q/end")
        assert [m.topic for m in got] == [f"q/{i}" for i in range(60)] + ["q/end"]
        assert sub.stats.backpressure_pauses >= 1
        assert sub.stats.dropped_queue_full == 0


async def test_tapped_topics_skip_the_queue_and_are_acked(mosquitto: Mosquitto) -> None:
    """A flood on a tapped prefix neither fills the queue nor waits for the consumer."""
    sub_cfg = config(
        mosquitto,
        client_id="tapsub",
        incoming_queue_size=4,
        manual_ack=True,
        clean_start=False,
        session_expiry_s=300,
    )
    tapped: list[str] = []
    async with MqttTransport(config(mosquitto, client_id="tappub", max_inflight=50)) as pub:
        async with MqttTransport(sub_cfg) as sub:
            sub.tap("s/", lambda m: tapped.append(m.topic))
            await sub.subscribe(["q/#", "s/+"], qos=1)
            # 200 tapped messages while nobody reads the queue: they must all arrive.
            await asyncio.gather(*(pub.publish(f"s/{i}", b"hb") for i in range(200)))
            await pub.publish("q/1", b"round")
            first = await recv(sub)
            assert first.topic == "q/1"
            sub.ack(first)
            assert tapped == [f"s/{i}" for i in range(200)]
            assert sub.stats.backpressure_pauses == 0
        # Same session again: nothing tapped comes back (each was acked on arrival).
        async with MqttTransport(sub_cfg) as again:
            again.tap("s/", lambda m: tapped.append(m.topic))
            await pub.publish("q/2", b"round")
            second = await recv(again)
            assert second.topic == "q/2" and not second.dup
            assert len(tapped) == 200


async def test_publish_after_disconnect_and_pending_publish_on_close(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    t = MqttTransport(config(broker, client_id="c"))
    with pytest.raises(LocalProtocolError):
        await t.publish("a", b"")
    await t.connect()
    events = Events(t)
    broker.kill()
    await events.wait_for(LinkState.DISCONNECTED)
    pending = asyncio.create_task(t.publish("a", b"never acked"))
    await asyncio.sleep(0.1)  # inherent: the publish must be pending (it can never complete)
    await t.disconnect()
    with pytest.raises(TransportClosedError):
        await pending
    with pytest.raises(TransportClosedError):
        await t.publish("a", b"")
    with pytest.raises(TransportClosedError):
        await t.receive()
    assert [m async for m in t.messages()] == []
    assert events.seen[-1].state is LinkState.CLOSED
    await t.disconnect()  # idempotent


async def test_connection_refused_names_the_broker() -> None:
    port = free_port()
    t = MqttTransport(MqttConfig(port=port, connect_timeout_s=2.0))
    with pytest.raises(TransportError) as info:
        await t.connect()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert t.state is LinkState.NEW  # connect() may be tried again


@pytest.mark.parametrize("tls", [False, True])
async def test_a_silent_server_times_out_without_leaking_sockets(tls: bool) -> None:
    # TCP accepts (the listen backlog) but nothing answers: no TLS handshake, no CONNACK.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        cfg = MqttConfig(port=port, connect_timeout_s=0.5, tls=TlsConfig() if tls else None)
        with pytest.raises(TransportError) as info:
            await MqttTransport(cfg).connect()
        assert f"127.0.0.1:{port}" in str(info.value)
        assert isinstance(info.value.__cause__, TimeoutError)
        # warnings are errors: a socket left to the garbage collector fails the test
        gc.collect()


async def test_last_will_is_published_when_the_link_dies(mosquitto: Mosquitto) -> None:
    will = LastWill("status/dev", b"offline", qos=1, retain=True)
    async with (
        MqttTransport(config(mosquitto, client_id="watcher")) as watcher,
        MqttTransport(config(mosquitto, client_id="dev", will=will, keepalive_s=5)) as dev,
    ):
        await watcher.subscribe("status/#")
        events = Events(dev)
        # Kill the TCP connection under paho, as a crash or a pulled cable would.
        sock = dev._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        got = await recv(watcher)
        assert (got.topic, got.payload) == ("status/dev", b"offline")
        await events.wait_for(LinkState.CONNECTED)  # and the device comes back by itself
        await dev.publish("status/dev", b"online", retain=True)
        assert (await recv(watcher)).payload == b"online"


# --------------------------------------------------------------- auth and ACL


@pytest.fixture
def auth_broker(tmp_path: Path) -> Any:
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "\n".join(
            [
                mosquitto_passwd_line("coordinator", "c-pass"),
                mosquitto_passwd_line("dev1", "d1-pass"),
            ]
        )
        + "\n"
    )
    acl = tmp_path / "acl"
    acl.write_text(
        "user coordinator\ntopic readwrite #\n\n"
        "pattern write fl/round/+/update/%u\npattern read fl/model/#\n"
    )
    broker = Mosquitto(
        tmp_path / "broker",
        config=[
            "listener {port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
        ],
    ).start()
    yield broker
    broker.stop()


def password_broker(workdir: Path, *, bind_client_id: bool) -> Mosquitto:
    """A password-login listener as docs/operations.md describes it for password fleets."""
    passwd = workdir / "passwd"
    passwd.write_text(
        mosquitto_passwd_line("coordinator", "c-pass")
        + "\n"
        + mosquitto_passwd_line("dev1", "d1-pass")
        + "\n"
    )
    lines = ["listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}"]
    if bind_client_id:
        lines.append("use_username_as_clientid true")
    return Mosquitto(workdir / "broker", config=lines).start()


@pytest.mark.parametrize("bind_client_id", [True, False])
async def test_password_login_cannot_take_over_the_coordinators_session(
    tmp_path: Path, bind_client_id: bool
) -> None:
    """With use_username_as_clientid, dev1 asking for client id "coordinator" is filed
    as "dev1": the coordinator keeps its link and its persistent session. Without the
    option (the control case) the same login takes the coordinator's link over."""
    broker = password_broker(tmp_path, bind_client_id=bind_client_id)
    try:
        coordinator = MqttTransport(
            config(
                broker,
                client_id="coordinator",
                username="coordinator",
                password="c-pass",
                clean_start=False,
                session_expiry_s=600,
                reconnect_min_s=5.0,
                reconnect_max_s=5.0,
            )
        )
        events = Events(coordinator)
        intruder = MqttTransport(
            config(broker, client_id="coordinator", username="dev1", password="d1-pass")
        )
        async with coordinator:
            await coordinator.subscribe("fl/#")
            async with intruder:
                await intruder.publish("fl/hello", b"from dev1")
                if bind_client_id:
                    got = await recv(coordinator)
                    assert got.payload == b"from dev1"
                    assert coordinator.stats.disconnects == 0
                else:
                    # mosquitto 2.0.11 closes the old link without a DISCONNECT packet.
                    await events.wait_for(LinkState.DISCONNECTED)
    finally:
        broker.stop()
    log = broker.log()
    assert ("as dev1 (p5" in log) is bind_client_id, log


async def test_password_file_from_our_hash_generator_authenticates(auth_broker: Mosquitto) -> None:
    async with (
        MqttTransport(
            config(auth_broker, client_id="c", username="coordinator", password="c-pass")
        ) as c,
        MqttTransport(config(auth_broker, client_id="d", username="dev1", password="d1-pass")) as d,
    ):
        await c.subscribe("fl/#")
        await d.publish("fl/round/1/update/dev1", b"mine")
        got = await recv(c)
        assert (got.topic, got.payload) == ("fl/round/1/update/dev1", b"mine")


async def test_acl_denial_raises_on_publish(auth_broker: Mosquitto) -> None:
    async with MqttTransport(
        config(auth_broker, client_id="d", username="dev1", password="d1-pass")
    ) as d:
        with pytest.raises(RefusedError) as info:
            await d.publish("fl/round/1/update/dev2", b"impersonation")
        assert info.value.packet == "PUBACK"
        assert info.value.reason_code == 135  # Not authorized
        assert d.stats.publish_refused == 1
        await d.publish("fl/round/1/update/dev1", b"own topic still works")


@pytest.mark.parametrize(("user", "password"), [("dev1", "wrong"), (None, None)])
async def test_bad_credentials_are_refused_at_connect(
    auth_broker: Mosquitto, user: str | None, password: str | None
) -> None:
    t = MqttTransport(config(auth_broker, client_id="d", username=user, password=password))
    with pytest.raises(RefusedError) as info:
        await t.connect()
    assert info.value.packet == "CONNACK"
    assert info.value.reason_code in (134, 135)  # bad user name or password / not authorized
    assert auth_broker.host in str(info.value)


# ------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


def tls_broker(tmp_path: Path, pki: TestPki, **kwargs: Any) -> Mosquitto:
    hosts = kwargs.pop("hosts", ("127.0.0.1", "localhost"))
    server = pki.server_cert(f"server-{len(hosts)}", hosts)
    return Mosquitto(tmp_path / "broker", config=pki.mosquitto_tls_listener(server, **kwargs))


async def test_tls_round_trip(tmp_path: Path, pki: TestPki) -> None:
    with tls_broker(tmp_path, pki) as broker:
        tls = TlsConfig(ca_file=pki.ca.cert)
        async with MqttTransport(config(broker, client_id="t", tls=tls)) as t:
            await t.subscribe("s")
            await t.publish("s", bytes(100_000))
            assert len((await recv(t)).payload) == 100_000
            sock = t._client.socket()
            assert isinstance(sock, ssl.SSLSocket)


async def test_tls_backpressure_drains_bytes_buffered_in_the_tls_layer(
    tmp_path: Path, pki: TestPki
) -> None:
    # With TLS, decrypted bytes can wait in the SSL object where the selector
    # cannot see them; resuming after a pause must still read them.
    with tls_broker(tmp_path, pki) as broker:
        tls = TlsConfig(ca_file=pki.ca.cert)
        async with (
            MqttTransport(config(broker, client_id="p", tls=tls)) as pub,
            MqttTransport(config(broker, client_id="s", tls=tls, incoming_queue_size=2)) as sub,
        ):
            await sub.subscribe("t/#")
            await asyncio.gather(*(pub.publish(f"t/{i}", bytes(5000)) for i in range(40)))
            await pub.publish("t/end", b"")
            got = await recv_until(sub, "t/end")
            assert len(got) == 41
            assert sub.stats.backpressure_pauses >= 1


async def test_tls_with_the_wrong_ca_fails_verification(tmp_path: Path, pki: TestPki) -> None:
    other = TestPki(tmp_path / "other")
    with tls_broker(tmp_path, pki) as broker:
        t = MqttTransport(config(broker, client_id="t", tls=TlsConfig(ca_file=other.ca.cert)))
        with pytest.raises(TransportError) as info:
            await t.connect()
        assert f"{broker.host}:{broker.port}" in str(info.value)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_host_name_is_checked_unless_insecure(tmp_path: Path, pki: TestPki) -> None:
    with tls_broker(tmp_path, pki, hosts=("broker.example",)) as broker:
        t = MqttTransport(config(broker, client_id="t", tls=TlsConfig(ca_file=pki.ca.cert)))
        with pytest.raises(TransportError) as info:
            await t.connect()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        insecure = TlsConfig(ca_file=pki.ca.cert, insecure=True)
        async with MqttTransport(config(broker, client_id="t", tls=insecure)) as t2:
            assert t2.is_connected


async def test_mutual_tls_identity(tmp_path: Path, pki: TestPki) -> None:
    # The certificate's CN is the MQTT user name: the ACL confines dev7 to its own topic.
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite dev/%u\n")
    server = pki.server_cert("server-mtls")
    lines = [*pki.mosquitto_tls_listener(server, require_certificate=True), f"acl_file {acl}"]
    with Mosquitto(tmp_path / "broker", config=lines) as broker:
        client = pki.client_cert("dev7")
        tls = TlsConfig(ca_file=pki.ca.cert, cert_file=client.cert, key_file=client.key)
        async with MqttTransport(config(broker, client_id="dev7", tls=tls)) as t:
            await t.subscribe("dev/dev7")
            await t.publish("dev/dev7", b"over mTLS")
            assert (await recv(t)).payload == b"over mTLS"
            with pytest.raises(RefusedError):
                await t.publish("dev/dev8", b"not mine")
        without_cert = MqttTransport(config(broker, tls=TlsConfig(ca_file=pki.ca.cert)))
        with pytest.raises(TransportError) as info:
            await without_cert.connect()
        assert str(broker.port) in str(info.value)


# ------------------------------------------------------ the twin, side by side

Scenario = Callable[[Any, Any], Awaitable[list[tuple[str, bytes, int, bool]]]]


async def basic_scenario(pub: Any, sub: Any) -> list[tuple[str, bytes, int, bool]]:
    await pub.publish("fl/model/latest", b"v1", retain=True)
    await sub.subscribe(["fl/model/#", "fl/round/+/sum/+", "end"])
    await sub.subscribe("fl/q0", qos=0)
    await pub.publish("fl/round/3/sum/d1", b"s")
    await pub.publish("fl/round/3/sum", b"no")
    await pub.publish("fl/q0", b"downgraded", qos=1)
    await pub.publish("fl/model/latest", b"v2")
    await pub.publish("end", b"")
    got = []
    while True:
        async with asyncio.timeout(10):
            message = await sub.receive()
        got.append((message.topic, message.payload, message.qos, message.retain))
        if message.topic == "end":
            return got


async def test_memory_twin_behaves_like_mosquitto(
    pair: tuple[MqttTransport, MqttTransport],
) -> None:
    from maskfl.transport import MemoryBroker

    real = await basic_scenario(*pair)
    memory = MemoryBroker()
    async with memory.transport("pub") as pub, memory.transport("sub") as sub:
        twin = await basic_scenario(pub, sub)
    assert twin == real
    assert real[0] == ("fl/model/latest", b"v1", 1, True)
