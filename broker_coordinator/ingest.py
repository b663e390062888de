"""From MQTT deliveries to admitted messages: reassembly, decoding, checks, receipts.

The deliveries of a participant message (its chunk frames, or the one
delivery) are acknowledged once the broker has the message's receipt, accepted
(after the message is durable, see :mod:`.committer`) or rejected; deliveries
that get no receipt (unknown topics, empty payloads) are acknowledged at once.
Heartbeats do not come through here: :mod:`.liveness` reads them straight off
the transport.

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
- partial messages are bounded by the reassembler (the message memory, below,
  plus ``pet.reassembly_spool_max_bytes`` on disk, and
  ``reassembly_max_messages``): a message that does not fit is refused at its
  first frame and its frames are acked as they come (the sender learns from the
  missing receipt and resends). So at most ``(memory + spool) / chunk_size``
  slots are held by incomplete messages, and both bounds are capped to what
  ``receive_maximum`` leaves after room for complete messages waiting for
  their group commit (``CoordinatorConfig.reassembly_bytes``). Admitted
  messages are never dropped for newer ones (:attr:`WhenFull.REFUSE` of the
  protocol's :class:`Reassembler`), so the
  held frames always belong to uploads that can complete.

Message memory
--------------
A received message's bytes are counted once, from its first frame until they
are let go, against one bound, ``pet.message_memory_max_bytes``
(:attr:`Ingest.held`, ``/status`` ``message_memory``): the transport's queue
has its own share (``CoordinatorConfig.transport_queue_size`` deliveries); the
rest (``CoordinatorConfig.message_bytes``) holds, together,

- partial messages in memory: each reserves its total at its first frame, and
  only while the total fits (else it goes to the spool); frames are copied into
  the payload as they come, so a message never takes its size twice;
- whole messages, from the frame that completes them (or their one delivery)
  until their receipt is sent: the partial's reservation carries over;
- updates' words kept for the round (``storage.update_words = "memory"``, at
  most half; see the update phase), until the unmask no longer needs them.

The one excess: a frame that completes a *spooled* message reads it back, and
waits for room first; but only whole messages waiting for their commit free room
while the ingest waits (partials need the frames behind it), so when none is
left it goes on: one message beyond the bound at most, and a message larger
than the bound passes alone this way.

Rejections and receipts
-----------------------
A message that cannot be used is a :class:`RemoteProtocolError`: the reason
is counted, a signed receipt goes to ``receipts/<device>`` (the device named
by the topic, which the broker ACL ties to the sender), and its deliveries are
acked when the broker has the receipt (see :mod:`.outbox`: this is also the
backpressure when receipts back up). An identical copy of an accepted message
(redelivery or replay) is answered ``duplicate``, in any later phase or round
too (the ``messages`` table remembers every accepted digest): its contribution
is already in, once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from maskfl.broker_coordinator.admission import Refusal
from maskfl.broker_coordinator.context import Contribution, Incoming, Services
from maskfl.broker_coordinator.fleetview import RejectionLog
from maskfl.broker_coordinator.runner import Runner
from maskfl.protocol.chunking import ChunkFrame, is_chunk
from maskfl.protocol.errors import MaskflError, Reason, RemoteProtocolError
from maskfl.protocol.messages import (
    PARTICIPANT_KINDS,
    MessageType,
    Receipt,
    SignedMessage,
)
from maskfl.protocol.reassembly import Reassembler, Released, WhenFull, Whole
from maskfl.protocol.topics import ParsedTopic, TopicKind
from maskfl.transport import Message, Transport, decode_off_loop

log = logging.getLogger("maskfl.coordinator.ingest")


def _light(message: Message) -> Message:
    """The delivery without its payload: enough to ack it, and holds no memory."""
    return dataclasses.replace(message, payload=b"")


class FileSpool:
    """The reassembler's spool: one sparse file per partial message in ``directory``,
    frames written at their offsets, read back once complete.

    Frames of a partial message are never acked, so after a restart the broker
    redelivers them: a spool left from before is garbage and is emptied here.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.dir / name).unlink()


class Ingest:
    """Consumes the transport: one task, never raises for anything a peer sent."""

    def __init__(self, services: Services, runner: Runner, transport: Transport) -> None:
        self.s = services
        self.runner = runner
        self.transport = transport
        pet = services.config.pet
        # Admission, never eviction for another upload (see the module docstring):
        # refused senders resend. No id hash: decode_message checks the body digest.
        self.chunks: Reassembler[Message] = Reassembler(
            pet.reassembly_max_messages,
            services.config.reassembly_bytes,
            pet.reassembly_max_age_s,
            when_full=WhenFull.REFUSE,
            spool=FileSpool(services.config.storage.dir / "spool"),
            spool_max_bytes=services.config.reassembly_spool_bytes(),
            check_id=False,
            on_release=self._released,
            held_elsewhere=lambda: self.admitted_bytes + self._words_bytes(),
        )
        self.unacked = 0
        self.admitted_bytes = 0
        """Payload bytes of whole messages, from reassembly (or their one delivery)
        until they are settled (their receipt sent)."""
        self.held_peak = 0
        """The most :attr:`held` seen, after each message or frame taken in."""
        self._room = asyncio.Event()
        self.rejections = RejectionLog()
        """Rejections per device until housekeeping writes them to the store."""
        self._heartbeats_exported: collections.Counter[str] = collections.Counter()

    def _ack(self, message: Message) -> None:
        self.transport.ack(message)

    def _words_bytes(self) -> int:
        state = self.runner.state
        return 0 if state is None else state.words_bytes

    @property
    def held(self) -> int:
        """Message memory in use (see the module docstring): partial messages in memory,
        whole ones not yet settled, and the round's updates' words kept."""
        return self.chunks.reserved_bytes + self.admitted_bytes + self._words_bytes()

    def memory_status(self) -> dict[str, int]:
        """``/status`` ``message_memory``: the bound (less the transport's queue), what
        is held now and by whom, and the most held since the start."""
        return {
            "bound": self.s.config.message_bytes,
            "held": self.held,
            "peak": self.held_peak,
            "partial": self.chunks.reserved_bytes,
            "whole": self.admitted_bytes,
            "words": self._words_bytes(),
        }

    def _took_in(self) -> None:
        self.held_peak = max(self.held_peak, self.held)

    def _released(self, released: Released[Message]) -> None:
        """Frames the reassembler let go (logged and counted there): ack them, export."""
        for delivery in released.tags:
            self._ack(delivery)
        if released.counted:
            self.s.metrics.reassembly_dropped.labels(cause=released.cause.value).inc()

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
        m.reassembly_spooled_bytes.set(r.spooled_bytes)
        m.message_memory.set(self.held)
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
            whole = await self._reassemble(message, device, now)
            if whole is None:
                return
            payload, deliveries = whole.payload, list(whole.tags)
        else:
            await self._room_for(len(payload))
        # Counted from here until settled (a partial's reservation, released by the
        # reassembler as it returned the payload, carries over in the same step).
        size = len(payload)
        self.admitted_bytes += size
        self._took_in()
        try:
            signed = await decode_off_loop(payload, max_size=s.max_message_size())
        except RemoteProtocolError as exc:
            self._release(size)
            self._reject(device, hashlib.sha256(payload).digest(), None, exc, deliveries)
            return
        kind = signed.header.message_type
        try:
            await self._admit(
                signed, parsed, device=device, deliveries=deliveries, size=size, now=now
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

    async def _reassemble(self, message: Message, device: str, now: float) -> Whole[Message] | None:
        """Feed one chunk frame: its message when this frame completed it, else None (a
        frame that cannot be used is rejected here)."""
        payload = message.payload
        limit = self.s.max_message_size()
        try:
            frame = ChunkFrame.parse(payload)
            if frame.total > limit:
                raise RemoteProtocolError(
                    Reason.OVERSIZE, f"chunked message of {frame.total} bytes, at most {limit}"
                )
            # A frame that completes a spooled message reads its whole payload back
            # into memory: room first (its frames wait unacked).
            spooled = self.chunks.completes_spooled(message.topic, frame)
            if spooled:
                await self._room_for(spooled)
            return self.chunks.feed(message.topic, payload, now, _light(message))
        except RemoteProtocolError as exc:
            digest = hashlib.sha256(payload).digest()
            self._reject(device, digest, None, exc, [_light(message)])
            return None
        finally:
            self._took_in()

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
        """Offer the message to the runner (every rule: :mod:`.admission`); raise the
        refusal, after asking the store whether a late or lapsed message counted. Its
        ``size`` bytes are let go here when it is refused, else when it is settled."""
        assert parsed.round_id is not None  # a participant topic names its round
        incoming = Incoming(signed, device, deliveries, size, now, parsed.kind, parsed.round_id)
        try:
            result = await self.runner.offer(incoming)
        except BaseException:
            self._release(size)
            raise
        if isinstance(result, Refusal):
            self._release(size)
            if result.authenticated:
                self.s.liveness.seen(device, now)
            if result.late:
                await self._already_accepted(signed)
            raise RemoteProtocolError(result.reason, result.detail)
        self.s.liveness.seen(device, now)

    async def _already_accepted(self, signed: SignedMessage) -> None:
        """DUPLICATE for a redelivery of a message accepted in an earlier phase or round.

        A message that was committed but not yet acknowledged when the coordinator
        died comes back after the restart, perhaps after its phase or round is over:
        its answer is what it got the first time (it counts), never a rejection.
        Asked of the database only for messages about to be turned away as late."""
        found = await self.s.store.message_round(signed.digest)
        if found is not None:
            round_id, kind = found
            raise RemoteProtocolError(
                Reason.DUPLICATE,
                f"this message was already accepted in round {round_id} ({kind}); it counts once",
            )

    async def _room_for(self, size: int) -> None:
        """Wait until the message memory has room for ``size`` more bytes, or no whole
        message is left to free any (see the module docstring: then one goes beyond).

        Only settling messages free room while the ingest waits here (partials need
        the frames behind this one). Meanwhile the transport's queue fills and it stops
        reading the socket, so the broker holds the rest.
        """
        while self.admitted_bytes and self.held + size > self.s.config.message_bytes:
            self._room.clear()
            await self._room.wait()

    def _release(self, size: int) -> None:
        self.admitted_bytes -= size
        self._room.set()

    # -- outcomes -------------------------------------------------------------

    def _reject(
        self,
        device: str,
        digest: bytes,
        kind: MessageType | None,
        exc: RemoteProtocolError,
        deliveries: list[Message],
    ) -> None:
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
        self._receipt(
            device, Receipt(digest, kind, False, exc.reason, str(exc.args[0])[:1000]), deliveries
        )

    def settle(
        self, item: Contribution, reason: Reason | None, detail: str, receipt: bytes | None
    ) -> None:
        """The committer's callback: count, send the receipt, then ack the deliveries.

        ``receipt`` is the accepted message's signed receipt, already stored (with
        the stored receipts) in the transaction that made the message durable."""
        inc = item.incoming
        self._release(inc.size)
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
        assert receipt is not None
        s = self.s
        s.metrics.count(kind.name.lower(), None)
        s.outbox.receipt(
            s.topics.receipts(inc.device),
            receipt,
            then=self._acker(inc.deliveries),
            stored=inc.message.digest,
        )

    def _acker(self, deliveries: list[Message]) -> Callable[[], None]:
        def ack() -> None:
            for d in deliveries:
                self._ack(d)

        return ack

    def _receipt(self, device: str, receipt: Receipt, deliveries: list[Message]) -> None:
        """Sign and send a rejection; its deliveries are acked once the broker has it
        (a crash before that redelivers the message, which is answered again)."""
        s = self.s
        state = self.runner.state
        round_id = state.round_id if state is not None else 0
        try:
            raw = s.sign(receipt, round_id)
        except MaskflError as exc:
            log.error("cannot sign a receipt to %s: %s", device, exc)
            self._acker(deliveries)()
            return
        s.outbox.receipt(s.topics.receipts(device), raw, then=self._acker(deliveries))
