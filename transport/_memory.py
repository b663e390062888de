"""An in-memory broker and transport: the :class:`Transport` twin for unit tests.

Small on purpose: it routes by topic filter (``+``, ``#``, ``$share``), keeps
retained messages, assigns packet ids and tracks acks, so phase logic can be
tested without a network. What it does not model: sessions across processes,
inflight windows, ACLs, QoS 2. Everything about the network is tested against a
real mosquitto instead.

A subscriber's queue is bounded (``queue_size``); the twin cannot apply
backpressure to a publisher in the same task, so a message for a full queue is
dropped, logged and counted in ``stats.dropped_queue_full``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Iterable

from maskfl.protocol.errors import LocalProtocolError

from ._config import MQTT_MAX_PACKET
from ._errors import NotConnectedError, PayloadTooLargeError, TransportClosedError
from ._link import LinkBase
from ._paho import publish_packet_size
from ._topics import split_shared, topic_matches
from ._types import LinkEvent, LinkState, Message

log = logging.getLogger("maskfl.transport.memory")


class MemoryBroker:
    """Routes messages between :class:`MemoryTransport` clients of one test."""

    def __init__(self, *, max_packet_size: int = MQTT_MAX_PACKET) -> None:
        self.max_packet_size = max_packet_size
        self.retained: dict[str, Message] = {}
        self._clients: dict[str, MemoryTransport] = {}
        self._share_turn: dict[str, int] = {}
        self._ids = itertools.count(1)

    def transport(self, client_id: str = "", *, manual_ack: bool = False) -> MemoryTransport:
        """A new client of this broker (not connected yet)."""
        return MemoryTransport(self, client_id or f"mem-{next(self._ids)}", manual_ack=manual_ack)

    def _attach(self, client: MemoryTransport) -> None:
        self._clients[client.client_id] = client

    def _detach(self, client: MemoryTransport) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = Message(topic, payload, qos=qos, retain=True)
            else:
                self.retained.pop(topic, None)
        shared: dict[str, list[tuple[MemoryTransport, int]]] = {}
        for client in list(self._clients.values()):
            best: int | None = None
            for topic_filter, sub_qos in client.subscriptions.items():
                if not topic_matches(topic_filter, topic):
                    continue
                group, _ = split_shared(topic_filter)
                if group is not None:
                    shared.setdefault(f"{group}\x00{topic_filter}", []).append((client, sub_qos))
                else:
                    best = sub_qos if best is None else max(best, sub_qos)
            if best is not None:
                client._deliver(topic, payload, min(qos, best), retain=False, dup=False)
        for key, members in shared.items():
            turn = self._share_turn.get(key, 0)
            client, sub_qos = members[turn % len(members)]
            self._share_turn[key] = turn + 1
            client._deliver(topic, payload, min(qos, sub_qos), retain=False, dup=False)


class MemoryTransport(LinkBase):
    """A :class:`Transport` connected to a :class:`MemoryBroker`.

    ``drop_link()`` simulates a lost connection followed by a reconnect to a
    persistent session: unacked QoS 1 messages come back with ``dup`` set.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        manual_ack: bool = False,
        queue_size: int = 10_000,
    ) -> None:
        super().__init__(log)
        self.broker = broker
        self.client_id = client_id
        self.manual_ack = manual_ack
        self.subscriptions: dict[str, int] = {}
        self.published: list[Message] = []  # what this client sent, for assertions
        self._queue_size = queue_size
        self._queue: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._unacked: dict[int, Message] = {}
        self._mids = itertools.count(1)
        self._link = 0

    @property
    def max_packet_size(self) -> int:
        return self.broker.max_packet_size

    @property
    def unacked(self) -> list[Message]:
        """Delivered QoS 1 messages not acked yet (manual ack only)."""
        return list(self._unacked.values())

    async def connect(self) -> None:
        if self._state is not LinkState.NEW:
            raise LocalProtocolError(f"connect() on a transport that is {self._state}")
        self._up(session_present=False)

    async def disconnect(self) -> None:
        if self._state is LinkState.CLOSED:
            return
        self.broker._detach(self)
        self._state = LinkState.CLOSED
        self._queue.clear()
        self._ready.set()
        self._connected.set()
        self._notify(LinkEvent(LinkState.CLOSED, "disconnect() called"))

    def drop_link(self) -> None:
        """Lose the link and come back at once with the session present."""
        self._check_open()
        self._state = LinkState.DISCONNECTED
        self._connected.clear()
        self._stats.disconnects += 1
        self._notify(LinkEvent(LinkState.DISCONNECTED, "drop_link()"))
        redeliver = list(self._unacked.values())
        self._unacked.clear()
        self._queue = deque(m for m in self._queue if m.qos == 0 or not self.manual_ack)
        self._up(session_present=True)
        for message in redeliver:
            self._deliver(message.topic, message.payload, message.qos, message.retain, dup=True)

    async def wait_connected(self) -> None:
        while self._state is not LinkState.CONNECTED:
            if self._state is LinkState.CLOSED:
                raise TransportClosedError(f"memory transport {self.client_id} closed")
            self._connected.clear()
            await self._connected.wait()

    async def publish(
        self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False
    ) -> None:
        self._check_open()
        self._check_publish(topic, qos)
        size = publish_packet_size(topic, len(payload), qos)
        if size > self.broker.max_packet_size:
            limit = self.broker.max_packet_size
            raise PayloadTooLargeError(
                f"publish to {topic!r} refused locally: {size} bytes > {limit}",
                size=size,
                limit=limit,
            )
        if self._state is not LinkState.CONNECTED:
            raise NotConnectedError(f"memory transport {self.client_id} is down")
        payload = bytes(payload)
        self.published.append(Message(topic, payload, qos=qos, retain=retain))
        self._stats.published += 1
        self.broker._route(topic, payload, qos, retain)
        await asyncio.sleep(0)  # a real publish yields to the loop, so must this

    async def subscribe(
        self, filters: str | Iterable[str], *, qos: int = 1, retained: bool = True
    ) -> list[int]:
        self._check_open()
        wanted = self._check_subscribe(filters, qos)
        for topic_filter in wanted:
            self.subscriptions[topic_filter] = qos
            if not retained or split_shared(topic_filter)[0] is not None:
                continue  # retain handling 2, or a shared subscription (MQTT 5 §4.8.2)
            for topic, message in list(self.broker.retained.items()):
                if topic_matches(topic_filter, topic):
                    self._deliver(topic, message.payload, min(qos, message.qos), True, False)
        await asyncio.sleep(0)
        return [qos for _ in wanted]

    async def unsubscribe(self, filters: str | Iterable[str]) -> None:
        self._check_open()
        for topic_filter in [filters] if isinstance(filters, str) else list(filters):
            self.subscriptions.pop(topic_filter, None)

    async def receive(self) -> Message:
        while not self._queue:
            if self._state is LinkState.CLOSED:
                raise TransportClosedError(f"memory transport {self.client_id} closed")
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def ack(self, message: Message) -> None:
        if not self.manual_ack or message.qos == 0 or message.link != self._link:
            return
        self._unacked.pop(message.mid, None)

    def _up(self, *, session_present: bool) -> None:
        self._link += 1
        self._state = LinkState.CONNECTED
        self._stats.connects += 1
        self.broker._attach(self)
        self._connected.set()
        self._notify(LinkEvent(LinkState.CONNECTED, "connected", session_present))

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool) -> None:
        if self._taps and self._tapped(Message(topic, payload, qos=qos, retain=retain, dup=dup)):
            self._stats.received += 1
            return
        if len(self._queue) >= self._queue_size:
            self._stats.dropped_queue_full += 1
            log.warning(
                "memory transport %s: queue full, dropped a message on %r", self.client_id, topic
            )
            return
        mid = (next(self._mids) - 1) % 65_535 + 1 if qos else 0
        message = Message(topic, payload, qos=qos, retain=retain, dup=dup, mid=mid, link=self._link)
        if self.manual_ack and qos:
            self._unacked[mid] = message
        self._stats.received += 1
        if dup:
            self._stats.redelivered += 1
        self._queue.append(message)
        self._ready.set()

    def _check_open(self) -> None:
        if self._state is LinkState.CLOSED:
            raise TransportClosedError(f"memory transport {self.client_id} closed")
        if self._state is LinkState.NEW:
            raise LocalProtocolError("call connect() before using the transport")
