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
- partial messages are bounded by the reassembler (``pet.reassembly_max_bytes``
  in memory plus ``pet.reassembly_spool_max_bytes`` on disk, and
  ``reassembly_max_messages``): a message that does not fit is refused at its
  first frame and its frames are acked as they come (the sender learns from the
  missing receipt and resends). So at most ``(memory + spool) / chunk_size``
  slots are held by incomplete messages, and both bounds are capped to what
  ``receive_maximum`` leaves after room for complete messages waiting for
  their group commit (``CoordinatorConfig.reassembly_bytes``). Admitted
  messages are never dropped for newer ones (see :class:`ChunkTracker`), so the
  held frames always belong to uploads that can complete.

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
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

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
    decode_message,
)
from maskfl.protocol.topics import ParsedTopic, TopicKind
from maskfl.transport import Message, Transport

log = logging.getLogger("maskfl.coordinator.ingest")

_LATE = frozenset({Reason.WRONG_ROUND, Reason.PHASE_CLOSED, Reason.WRONG_PHASE})
"""Reasons that a redelivery of an already accepted message would get (see _already_accepted)."""
_LAPSED = frozenset({Reason.REVOKED, Reason.EXPIRED})
"""Certificate reasons that may have come about after a message was accepted: a
redelivery of it is still answered ``duplicate`` (see _already_accepted)."""
_ADMITTED_MAX_BYTES = 256 << 20
"""Payload bytes admitted and waiting for their group commit, at most (one message
always passes): part of the coordinator's fixed memory, see :meth:`Ingest._room_for`."""
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


class DropCause(StrEnum):
    """Why an admitted partial message left the reassembler without completing."""

    EXPIRED = "expired"
    """No frame completed it within ``max_age_s`` of its first (the sender is gone)."""
    SUPERSEDED = "superseded"
    """Its sender (topic) started more than ``max_per_key`` other messages since."""
    SPOOL_FAILED = "spool_failed"
    """Writing a frame to the spool failed (disk full, I/O error)."""


@dataclass(slots=True)
class _Partial:
    total: int
    part_size: int
    count: int
    started_at: float
    spool: Path | None = None
    """Where its frames are written; None while they stay in memory."""
    parts: dict[int, memoryview] = field(default_factory=dict)
    have: set[int] = field(default_factory=set)
    deliveries: list[Message] = field(default_factory=list)


class ChunkTracker:
    """Reassembly of chunk frames plus the unacked deliveries of every partial message.

    Frames are parsed and checked by the protocol's :class:`ChunkFrame` (which
    checks each frame's length against the declared total and part size); each
    frame's data stays a view of its delivery until the message is complete, then
    all are joined in order: one copy, straight into the ``bytes`` the decoder
    takes (no zeroed buffer of the declared size, no second copy out of it). The
    frame hash of the protocol's reassembler is not recomputed here: the payload is
    a signed message whose body digest :func:`decode_message` checks anyway, so a
    mixed-up frame fails there (one SHA-256 pass per message, not two).

    **Admission, never eviction in favour of another upload.** A message is
    admitted at its first frame, reserving its declared total: in memory while
    ``max_bytes`` and ``max_messages`` allow, else in the spool directory (one
    sparse file per message, frames written at their offsets, read back once
    complete) while ``spool_max_bytes`` allows. When neither has room, the new
    message is *refused*: its frames are acked and dropped as they come (counted,
    logged once per message), and its sender, hearing no receipt, publishes it
    again later (``limits.receipt_timeout_s`` on an agent); a resend is a new
    admission from its first frame. An admitted message is never dropped to make
    room for another, so admitted uploads complete and the reassembler always
    makes progress, however many devices upload at once. (The old policy dropped
    the oldest partial for each new message: with 200 uploads of 4 MB against
    512 MiB, every partial was evicted by a newer one and none completed.)

    An admitted partial leaves without completing only for a :class:`DropCause`:
    it expired (``max_age_s`` from its first frame), its own sender superseded it
    (more than ``max_per_key`` messages on one topic), or the spool failed. Each
    drop is logged and counted (``on_drop``), and its deliveries are acked (see
    the module docstring).
    """

    def __init__(
        self,
        ack: Callable[[Message], None],
        *,
        max_messages: int,
        max_bytes: int,
        max_age_s: float,
        max_per_key: int = 2,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 0,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_per_key = max_per_key
        self.spool_dir = spool_dir
        self.spool_max_bytes = spool_max_bytes if spool_dir is not None else 0
        self._ack = ack
        self._on_drop = on_drop
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._refused: dict[tuple[str, bytes], float] = {}
        self._reserved = 0
        self._spooled = 0
        self.spooled_peak = 0
        self.dropped: dict[str, int] = {}
        """Admitted partials dropped, by :class:`DropCause` (and ``refused`` messages)."""
        if spool_dir is not None:
            # Frames of a partial message are never acked, so after a restart the
            # broker redelivers them: a spool left from before is garbage.
            shutil.rmtree(spool_dir, ignore_errors=True)
            spool_dir.mkdir(parents=True, exist_ok=True)

    @property
    def pending_messages(self) -> int:
        return len(self._partials)

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved in memory by partial messages."""
        return self._reserved

    @property
    def spooled_bytes(self) -> int:
        """Bytes reserved in the spool by partial messages."""
        return self._spooled

    @property
    def evicted(self) -> int:
        """Admitted partial messages dropped before completion (every cause)."""
        return sum(n for cause, n in self.dropped.items() if cause != "refused")

    @property
    def held(self) -> int:
        return sum(len(p.deliveries) for p in self._partials.values())

    def status(self) -> dict[str, int]:
        """What ``/status`` shows under ``reassembly``."""
        return {
            "pending": self.pending_messages,
            "bytes": self._reserved,
            "spooled": self._spooled,
            "spooled_peak": self.spooled_peak,
            "evicted": self.evicted,
            "refused": self.dropped.get("refused", 0),
            **{f"dropped_{cause}": n for cause, n in sorted(self.dropped.items())},
        }

    def _count(self, cause: str) -> None:
        self.dropped[cause] = self.dropped.get(cause, 0) + 1
        if self._on_drop is not None:
            self._on_drop(cause)

    def _release(self, slot: tuple[str, bytes]) -> _Partial:
        partial = self._partials.pop(slot)
        if partial.spool is None:
            self._reserved -= partial.total
        else:
            self._spooled -= partial.total
            with contextlib.suppress(OSError):
                partial.spool.unlink()
        return partial

    def _drop(self, slot: tuple[str, bytes], cause: DropCause) -> None:
        partial = self._release(slot)
        log.warning(
            "dropped a partial chunked message on %s (%d of %d frames, %d bytes): %s",
            slot[0],
            len(partial.have),
            partial.count,
            partial.total,
            cause.value,
            extra={"topic": slot[0], "cause": cause.value},
        )
        self._count(cause.value)
        for d in partial.deliveries:
            self._ack(d)

    def expire(self, now: float) -> None:
        for slot in [s for s, p in self._partials.items() if now - p.started_at > self.max_age_s]:
            self._drop(slot, DropCause.EXPIRED)
        for slot in [s for s, t in self._refused.items() if now - t > self.max_age_s]:
            del self._refused[slot]

    def _admit(self, slot: tuple[str, bytes], frame: ChunkFrame, now: float) -> _Partial | None:
        """A new partial for ``frame``'s message, or None when there is no room (refused)."""
        key = slot[0]
        own = [s for s in self._partials if s[0] == key]
        for old in own[: max(0, len(own) - self.max_per_key + 1)]:
            self._drop(old, DropCause.SUPERSEDED)
        if len(self._partials) < self.max_messages:
            if self._reserved + frame.total <= self.max_bytes:
                partial = _Partial(frame.total, frame.part_size, frame.count, now)
                self._reserved += frame.total
                self._partials[slot] = partial
                return partial
            if self.spool_dir is not None and self._spooled + frame.total <= self.spool_max_bytes:
                name = hashlib.sha256(key.encode() + slot[1]).hexdigest()[:32]
                partial = _Partial(
                    frame.total, frame.part_size, frame.count, now, self.spool_dir / name
                )
                self._spooled += frame.total
                self.spooled_peak = max(self.spooled_peak, self._spooled)
                self._partials[slot] = partial
                return partial
        if len(self._refused) >= 4 * self.max_messages:
            del self._refused[next(iter(self._refused))]
        self._refused[slot] = now
        log.warning(
            "refused a chunked message of %d bytes on %s: %d partial messages hold %d bytes in "
            "memory and %d in the spool (pet.reassembly_max_bytes, "
            "pet.reassembly_spool_max_bytes); the sender resends it when no receipt comes",
            frame.total,
            key,
            len(self._partials),
            self._reserved,
            self._spooled,
            extra={"topic": key, "cause": "refused"},
        )
        self._count("refused")
        return None

    def _store(self, slot: tuple[str, bytes], partial: _Partial, frame: ChunkFrame) -> bool:
        """Keep one frame's data; False when the spool failed (the partial is dropped)."""
        if partial.spool is None:
            partial.parts[frame.index] = frame.data
            return True
        try:
            fd = os.open(partial.spool, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, frame.data, frame.index * partial.part_size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write to the reassembly spool %s: %s", partial.spool, exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return False
        return True

    def _payload(self, partial: _Partial) -> bytes:
        if partial.spool is None:
            parts = partial.parts
            return b"".join([parts[i] for i in range(partial.count)])
        with partial.spool.open("rb") as f:
            payload = f.read()
        if len(payload) != partial.total:
            raise RemoteProtocolError(Reason.MALFORMED, "spooled message is short")
        return payload

    def feed(
        self, key: str, message: Message, frame: ChunkFrame, now: float
    ) -> tuple[bytes, list[Message]] | None:
        """The whole payload and all its deliveries once complete; None while partial.

        A frame of a refused message is acked here and None returned. Raises
        RemoteProtocolError (the caller acks this delivery) for a frame that does
        not fit the message it claims to belong to, or is too large.
        """
        self.expire(now)
        slot = (key, frame.message_id)
        partial = self._partials.get(slot)
        if partial is None:
            if frame.total > max(self.max_bytes, self.spool_max_bytes):
                raise RemoteProtocolError(
                    Reason.OVERSIZE,
                    f"chunked message of {frame.total} bytes, at most "
                    f"{max(self.max_bytes, self.spool_max_bytes)}",
                )
            if slot in self._refused and frame.index != 0:
                self._ack(_light(message))  # the rest of a refused message; counted at its refusal
                return None
            self._refused.pop(slot, None)  # a resend starts again from its first frame
            partial = self._admit(slot, frame, now)
            if partial is None:
                self._ack(_light(message))
                return None
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
        if frame.index not in partial.have:
            if not self._store(slot, partial, frame):
                return None
            partial.have.add(frame.index)
        if len(partial.have) < partial.count:
            return None
        try:
            payload = self._payload(partial)
        except (OSError, RemoteProtocolError) as exc:
            log.error("cannot read back a spooled message on %s: %s", key, exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return None
        self._release(slot)
        return payload, partial.deliveries


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
            max_bytes=services.config.reassembly_bytes,
            max_age_s=pet.reassembly_max_age_s,
            spool_dir=services.config.storage.dir / "spool",
            spool_max_bytes=services.config.reassembly_spool_bytes(),
            on_drop=lambda cause: services.metrics.reassembly_dropped.labels(cause=cause).inc(),
        )
        self.unacked = 0
        self.admitted_bytes = 0
        """Payload bytes of messages handed to the runner and not yet settled."""
        self._room = asyncio.Event()
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
        m.reassembly_spooled_bytes.set(r.spooled_bytes)
        m.unacked.set(self.chunks.held + self.runner.committer.pending)
        m.devices_alive.set(self.s.alive_count())
        counts = self.s.liveness.counts
        for result, total in counts.items():
            fresh = total - self._heartbeats_exported[result]
            if fresh:
                m.heartbeats.labels(result=result).inc(fresh)
                self._heartbeats_exported[result] = total

    async def handle(self, message: Message) -> None:  # noqa: PLR0912 bound, parse, tap status, decode off-loop, answer: in order
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
                self._reject(device, hashlib.sha256(payload).digest(), None, exc, deliveries)
                return
            if out is None:
                return
            payload, deliveries = out
        await self._room_for(len(payload))
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
        if header.message_type.topic_kind != parsed.kind:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"{header.message_type.name} message on a {parsed.kind} topic"
            )
        if header.round_id != parsed.round_id:
            # The signed header says where it belongs: an earlier round's message
            # replayed on this round's topic is for another round.
            raise RemoteProtocolError(
                Reason.WRONG_ROUND,
                f"message for round {header.round_id} on a topic of round {parsed.round_id}",
            )
        state = self.runner.state
        if state is not None and signed.digest in state.accepted_digests:
            raise RemoteProtocolError(
                Reason.DUPLICATE, "this message was already accepted (it counts once)"
            )
        try:
            cert = s.enrollment.verify(signed, now)
        except RemoteProtocolError as exc:
            if exc.reason in _LAPSED:  # since it counted: still a duplicate, not a rejection
                await self._already_accepted(signed)
            raise
        if cert.subject != device:
            raise RemoteProtocolError(
                Reason.UNENROLLED,
                f"certificate is enrolled as {cert.subject!r}, the topic names {device!r}",
            )
        s.liveness.seen(device, now)
        self.admitted_bytes += size
        try:
            await self.runner.offer(Incoming(signed, device, deliveries, size, now))
        except RemoteProtocolError as exc:
            self._release(size)
            if exc.reason in _LATE:
                await self._already_accepted(signed)
            raise
        except BaseException:
            self._release(size)
            raise

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
        """Wait until admitted messages not yet committed leave room for ``size`` bytes.

        Each holds its whole payload until its group commit; without a bound, a burst
        of large updates piles up in memory (ten 100 MB updates at M = 2.5e7 did).
        Meanwhile the transport's queue fills and it stops reading the socket, so the
        broker holds the rest. One message is always let through.
        """
        while self.admitted_bytes and self.admitted_bytes + size > _ADMITTED_MAX_BYTES:
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

        ``receipt`` is the accepted message's signed receipt, already stored in the
        outbox table in the transaction that made the message durable."""
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
