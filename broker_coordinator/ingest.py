"""From MQTT deliveries to admitted messages: reassembly, decoding, checks, receipts.

Every delivery is either acknowledged at once (rejected, heartbeat, garbage)
or held until the message it belongs to is durable (see :mod:`.committer`).

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

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Hashable

from maskfl.broker_coordinator.context import Contribution, Incoming, Services
from maskfl.broker_coordinator.runner import Runner
from maskfl.protocol.chunking import ChunkFrame, Reassembler, is_chunk
from maskfl.protocol.errors import MaskflError, Reason, RemoteProtocolError
from maskfl.protocol.messages import (
    Heartbeat,
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
_MAX_HEARTBEAT = 4096


def _light(message: Message) -> Message:
    """The delivery without its payload: enough to ack it, and holds no memory."""
    return dataclasses.replace(message, payload=b"")


class _TrackingReassembler(Reassembler):
    """The protocol's reassembler, telling us which partial messages it let go.

    Overrides the private ``_remove`` (called on completion, drop and expiry) so
    the frames we hold unacked for a dropped message can be acked.
    """

    def __init__(self, *args: float, on_remove: Callable[[tuple[Hashable, bytes]], None]) -> None:
        super().__init__(int(args[0]), int(args[1]), args[2])
        self._on_remove = on_remove

    def _remove(self, slot: tuple[Hashable, bytes]) -> None:
        super()._remove(slot)
        self._on_remove(slot)


class ChunkTracker:
    """Reassembly plus the unacked deliveries of every partial message."""

    def __init__(self, services: Services, ack: Callable[[Message], None]) -> None:
        pet = services.config.pet
        self._ack = ack
        self._held: dict[tuple[Hashable, bytes], list[Message]] = {}
        self._released: dict[tuple[Hashable, bytes], list[Message]] = {}
        self.evicted = 0
        self.reassembler = _TrackingReassembler(
            pet.reassembly_max_messages,
            pet.reassembly_max_bytes,
            pet.reassembly_max_age_s,
            on_remove=self._removed,
        )

    def _removed(self, slot: tuple[Hashable, bytes]) -> None:
        self._released[slot] = self._held.pop(slot, [])

    @property
    def held(self) -> int:
        return sum(len(v) for v in self._held.values())

    def _ack_released(self, keep: tuple[Hashable, bytes] | None = None) -> list[Message]:
        mine: list[Message] = []
        for slot, deliveries in self._released.items():
            if slot == keep:
                mine = deliveries
                continue
            self.evicted += 1
            for d in deliveries:
                self._ack(d)
        self._released = {}
        return mine

    def expire(self, now: float) -> None:
        self.reassembler.expire(now)
        self._ack_released()

    def feed(
        self, key: str, message: Message, frame: ChunkFrame, now: float
    ) -> tuple[bytes, list[Message]] | None:
        """The whole payload and all its deliveries once complete; None while partial.

        On RemoteProtocolError the frame's delivery (and, if the message was
        dropped, all of its) are acked before it propagates.
        """
        slot = (key, frame.message_id)
        light = _light(message)
        try:
            payload = self.reassembler.feed(key, message.payload, now)
        except RemoteProtocolError:
            for d in [*self._ack_released(keep=slot), light]:
                self._ack(d)
            raise
        earlier = self._ack_released(keep=slot)
        if payload is None:
            for d in earlier:  # a partial that expired and restarted with this frame
                self._ack(d)
            self._held.setdefault(slot, []).append(light)
            return None
        return payload, [*earlier, light]


class Ingest:
    """Consumes the transport: one task, never raises for anything a peer sent."""

    def __init__(self, services: Services, runner: Runner, transport: Transport) -> None:
        self.s = services
        self.runner = runner
        self.transport = transport
        self.chunks = ChunkTracker(services, self._ack)
        self.unacked = 0

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
        r = self.chunks.reassembler
        m.reassembly_pending.set(r.pending_messages)
        m.reassembly_bytes.set(r.reserved_bytes)
        m.unacked.set(self.chunks.held + self.runner.committer.pending)
        m.devices_alive.set(self.s.alive_count())

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
            self._heartbeat(message, parsed)
            self._ack(message)
            return
        if parsed.kind not in PARTICIPANT_KINDS or parsed.device is None:
            self._ack(message)
            return
        device = str(parsed.device)
        payload = message.payload
        deliveries = [_light(message)]
        now = s.clock()
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
        s.alive[device] = now
        await self.runner.offer(Incoming(signed, device, deliveries, size, now))

    def _heartbeat(self, message: Message, parsed: ParsedTopic) -> None:
        s = self.s
        device = str(parsed.device)
        if not message.payload:  # last will or an explicit "gone"
            s.alive.pop(device, None)
            return
        try:
            signed = decode_message(message.payload, max_size=_MAX_HEARTBEAT)
            signed.expect(fleet=s.fleet, types=(MessageType.HEARTBEAT,))
            if not isinstance(signed.body, Heartbeat):
                raise RemoteProtocolError(Reason.MALFORMED, "not a heartbeat")
            cert = s.enrollment.verify(signed, s.clock())
            if cert.subject != device:
                raise RemoteProtocolError(Reason.UNENROLLED, "heartbeat for another device")
        except RemoteProtocolError as exc:
            s.metrics.count("heartbeat", exc.reason)
            return
        s.alive[device] = s.clock()
        s.metrics.count("heartbeat", None)

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
