"""The MQTT adapter's incoming side: received messages waiting for the consumer.

A bounded queue (``incoming_queue_size``): when it is full the adapter stops reading
the socket until the consumer takes a message (TCP backpressure; the broker holds the
rest, nothing is dropped). With ``manual_ack`` the QoS 1 deliveries of the current link
are held here until the consumer acks them. Messages the adapter must not queue (a
non-UTF-8 topic, a payload over ``max_incoming_payload``) are acked, dropped, logged
and counted; tapped topics go to their handler instead of the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as paho

from ._config import MqttConfig
from ._errors import TransportClosedError
from ._types import Message, TransportStats

log = logging.getLogger("maskfl.transport")


class Inbox:
    """The queue of received messages and the deliveries held for a manual ack.

    ``pause`` and ``resume`` stop and restart reading the socket; they are called when
    the queue fills up and when the consumer has made room again.
    """

    def __init__(
        self,
        config: MqttConfig,
        stats: TransportStats,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self._config = config
        self._stats = stats
        self._pause = pause
        self._resume = resume
        self.queue: deque[Message] = deque()
        self.ready = asyncio.Event()
        self.paused = False
        self.unacked: set[int] = set()

    def deliver(
        self,
        client: paho.Client,
        msg: paho.MQTTMessage,
        link: int,
        tapped: Callable[[Message], bool],
    ) -> None:
        """One message paho received on link ``link``: dropped, tapped or queued."""
        cfg = self._config
        manual = cfg.manual_ack and msg.qos > 0
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._stats.dropped_malformed += 1
            log.warning("mqtt %s: dropped a message with a non-UTF-8 topic", cfg.address)
            if manual:
                client.ack(msg.mid, msg.qos)
            return
        payload = msg.payload
        if len(payload) > cfg.max_incoming_payload:
            self._stats.dropped_oversize += 1
            log.warning(
                "mqtt %s: dropped a %d-byte message on %r (limit %d bytes)",
                cfg.address,
                len(payload),
                topic,
                cfg.max_incoming_payload,
            )
            if manual:
                client.ack(msg.mid, msg.qos)
            return
        message = Message(
            topic,
            payload if isinstance(payload, bytes) else bytes(payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            dup=bool(msg.dup),
            mid=msg.mid,
            link=link,
        )
        self._stats.received += 1
        if tapped(message):
            if manual:
                client.ack(msg.mid, msg.qos)
            return
        if manual:
            self.unacked.add(msg.mid)
        if message.dup:
            self._stats.redelivered += 1
        self.queue.append(message)
        self.ready.set()
        if not self.paused and len(self.queue) >= cfg.incoming_queue_size:
            self.paused = True
            self._stats.backpressure_pauses += 1
            log.info("mqtt %s: incoming queue full; pausing reads", cfg.address)
            self._pause()

    async def take(self, closed: Callable[[], bool]) -> Message:
        """The next message; waits for one. :class:`TransportClosedError` once ``closed()``."""
        while not self.queue:
            if closed():
                raise TransportClosedError(f"MQTT transport to {self._config.address} closed")
            self.ready.clear()
            await self.ready.wait()
        message = self.queue.popleft()
        if self.paused and len(self.queue) < self._config.incoming_queue_size:
            self.paused = False
            self._resume()
        return message

    def release(self, message: Message, link: int) -> bool:
        """Whether ``message`` is held for an ack on the current ``link`` (then no longer):
        not for QoS 0, without manual ack, a second time, or from an earlier link."""
        if not self._config.manual_ack or message.qos == 0:
            return False
        if message.link != link or message.mid not in self.unacked:
            log.debug("mqtt ack of mid %d ignored: from an earlier link or acked", message.mid)
            return False
        self.unacked.discard(message.mid)
        return True

    def new_link(self, session_present: bool) -> None:
        """A CONNACK: nothing of the old link is held any more. With a session (and manual
        ack) the broker redelivers every unacked message, so those still queued go."""
        self.unacked.clear()
        if session_present and self._config.manual_ack:
            self.queue = deque(m for m in self.queue if m.qos == 0)

    def close(self) -> None:
        """Drop what is queued and wake the consumer (it then sees the transport closed)."""
        self.queue.clear()
        self.ready.set()
