"""Splitting large payloads into chunk frames and putting them back together.

MQTT brokers (managed ones above all) cap the packet size, so a payload longer
than the chunk size travels as several *chunk frames*, each at most
``chunk_size`` bytes. A frame is a 44-byte header and a slice of the payload::

    offset size field
     0      4   magic b"MFLC"
     4      1   format version (1)
     5      3   reserved, zero
     8     16   message id = SHA-256(whole payload)[:16]
    24      8   total payload length, u64
    32      4   part size (payload bytes in every frame but the last), u32
    36      4   index, u32, 0-based
    40      4   count, u32 = ceil(total / part size)
    44      …   the payload bytes [index·part size, min(total, (index+1)·part size))

Frames are not signed: the reassembled payload is a signed message that the
receiver verifies anyway, and the message id (a hash of the payload) makes a
corrupted or mixed-up frame fail reassembly instead of producing a wrong message.

:class:`Reassembler` is the one reassembler of maskfl (the coordinator's uploads,
a device's broadcasts, the tools): bounded in concurrent messages, per sender, in
bytes (by the total length each message declares, reserved at its first frame;
in memory, then in a spool the caller provides) and in age. A new message that
does not fit is refused (senders that resend) or pushes out the oldest
(broadcasts), see :class:`WhenFull`; every message let go is counted by cause,
logged and handed back with its tags. It does no I/O and never raises anything
but :class:`RemoteProtocolError` for a frame; the clock is passed in.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import struct
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Generic, Protocol, TypeVar

from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

__all__ = [
    "CHUNK_HEADER_SIZE",
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "ChunkFrame",
    "DropCause",
    "Reassembler",
    "Released",
    "Spool",
    "WhenFull",
    "Whole",
    "is_chunk",
    "iter_frames",
    "message_id",
    "split_payload",
]

CHUNK_MAGIC: Final = b"MFLC"
CHUNK_VERSION: Final = 1
CHUNK_HEADER_SIZE: Final = 44
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
MIN_CHUNK_SIZE: Final = CHUNK_HEADER_SIZE + 20
"""The smallest frame size that still carries payload (tests use small sizes)."""

T = TypeVar("T")
log = logging.getLogger("maskfl.chunking")

_HEADER = struct.Struct("<4sB3s16sQIII")
assert _HEADER.size == CHUNK_HEADER_SIZE


def message_id(payload: bytes | memoryview) -> bytes:
    """The 16-byte id of a payload: the first half of its SHA-256."""
    return hashlib.sha256(payload).digest()[:16]


def is_chunk(data: bytes | memoryview) -> bool:
    """True when ``data`` starts like a chunk frame (and so is not a whole message)."""
    return bytes(data[:4]) == CHUNK_MAGIC


def split_payload(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """``[payload]`` when it fits in ``chunk_size`` bytes, else frames of at most that size."""
    return list(iter_frames(payload, chunk_size))


def iter_frames(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """The frames of :func:`split_payload` one at a time, so a sender of a large payload
    holds one frame more than the payload, not a second copy of it (checks first)."""
    if chunk_size < MIN_CHUNK_SIZE or chunk_size > 2**32 - 1 + CHUNK_HEADER_SIZE:
        raise LocalProtocolError(
            f"chunk size {chunk_size} is outside [{MIN_CHUNK_SIZE}, 2^32 + {CHUNK_HEADER_SIZE})"
        )
    total = len(payload)
    if total <= chunk_size:
        return iter([payload])
    part = chunk_size - CHUNK_HEADER_SIZE
    count = -(-total // part)
    if count > 2**32 - 1:
        raise LocalProtocolError(f"{total} bytes need more than 2^32 frames of {part}")
    return _frames(payload, total, part, count)


def _frames(payload: bytes, total: int, part: int, count: int) -> Iterator[bytes]:
    ident = message_id(payload)
    view = memoryview(payload)
    for index in range(count):
        header = _HEADER.pack(
            CHUNK_MAGIC, CHUNK_VERSION, bytes(3), ident, total, part, index, count
        )
        yield header + view[index * part : (index + 1) * part]


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """A parsed chunk frame header; ``data`` views the frame's payload bytes."""

    message_id: bytes
    total: int
    part_size: int
    index: int
    count: int
    data: memoryview

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> ChunkFrame:
        """Parse and check one frame's own consistency (MALFORMED otherwise)."""
        view = memoryview(frame).cast("B")
        if len(view) < CHUNK_HEADER_SIZE:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk frame of {len(view)} bytes")
        magic, version, reserved, ident, total, part, index, count = _HEADER.unpack_from(view)
        if magic != CHUNK_MAGIC:
            raise RemoteProtocolError(Reason.MALFORMED, "not a chunk frame")
        if version != CHUNK_VERSION:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk format {version} is not supported")
        if reserved != bytes(3):
            raise RemoteProtocolError(Reason.MALFORMED, "chunk reserved bytes are not zero")
        if part == 0 or total == 0:
            raise RemoteProtocolError(Reason.MALFORMED, "chunk part size or total is zero")
        if count != -(-total // part):
            raise RemoteProtocolError(
                Reason.MALFORMED, f"chunk count {count} does not match {total} / {part}"
            )
        if index >= count:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk index {index} of {count}")
        expected = min(part, total - index * part)
        data = view[CHUNK_HEADER_SIZE:]
        if len(data) != expected:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"chunk {index} of {count} carries {len(data)} bytes, expected {expected}",
            )
        return cls(ident, total, part, index, count, data)


class WhenFull(StrEnum):
    """What a :class:`Reassembler` does with a new message that finds no room."""

    REFUSE = "refuse"
    """Refuse the new message; admitted ones stay and complete. For receivers whose
    senders resend what got no answer (the coordinator's uploads: a participant
    publishes again when no receipt comes). Evicting instead livelocks: with more
    uploads at once than room, each new one evicts an older one and none completes
    (issue 13: 200 uploads of 4 MB against 512 MiB completed nothing)."""
    EVICT_OLDEST = "evict_oldest"
    """Drop the oldest partials until the new message fits. For receivers of
    broadcasts that nobody resends (a device's retained round, dictionaries and
    model): the newest message is the one that matters."""


class DropCause(StrEnum):
    """Why a message left a :class:`Reassembler` without completing."""

    EXPIRED = "expired"
    """No frame completed it within ``max_age_s`` of its first (the sender is gone)."""
    SUPERSEDED = "superseded"
    """Its sender (key) started more than ``max_per_key`` other messages since."""
    EVICTED = "evicted"
    """A newer message needed its room (:attr:`WhenFull.EVICT_OLDEST` only)."""
    SPOOL_FAILED = "spool_failed"
    """Writing a frame to the spool or reading the message back failed."""
    REFUSED = "refused"
    """A new message found no room and was never admitted (:attr:`WhenFull.REFUSE`)."""
    MISMATCHED = "mismatched"
    """Its frames joined to a payload whose SHA-256 is not its id (``check_id``)."""


class Spool(Protocol):
    """Where a :class:`Reassembler` keeps the frames of messages that do not fit in
    memory: the caller's storage (the reassembler does no I/O of its own). Each
    partial message gets its own ``name``; methods may raise :class:`OSError`."""

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None: ...

    def read(self, name: str) -> bytes: ...

    def remove(self, name: str) -> None:
        """Forget ``name`` (never raises)."""


@dataclass(frozen=True, slots=True)
class Whole(Generic[T]):
    """A reassembled payload and the tags of every frame fed for it (duplicates too)."""

    payload: bytes
    tags: tuple[T, ...]


@dataclass(frozen=True, slots=True)
class Released(Generic[T]):
    """Frames a :class:`Reassembler` let go without completing their message: an
    admitted partial dropped, or the frame(s) of a refused message (``counted`` is
    False for the later frames of a message refused, and counted, at its first)."""

    key: Hashable
    cause: DropCause
    frames: int
    count: int
    total: int
    tags: tuple[T, ...]
    counted: bool = True


@dataclass(slots=True)
class _Partial(Generic[T]):
    total: int
    part_size: int
    count: int
    started_at: float
    spool: str | None = None
    """Its name in the spool; None while its frames stay in memory."""
    parts: dict[int, bytes | memoryview] = field(default_factory=dict)
    have: set[int] = field(default_factory=set)
    tags: list[T] = field(default_factory=list)


class Reassembler(Generic[T]):
    """Collects chunk frames per ``(key, message id)`` and returns whole payloads.

    ``key`` separates senders (use the topic: it ends with the device id), so
    one sender cannot complete or disturb another's message. Bounds:

    - ``max_messages`` partial messages at once, ``max_per_key`` of them per key
      (more from one key: its oldest is dropped as ``superseded``),
    - ``max_bytes`` reserved in memory (each partial reserves its declared total
      at its first frame), then ``spool_max_bytes`` in the ``spool`` when one is
      given; a total above both is ``OVERSIZE``,
    - ``max_age_s`` from the first frame; older partials are dropped as ``expired``.

    A new message that does not fit is refused or makes room, as ``when_full``
    says. Every message that leaves without completing is counted by cause in
    :attr:`dropped`, logged, and handed to ``on_release`` with its tags (the
    caller's handles of the frames, e.g. deliveries to acknowledge), so nothing
    is dropped silently. A duplicate frame (MQTT redelivery) keeps the first
    copy's data and adds its tag. Frame data stays a view of ``data`` when that
    is ``bytes`` (one copy, at the join). With ``check_id`` a payload whose
    SHA-256 does not start with its id is ``MALFORMED``; a caller that verifies
    the payload anyway (a signed message's body digest) may skip that pass.

    :meth:`feed` raises only :class:`RemoteProtocolError`, for the frame it was
    given: its tag is not kept, so the caller settles it (the other frames of a
    ``mismatched`` message are released first).
    """

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        max_age_s: float,
        *,
        max_per_key: int = 2,
        when_full: WhenFull = WhenFull.EVICT_OLDEST,
        spool: Spool | None = None,
        spool_max_bytes: int = 0,
        check_id: bool = True,
        on_release: Callable[[Released[T]], None] | None = None,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or max_age_s <= 0 or max_per_key < 1:
            raise LocalProtocolError("reassembler bounds must be positive")
        self.max_messages = max_messages
        self.max_per_key = max_per_key
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.when_full = when_full
        self.spool = spool
        self.spool_max_bytes = spool_max_bytes if spool is not None else 0
        self.check_id = check_id
        self._on_release = on_release
        self._partials: dict[tuple[Hashable, bytes], _Partial[T]] = {}
        self._refused: dict[tuple[Hashable, bytes], float] = {}
        self._reserved = 0
        self._spooled = 0
        self._names = itertools.count()
        self.spooled_peak = 0
        self.dropped: collections.Counter[DropCause] = collections.Counter()
        """Messages that left without completing, by cause (refused ones included)."""

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
        """Admitted partial messages dropped before completion (every cause but refusal)."""
        return sum(n for cause, n in self.dropped.items() if cause is not DropCause.REFUSED)

    @property
    def held(self) -> int:
        """Tags held by partial messages (e.g. deliveries not yet acknowledged)."""
        return sum(len(p.tags) for p in self._partials.values())

    def status(self) -> dict[str, int]:
        """Gauges and counts (the coordinator's ``/status`` shows them as ``reassembly``)."""
        return {
            "pending": self.pending_messages,
            "bytes": self._reserved,
            "spooled": self._spooled,
            "spooled_peak": self.spooled_peak,
            "evicted": self.evicted,
            "refused": self.dropped[DropCause.REFUSED],
            **{f"dropped_{cause}": n for cause, n in sorted(self.dropped.items())},
        }

    def _release(self, released: Released[T]) -> None:
        if released.counted:
            self.dropped[released.cause] += 1
        if self._on_release is not None:
            self._on_release(released)

    def _remove(self, slot: tuple[Hashable, bytes]) -> _Partial[T]:
        partial = self._partials.pop(slot)
        if partial.spool is None:
            self._reserved -= partial.total
        else:
            self._spooled -= partial.total
            assert self.spool is not None
            self.spool.remove(partial.spool)
        return partial

    def _drop(self, slot: tuple[Hashable, bytes], cause: DropCause) -> None:
        partial = self._remove(slot)
        log.warning(
            "dropped a partial chunked message on %s (%d of %d frames, %d bytes): %s",
            slot[0],
            len(partial.have),
            partial.count,
            partial.total,
            cause.value,
            extra={"topic": str(slot[0]), "cause": cause.value},
        )
        self._release(
            Released(
                slot[0], cause, len(partial.have), partial.count, partial.total, tuple(partial.tags)
            )
        )

    def expire(self, now: float) -> None:
        """Drop partials older than ``max_age_s`` (and forget refusals as old)."""
        for slot in [s for s, p in self._partials.items() if now - p.started_at > self.max_age_s]:
            self._drop(slot, DropCause.EXPIRED)
        for slot in [s for s, t in self._refused.items() if now - t > self.max_age_s]:
            del self._refused[slot]

    def _room(self, total: int) -> str | None:
        """``"memory"`` or ``"spool"`` when a new message of ``total`` bytes fits there."""
        if len(self._partials) >= self.max_messages:
            return None
        if self._reserved + total <= self.max_bytes:
            return "memory"
        if self.spool is not None and self._spooled + total <= self.spool_max_bytes:
            return "spool"
        return None

    def _admit(
        self, slot: tuple[Hashable, bytes], frame: ChunkFrame, now: float, tag: T | None
    ) -> _Partial[T] | None:
        """A new partial for ``frame``'s message, or None when it is refused."""
        own = [s for s in self._partials if s[0] == slot[0]]
        for old in own[: max(0, len(own) - self.max_per_key + 1)]:
            self._drop(old, DropCause.SUPERSEDED)
        where = self._room(frame.total)
        while where is None and self.when_full is WhenFull.EVICT_OLDEST and self._partials:
            self._drop(next(iter(self._partials)), DropCause.EVICTED)  # dicts keep order
            where = self._room(frame.total)
        if where is None:
            if len(self._refused) >= 4 * self.max_messages:
                del self._refused[next(iter(self._refused))]
            self._refused[slot] = now
            log.warning(
                "refused a chunked message of %d bytes on %s: %d partial messages hold %d "
                "bytes in memory (at most %d) and %d in the spool (at most %d); its sender "
                "must send it again",
                frame.total,
                slot[0],
                len(self._partials),
                self._reserved,
                self.max_bytes,
                self._spooled,
                self.spool_max_bytes,
                extra={"topic": str(slot[0]), "cause": DropCause.REFUSED.value},
            )
            self._release(
                Released(slot[0], DropCause.REFUSED, 0, frame.count, frame.total, _tags(tag))
            )
            return None
        partial: _Partial[T] = _Partial(frame.total, frame.part_size, frame.count, now)
        if where == "memory":
            self._reserved += frame.total
        else:
            partial.spool = f"{next(self._names):016x}"
            self._spooled += frame.total
            self.spooled_peak = max(self.spooled_peak, self._spooled)
        self._partials[slot] = partial
        return partial

    def _keep(
        self,
        slot: tuple[Hashable, bytes],
        partial: _Partial[T],
        frame: ChunkFrame,
        data: bytes | memoryview,
    ) -> bool:
        """Keep one frame's data; False when the spool failed (the partial is dropped)."""
        if partial.spool is None:
            # a view keeps an immutable frame alive instead of copying its data
            partial.parts[frame.index] = (
                frame.data if isinstance(data, bytes) else bytes(frame.data)
            )
            return True
        assert self.spool is not None
        try:
            self.spool.write(partial.spool, frame.index * partial.part_size, frame.data)
        except OSError as exc:
            log.error("cannot write to the reassembly spool (%s): %s", partial.spool, exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return False
        return True

    def _payload(self, slot: tuple[Hashable, bytes], partial: _Partial[T]) -> bytes | None:
        if partial.spool is None:
            return b"".join([partial.parts[i] for i in range(partial.count)])
        assert self.spool is not None
        try:
            payload = self.spool.read(partial.spool)
            if len(payload) != partial.total:
                raise OSError(f"{len(payload)} of {partial.total} bytes")
        except OSError as exc:
            log.error("cannot read back a spooled message on %s: %s", slot[0], exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return None
        return payload

    def feed(
        self, key: Hashable, data: bytes | memoryview, now: float, tag: T | None = None
    ) -> Whole[T] | None:
        """Add one frame (and its ``tag``); the whole payload once its last frame came.

        None while the message is partial, or when this frame was let go (its
        message refused, or the spool failed): then ``on_release`` had its tag.
        """
        frame = ChunkFrame.parse(data)
        if frame.total > max(self.max_bytes, self.spool_max_bytes):
            raise RemoteProtocolError(
                Reason.OVERSIZE,
                f"chunked message of {frame.total} bytes, at most "
                f"{max(self.max_bytes, self.spool_max_bytes)}",
            )
        slot = (key, frame.message_id)
        partial = self._partials.get(slot)
        if partial is not None and (frame.total, frame.part_size, frame.count) != (
            partial.total,
            partial.part_size,
            partial.count,
        ):
            raise RemoteProtocolError(
                Reason.MALFORMED, "chunk disagrees with earlier chunks on total, size or count"
            )
        self.expire(now)
        partial = self._partials.get(slot)
        if partial is None:
            if slot in self._refused and frame.index != 0:
                # the rest of a refused message: let go, counted at its refusal
                self._release(
                    Released(key, DropCause.REFUSED, 0, frame.count, frame.total, _tags(tag), False)
                )
                return None
            self._refused.pop(slot, None)  # a resend starts again from its first frame
            partial = self._admit(slot, frame, now, tag)
            if partial is None:
                return None
        if tag is not None:
            partial.tags.append(tag)
        if frame.index not in partial.have:
            if not self._keep(slot, partial, frame, data):
                return None
            partial.have.add(frame.index)
        if len(partial.have) < partial.count:
            return None
        payload = self._payload(slot, partial)
        if payload is None:
            return None
        self._remove(slot)
        if self.check_id and message_id(payload) != frame.message_id:
            others = partial.tags[:-1] if tag is not None else partial.tags
            self._release(
                Released(
                    key,
                    DropCause.MISMATCHED,
                    partial.count,
                    partial.count,
                    partial.total,
                    tuple(others),
                )
            )
            raise RemoteProtocolError(
                Reason.MALFORMED, "reassembled payload does not match its message id"
            )
        return Whole(payload, tuple(partial.tags))


def _tags(tag: T | None) -> tuple[T, ...]:
    return () if tag is None else (tag,)
