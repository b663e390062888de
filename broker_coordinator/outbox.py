"""Everything the coordinator publishes goes through here.

State (round parameters, sum and seed dictionaries, global models, the
revocation list) is published retained with QoS 1 and awaited: the caller
continues once the broker has it, and the transport retries across reconnects.
A retained value must be one message (a late subscriber gets only the last
retained message of a topic), so state goes out whole while the broker's
maximum packet size allows; when it does not (a managed broker), it is sent as
chunk frames, not retained, which live subscribers reassemble, and a warning
says that late joiners wait for the next publication.

Receipts are never dropped
--------------------------
Every participant message gets one receipt (QoS 1, not retained), and the
MQTT deliveries that carried the message are acknowledged to the broker only
once the broker has that receipt (its PUBACK). So:

- a rejection's receipt survives a crash without being stored: the broker
  redelivers the unacknowledged message after the restart and it is answered
  again;
- an accepted message's receipt is written to the ``receipt_outbox`` table in
  the same transaction that makes the message durable (see
  :mod:`.committer`), and that row is deleted once the broker has the receipt;
  the rows left by a crash are published again after the restart
  (:meth:`Outbox.resend_stored`), so a message counted in a model always gets
  its ``accepted`` receipt (at least once: a kill between the PUBACK and the
  row's deletion sends it twice, which participants ignore);
- the receipts waiting for a PUBACK are bounded by the broker's flow control,
  not by dropping: each holds the unacknowledged deliveries of its message, and
  the broker sends no more than our MQTT 5 Receive Maximum of those. When
  receipts back up, the coordinator stops acknowledging, and the broker stops
  delivering: backpressure all the way to the devices. Nothing is dropped;
  :attr:`Outbox.pending` is exported as ``maskfl_coordinator_receipts_pending``.

A receipt the broker refuses (a failing PUBACK reason code, such as *not
authorized* from an ACL that lacks the coordinator's write access to
``receipts/<device>``) cannot be delivered by trying again: it is logged and
counted in ``maskfl_coordinator_receipts_failed_total``, and the message's deliveries are
acknowledged so that they do not hold the broker's window for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from maskfl.broker_coordinator.metrics import Metrics
from maskfl.protocol.chunking import DEFAULT_CHUNK_SIZE, iter_frames
from maskfl.protocol.errors import MaskflError
from maskfl.transport import PayloadTooLargeError, RefusedError, Transport, TransportClosedError

log = logging.getLogger("maskfl.coordinator.outbox")


class Outbox:
    """The coordinator's one publisher: retained state and receipts (see the module doc).

    In the coordinator "outbox" names only this; the receipts it keeps in SQLite until
    the broker has them are the *stored receipts* (table ``receipt_outbox``, an older
    name kept to spare a migration).
    """

    def __init__(
        self, transport: Transport, metrics: Metrics, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._chunk_size = chunk_size
        """``pet.chunk_size``: the frames of a retained message the broker refuses whole."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent: list[bytes] = []
        """Digests whose stored receipt the broker has: their outbox rows can go."""

    async def state(self, topic: str, payload: bytes | bytearray) -> None:
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
                self._chunk_size,
            )
            for frame in iter_frames(bytes(payload), self._chunk_size):
                await self._transport.publish(topic, frame, qos=1)

    async def clear(self, topic: str) -> None:
        """Remove a retained message (an empty retained publish)."""
        await self._transport.publish(topic, b"", qos=1, retain=True)

    @property
    def pending(self) -> int:
        """Receipts handed to the broker and not yet confirmed by it."""
        return len(self._tasks)

    def receipt(
        self,
        topic: str,
        payload: bytes,
        *,
        then: Callable[[], None] | None = None,
        stored: bytes | None = None,
    ) -> None:
        """Publish a receipt (QoS 1) without waiting for it.

        Once the broker has it, ``then()`` runs (the caller acknowledges the
        answered message's deliveries there) and, for a receipt stored in the
        ``receipt_outbox`` table under digest ``stored``, the row is marked for
        deletion (:meth:`take_sent`).
        """
        task = asyncio.create_task(self._send(topic, payload, then, stored))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resend_stored(self, rows: Sequence[tuple[bytes, str, bytes]]) -> None:
        """Publish receipts left in the outbox table by an earlier process:
        ``(digest, topic, payload)``."""
        if rows:
            log.info("sending %d stored receipts again (left by the previous run)", len(rows))
        for digest, topic, payload in rows:
            self.receipt(topic, payload, stored=digest)

    def take_sent(self) -> list[bytes]:
        """The digests whose stored receipts were delivered since the last call."""
        sent, self._sent = self._sent, []
        return sent

    async def _send(
        self, topic: str, payload: bytes, then: Callable[[], None] | None, stored: bytes | None
    ) -> None:
        # No timeout: the transport keeps a QoS 1 publish across reconnects until the
        # broker has it; giving up here would lose the receipt (and, with it, hold or
        # lose the message's acknowledgement).
        try:
            await self._transport.publish(topic, payload, qos=1)
        except TransportClosedError:
            return  # shutting down: stored receipts are resent, the rest redelivered
        except (RefusedError, MaskflError) as exc:
            self._metrics.receipts_failed.inc()
            log.error("receipt to %s refused by the broker, not retried: %s", topic, exc)
        if then is not None:
            then()
        if stored is not None:
            self._sent.append(stored)

    async def wait_sent(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the receipts in flight (before a clean stop)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
