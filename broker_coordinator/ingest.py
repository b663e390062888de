"""From MQTT deliveries to admitted messages: reassembly, decoding, checks, receipts.

Every delivery is either acknowledged at once (rejected, garbage) or held until
the message it belongs to is durable (see :mod:`.committer`). Heartbeats do not
come through here: :mod:`.liveness` reads them straight off the transport.

Chunked uploads and the broker's inflight window
------------------------------------------------
A 4-8 MB update arrives as 16-32 frames of 256 KiB. Each frame is an MQTT
delivery, and with manual acknowledgement every delivery we hold unacked takes
one slot of the broker's window for our session. We hold **every frame of a
message unacked until the whole message is durable** (or rejected): then a
kill -9 at any instant loses nothing, because the broker redelivers all unacked
frames to the persistent session and the reassembly starts over, and frames of
messages already committed are recognised by the message digest.

The deadlock to avoid: if the window filled up with frames of messages that are
all incomplete, no message could ever complete. Two facts rule it out:

- the window is our MQTT 5 *Receive Maximum* (``broker.receive_maximum``,
  default 65535), which mosquitto 2 honours for v5 clients instead of its
  ``max_inflight_messages`` (20; that one applies to v3 clients only; checked
  against mosquitto 2.0.11). Other brokers must honour Receive Maximum too;
- partial messages are bounded by the reassembler (``pet.reassembly_max_bytes``
  and ``reassembly_max_messages``, oldest dropped first, and an age limit).
  When a partial message is dropped, its frames are acked (the sender learns
  from the missing receipt and resends). So at most
  ``reassembly_max_bytes / chunk_size`` slots are held by incomplete messages,
  and the config check requires ``receive_maximum`` to exceed that with room
  for complete messages waiting for their group commit.

Rejections and receipts
-----------------------
A message that cannot be used is a :class:`RemoteProtocolError`: its
deliveries are acked, the reason is counted, and a signed receipt goes to
``receipts/<device>`` (the device named by the topic, which the broker ACL
ties to the sender). An identical copy of an accepted message (redelivery or
replay) is rejected as ``duplicate``: its contribution is already in, once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from maskfl.broker_coordinator.context import Contribution, Incoming, Services
from maskfl.broker_coordinator.fleetview import RejectionLog
from maskfl.broker_coordinator.runner import Runner
from maskfl.protocol.chunking import ChunkFrame, is_chunk
from maskfl.protocol.errors import MaskflError, Reason, RemoteProtocolError
from maskfl.protocol.messages import (
    MessageType,
    Receipt,
    SignedMessage,
    decode_message,
)
from maskfl.protocol.topics import PARTICIPANT_KINDS, ParsedTopic, TopicKind
from maskfl.transport import Message, Transport

log = logging.getLogger("maskfl.coordinator.ingest")

_TOPIC_TYPES = {
    TopicKind.SUM: MessageType.SUM,
    TopicKind.UPDATE: MessageType.UPDATE,
    TopicKind.SUM2: MessageType.SUM2,
}
_THREAD_DECODE = 16 << 20
"""Messages from this size on are decoded in a worker thread, smaller ones on the loop.

A hop to a thread and back costs more than it saves below tens of megabytes
(maskfl-bench coordinator, 2 vCPUs: 400 KB updates took a third longer through a
thread, 4 MB ones as long with more CPU, 40 KB ones twice the CPU), and the
ingest task waits for the result either way; hashing a message this large
blocks the loop for ~10 ms, so beyond it the thread keeps the loop reading."""


def _light(message: Message) -> Message:
    """The delivery without its payload: enough to ack it, and holds no memory."""
    return dataclasses.replace(message, payload=b"")


@dataclass(slots=True)
class _Partial:
    total: int
    part_size: int
    count: int
    started_at: float
    parts: dict[int, memoryview] = field(default_factory=dict)
    deliveries: list[Message] = field(default_factory=list)


class ChunkTracker:
    """Reassembly of chunk frames plus the unacked deliveries of every partial message.

    Frames are parsed and checked by the protocol's :class:`ChunkFrame` (which
    checks each frame's length against the declared total and part size); each
    frame's data stays a view of its delivery until the message is complete, then
    all are joined in order: one copy, straight into the ``bytes`` the decoder
    takes (no zeroed buffer of the declared size, no second copy out of it). The
    same bounds as the protocol's reassembler: ``max_messages`` partials, at most
    ``max_per_key`` per key (topic), ``max_bytes`` reserved in all (the declared
    totals), ``max_age_s`` from the first frame; the oldest partial goes first.
    The frame hash of the protocol's reassembler is not recomputed here: the
    payload is a signed message whose body digest :func:`decode_message` checks
    anyway, so a mixed-up frame fails there (one SHA-256 pass per message, not
    two). A dropped partial's deliveries are acked (see the module docstring).
    """

    def __init__(
        self,
        ack: Callable[[Message], None],
        *,
        max_messages: int,
        max_bytes: int,
        max_age_s: float,
        max_per_key: int = 2,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_per_key = max_per_key
        self._ack = ack
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._reserved = 0
        self.evicted = 0

    @property
    def pending_messages(self) -> int:
        return len(self._partials)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def held(self) -> int:
        return sum(len(p.deliveries) for p in self._partials.values())

    def _drop(self, slot: tuple[str, bytes]) -> None:
        partial = self._partials.pop(slot)
        self._reserved -= partial.total
        self.evicted += 1
        for d in partial.deliveries:
            self._ack(d)

    def expire(self, now: float) -> None:
        for slot in [s for s, p in self._partials.items() if now - p.started_at > self.max_age_s]:
            self._drop(slot)

    def feed(
        self, key: str, message: Message, frame: ChunkFrame, now: float
    ) -> tuple[bytes, list[Message]] | None:
        """The whole payload and all its deliveries once complete; None while partial.

        Raises RemoteProtocolError (the caller acks this delivery) for a frame
        that does not fit the message it claims to belong to, or is too large.
        """
        self.expire(now)
        slot = (key, frame.message_id)
        partial = self._partials.get(slot)
        if partial is None:
            if frame.total > self.max_bytes:
                raise RemoteProtocolError(
                    Reason.OVERSIZE,
                    f"chunked message of {frame.total} bytes, at most {self.max_bytes}",
                )
            own = [s for s in self._partials if s[0] == key]
            for old in own[: max(0, len(own) - self.max_per_key + 1)]:
                self._drop(old)
            while self._partials and (
                len(self._partials) >= self.max_messages
                or self._reserved + frame.total > self.max_bytes
            ):
                self._drop(next(iter(self._partials)))
            partial = _Partial(frame.total, frame.part_size, frame.count, now)
            self._partials[slot] = partial
            self._reserved += frame.total
        elif (frame.total, frame.part_size, frame.count) != (
            partial.total,
            partial.part_size,
            partial.count,
        ):
            raise RemoteProtocolError(
                Reason.MALFORMED, "chunk disagrees with earlier chunks on total, size or count"
            )
        partial.deliveries.append(_light(message))
        # A duplicate index (MQTT redelivery) keeps the first copy.
        partial.parts.setdefault(frame.index, frame.data)
        if len(partial.parts) < partial.count:
            return None
        del self._partials[slot]
        self._reserved -= partial.total
        parts = partial.parts
        return b"".join([parts[i] for i in range(partial.count)]), partial.deliveries


class Ingest:
    """Consumes the transport: one task, never raises for anything a peer sent."""

    def __init__(self, services: Services, runner: Runner, transport: Transport) -> None:
        self.s = services
        self.runner = runner
        self.transport = transport
        pet = services.config.pet
        self.chunks = ChunkTracker(
            self._ack,
            max_messages=pet.reassembly_max_messages,
            max_bytes=pet.reassembly_max_bytes,
            max_age_s=pet.reassembly_max_age_s,
        )
        self.unacked = 0
        self.rejections = RejectionLog()
        """Rejections per device until housekeeping writes them to the store."""
        self._heartbeats_exported: collections.Counter[str] = collections.Counter()

    def _ack(self, message: Message) -> None:
        self.transport.ack(message)

    async def run(self) -> None:
        async for message in self.transport.messages():
            await self.handle(message)

    def tick(self) -> None:
        """Periodic housekeeping: drop stale partial messages, refresh gauges."""
        now = self.s.clock()
        self.chunks.expire(now)
        m = self.s.metrics
        r = self.chunks
        m.reassembly_pending.set(r.pending_messages)
        m.reassembly_bytes.set(r.reserved_bytes)
        m.unacked.set(self.chunks.held + self.runner.committer.pending)
        m.devices_alive.set(self.s.alive_count())
        counts = self.s.liveness.counts
        for result, total in counts.items():
            fresh = total - self._heartbeats_exported[result]
            if fresh:
                m.heartbeats.labels(result=result).inc(fresh)
                self._heartbeats_exported[result] = total

    async def handle(self, message: Message) -> None:
        s = self.s
        s.metrics.bytes_in.inc(len(message.payload))
        try:
            parsed = s.topics.parse(message.topic)
        except RemoteProtocolError as exc:
            self._ack(message)
            s.metrics.count("unknown", exc.reason)
            return
        if parsed.kind is TopicKind.STATUS:
            # Normally tapped off the transport before the queue (see liveness).
            s.liveness.on_status(message)
            self._ack(message)
            return
        if parsed.kind not in PARTICIPANT_KINDS or parsed.device is None:
            self._ack(message)
            return
        device = str(parsed.device)
        payload = message.payload
        deliveries = [_light(message)]
        now = s.clock()
        state = self.runner.state
        if parsed.kind is TopicKind.UPDATE and state is not None and state.first_update_at is None:
            state.first_update_at = now
        if is_chunk(payload):
            try:
                frame = ChunkFrame.parse(payload)
                if frame.total > s.max_message_size():
                    raise RemoteProtocolError(
                        Reason.OVERSIZE,
                        f"chunked message of {frame.total} bytes, at most {s.max_message_size()}",
                    )
                out = self.chunks.feed(message.topic, message, frame, now)
            except RemoteProtocolError as exc:
                self._ack(message)
                self._reject(device, hashlib.sha256(payload).digest(), None, exc, [])
                return
            if out is None:
                return
            payload, deliveries = out
        try:
            if len(payload) >= _THREAD_DECODE:
                # Hashing tens of megabytes releases the GIL: let the loop read meanwhile.
                signed = await asyncio.to_thread(
                    decode_message, payload, max_size=s.max_message_size()
                )
            else:
                signed = decode_message(payload, max_size=s.max_message_size())
        except RemoteProtocolError as exc:
            self._reject(device, hashlib.sha256(payload).digest(), None, exc, deliveries)
            return
        kind = signed.header.message_type
        try:
            await self._admit(
                signed, parsed, device=device, deliveries=deliveries, size=len(payload), now=now
            )
        except RemoteProtocolError as exc:
            self._reject(device, signed.digest, kind, exc, deliveries)
        except MaskflError as exc:  # a local failure while admitting: never fatal here
            log.error("admitting a %s message from %s failed: %s", kind.name, device, exc)
            self._reject(
                device,
                signed.digest,
                kind,
                RemoteProtocolError(Reason.PHASE_CLOSED, "coordinator error"),
                deliveries,
            )

    async def _admit(
        self,
        signed: SignedMessage,
        parsed: ParsedTopic,
        *,
        device: str,
        deliveries: list[Message],
        size: int,
        now: float,
    ) -> None:
        s = self.s
        header = signed.header
        signed.expect(fleet=s.fleet)
        if _TOPIC_TYPES.get(parsed.kind) != header.message_type:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"{header.message_type.name} message on a {parsed.kind} topic"
            )
        if header.round_id != parsed.round_id:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"message for round {header.round_id} on a topic of round {parsed.round_id}",
            )
        state = self.runner.state
        if state is not None and signed.digest in state.accepted_digests:
            raise RemoteProtocolError(
                Reason.DUPLICATE, "this message was already accepted (it counts once)"
            )
        cert = s.enrollment.verify(signed, now)
        if cert.subject != device:
            raise RemoteProtocolError(
                Reason.UNENROLLED,
                f"certificate is enrolled as {cert.subject!r}, the topic names {device!r}",
            )
        s.liveness.seen(device, now)
        await self.runner.offer(Incoming(signed, device, deliveries, size, now))

    # -- outcomes -------------------------------------------------------------

    def _reject(
        self,
        device: str,
        digest: bytes,
        kind: MessageType | None,
        exc: RemoteProtocolError,
        deliveries: list[Message],
    ) -> None:
        for d in deliveries:
            self._ack(d)
        name = "unknown" if kind is None else kind.name.lower()
        self.s.metrics.count(name, exc.reason)
        self.rejections.note(device, str(exc.reason), self.s.clock())
        log.info(
            "rejected %s from %s: %s",
            name,
            device,
            exc,
            extra={"device": device, "reason": str(exc.reason)},
        )
        self._receipt(device, Receipt(digest, kind, False, exc.reason, str(exc.args[0])[:1000]))

    def settle(self, item: Contribution, reason: Reason | None, detail: str) -> None:
        """The committer's callback: ack the deliveries, count, send the receipt."""
        inc = item.incoming
        kind = inc.message.header.message_type
        if reason is not None:
            self._reject(
                inc.device,
                inc.message.digest,
                kind,
                RemoteProtocolError(reason, detail),
                inc.deliveries,
            )
            return
        for d in inc.deliveries:
            self._ack(d)
        self.s.metrics.count(kind.name.lower(), None)
        self._receipt(inc.device, Receipt(inc.message.digest, kind, True))

    def _receipt(self, device: str, receipt: Receipt) -> None:
        s = self.s
        state = self.runner.state
        round_id = state.round_id if state is not None else 0
        try:
            raw = s.sign(receipt, round_id)
            s.outbox.notify(s.topics.receipts(device), raw)
        except MaskflError as exc:
            log.warning("cannot send a receipt to %s: %s", device, exc)
