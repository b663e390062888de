"""The in-memory twin: routing, retained messages, acks, link events."""

from __future__ import annotations

import asyncio

import pytest

from maskfl.protocol.errors import LocalProtocolError
from maskfl.transport import (
    LinkEvent,
    LinkState,
    MemoryBroker,
    MemoryTransport,
    Message,
    MqttTransport,
    NotConnectedError,
    PayloadTooLargeError,
    Transport,
    TransportClosedError,
)


async def recv(t: MemoryTransport) -> Message:
    async with asyncio.timeout(5):
        return await t.receive()


def test_both_implementations_satisfy_the_protocol() -> None:
    from maskfl.transport import MqttConfig

    assert isinstance(MemoryBroker().transport(), Transport)
    assert isinstance(MqttTransport(MqttConfig()), Transport)


async def test_routing_retain_and_qos() -> None:
    broker = MemoryBroker()
    async with broker.transport("pub") as pub, broker.transport("sub") as sub:
        await pub.publish("m/latest", b"v1", retain=True)
        assert await sub.subscribe(["m/#", "r/+/sum/+"]) == [1, 1]
        assert await recv(sub) == Message("m/latest", b"v1", qos=1, retain=True, mid=1)
        await pub.publish("r/1/sum/d", b"s", qos=0)
        await pub.publish("r/1/sum", b"unrouted")
        got = await recv(sub)
        assert (got.topic, got.qos, got.retain, got.mid) == ("r/1/sum/d", 0, False, 0)
        await pub.publish("m/latest", b"", retain=True)
        assert "m/latest" not in broker.retained
        assert [m.topic for m in pub.published] == ["m/latest", "r/1/sum/d", "r/1/sum", "m/latest"]


async def test_manual_ack_and_redelivery_after_drop_link() -> None:
    broker = MemoryBroker()
    async with broker.transport("dev") as dev, broker.transport("coord", manual_ack=True) as coord:
        events: list[LinkEvent] = []
        coord.add_listener(events.append)
        await coord.subscribe("up/#")
        await dev.publish("up/1", b"one")
        await dev.publish("up/2", b"two")
        one, two = await recv(coord), await recv(coord)
        coord.ack(one)
        assert coord.unacked == [two]
        coord.drop_link()
        coord.ack(two)  # from the old link: ignored
        again = await recv(coord)
        assert (again.payload, again.dup) == (b"two", True)
        coord.ack(again)
        assert coord.unacked == []
        assert [e.state for e in events] == [LinkState.DISCONNECTED, LinkState.CONNECTED]
        assert events[-1].session_present


async def test_shared_subscription_round_robin() -> None:
    broker = MemoryBroker()
    async with (
        broker.transport("p") as pub,
        broker.transport("a") as a,
        broker.transport("b") as b,
    ):
        await a.subscribe("$share/workers/jobs/#")
        await b.subscribe("$share/workers/jobs/#")
        for i in range(4):
            await pub.publish(f"jobs/{i}", b"")
        assert a.stats.received == b.stats.received == 2


async def test_limits_and_errors() -> None:
    broker = MemoryBroker(max_packet_size=100)
    t = broker.transport("t")
    with pytest.raises(LocalProtocolError):
        await t.publish("a", b"")  # not connected yet
    await t.connect()
    with pytest.raises(PayloadTooLargeError):
        await t.publish("a", bytes(100))
    with pytest.raises(LocalProtocolError):
        await t.publish("a/#", b"")
    with pytest.raises(LocalProtocolError):
        await t.subscribe("a/#/b")
    small = MemoryTransport(broker, "small", queue_size=1)
    await small.connect()
    await small.subscribe("x")
    await t.publish("x", b"1")
    await t.publish("x", b"2")
    assert small.stats.dropped_queue_full == 1
    await t.disconnect()
    with pytest.raises(TransportClosedError):
        await t.publish("a", b"")
    with pytest.raises(TransportClosedError):
        await t.wait_connected()
    assert (await recv(small)).payload == b"1"
    await small.disconnect()
    assert [m async for m in small.messages()] == []


async def test_publish_while_link_is_down_fails() -> None:
    broker = MemoryBroker()
    async with broker.transport("t") as t:
        t._state = LinkState.DISCONNECTED
        with pytest.raises(NotConnectedError):
            await t.publish("a", b"")
