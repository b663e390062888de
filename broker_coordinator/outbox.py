"""Everything the coordinator publishes goes through here.

State (round parameters, sum and seed dictionaries, global models, the
revocation list) is published retained with QoS 1 and awaited: the caller
continues once the broker has it, and the transport retries across reconnects.
A retained value must be one message (a late subscriber gets only the last
retained message of a topic), so state goes out whole while the broker's
maximum packet size allows; when it does not (a managed broker), it is sent as
chunk frames, not retained, which live subscribers reassemble, and a warning
says that late joiners wait for the next publication.
Receipts are fire-and-forget, bounded: at most ``max_receipts`` wait for their
PUBACK at once, beyond that a receipt is dropped and counted (the device learns
the outcome from the next round's parameters or resends).
"""

from __future__ import annotations

import asyncio
import logging

from maskfl.broker_coordinator.metrics import Metrics
from maskfl.protocol.chunking import split_payload
from maskfl.protocol.errors import MaskflError
from maskfl.transport import PayloadTooLargeError, Transport

log = logging.getLogger("maskfl.coordinator.outbox")


class Outbox:
    def __init__(self, transport: Transport, metrics: Metrics, *, max_receipts: int = 2000) -> None:
        self._transport = transport
        self._metrics = metrics
        self._max = max_receipts
        self._tasks: set[asyncio.Task[None]] = set()

    async def state(self, topic: str, payload: bytes, *, chunk_size: int = 256 * 1024) -> None:
        """Publish retained, QoS 1, and wait for the broker's PUBACK (see the module doc)."""
        try:
            await self._transport.publish(topic, payload, qos=1, retain=True)
        except PayloadTooLargeError as exc:
            log.warning(
                "%s: %d bytes exceed the broker's packet limit (%s); sending %d-byte chunk "
                "frames, not retained",
                topic,
                len(payload),
                exc,
                chunk_size,
            )
            for frame in split_payload(payload, chunk_size):
                await self._transport.publish(topic, frame, qos=1)

    async def clear(self, topic: str) -> None:
        """Remove a retained message (an empty retained publish)."""
        await self._transport.publish(topic, b"", qos=1, retain=True)

    def notify(self, topic: str, payload: bytes) -> None:
        """Publish a receipt without waiting; dropped and counted when too many are pending."""
        if len(self._tasks) >= self._max:
            self._metrics.receipts_dropped.inc()
            return
        task = asyncio.create_task(self._send(topic, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, topic: str, payload: bytes) -> None:
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the publish in a second
            # task, and a receipt goes out for every participant message.
            async with asyncio.timeout(60):
                await self._transport.publish(topic, payload, qos=1)
        except (MaskflError, TimeoutError) as exc:
            self._metrics.receipts_dropped.inc()
            log.warning("receipt to %s not delivered: %s", topic, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
