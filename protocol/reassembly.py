"""Chunk frames back into payloads: the one reassembler of maskfl (the coordinator's
uploads, a device's broadcasts, the tools), bounded, sans-IO; see :class:`Reassembler`.
Frames are parsed by :class:`maskfl.protocol.chunking.ChunkFrame`.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from maskfl.protocol.chunking import ChunkFrame, message_id
from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

__all__ = ["DropCause", "Reassembler", "Released", "Spool", "WhenFull", "Whole"]

T = TypeVar("T")
log = logging.getLogger("maskfl.chunking")


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


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.restype = ctypes.c_void_p
_bytes_data.argtypes = (ctypes.py_object,)


class _Payload:
    """A message's payload filled frame by frame: a ``bytes`` object of its total size,
    created empty by ``PyBytes_FromStringAndSize(NULL, size)``, the one case where the
    C API lets its contents be written; nothing else sees it until every byte is in.

    Each frame is copied in as it comes and can be freed at once, so a message in
    memory takes its size once: holding the frames and joining them at the end took
    twice its size while it was joined (a model's worth more at the peak).
    """

    __slots__ = ("_view", "data")

    def __init__(self, size: int) -> None:
        self.data: bytes = _new_bytes(None, size)
        address = _bytes_data(self.data)
        assert address is not None
        self._view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._view[offset : offset + len(data)] = data

    def done(self) -> bytes:
        """The payload (every byte written), no longer writable."""
        self._view.release()
        return self.data


@dataclass(slots=True)
class _Partial(Generic[T]):
    total: int
    part_size: int
    count: int
    started_at: float
    spool: str | None = None
    """Its name in the spool; None while it is in memory, in ``payload``."""
    payload: _Payload | None = None
    have: set[int] = field(default_factory=set)
    tags: list[T] = field(default_factory=list)


class Reassembler(Generic[T]):
    """Collects chunk frames per ``(key, message id)`` and returns whole payloads.

    ``key`` separates senders (use the topic: it ends with the device id), so
    one sender cannot complete or disturb another's message. Bounds:

    - ``max_messages`` partial messages at once, ``max_per_key`` of them per key
      (more from one key: its oldest is dropped as ``superseded``),
    - ``max_bytes`` reserved in memory (each partial reserves its declared total
      at its first frame; ``held_elsewhere()``, the bytes its caller holds beside
      them, counts against it too), then ``spool_max_bytes`` in the ``spool`` when
      one is given; a total above both is ``OVERSIZE``,
    - ``max_age_s`` from the first frame; older partials are dropped as ``expired``.

    A new message that does not fit is refused or makes room, as ``when_full``
    says. Every message that leaves without completing is counted by cause in
    :attr:`dropped`, logged, and handed to ``on_release`` with its tags (the
    caller's handles of the frames, e.g. deliveries to acknowledge), so nothing
    is dropped silently. A duplicate frame (MQTT redelivery) keeps the first
    copy's data and adds its tag. A message in memory is its payload, filled as
    frames come (one copy of each frame, which is not kept): it never takes its
    size twice. With ``check_id`` a payload whose
    SHA-256 does not start with its id is ``MALFORMED``; a caller that verifies
    the payload anyway (a signed message's body digest) may skip that pass.

    :meth:`feed` raises only :class:`RemoteProtocolError`, for the frame it was given,
    whose tag the caller settles (a ``mismatched`` message's others are released).
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
        held_elsewhere: Callable[[], int] | None = None,
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
        self._held_elsewhere = held_elsewhere
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
        elsewhere = 0 if self._held_elsewhere is None else self._held_elsewhere()
        if self._reserved + elsewhere + total <= self.max_bytes:
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
            partial.payload = _Payload(frame.total)
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
    ) -> bool:
        """Keep one frame's data; False when the spool failed (the partial is dropped)."""
        if partial.payload is not None:
            partial.payload.write(frame.index * partial.part_size, frame.data)
            return True
        assert self.spool is not None and partial.spool is not None
        try:
            self.spool.write(partial.spool, frame.index * partial.part_size, frame.data)
        except OSError as exc:
            log.error("cannot write to the reassembly spool (%s): %s", partial.spool, exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return False
        return True

    def _payload(self, slot: tuple[Hashable, bytes], partial: _Partial[T]) -> bytes | None:
        if partial.payload is not None:
            return partial.payload.done()
        assert self.spool is not None and partial.spool is not None
        try:
            payload = self.spool.read(partial.spool)
            if len(payload) != partial.total:
                raise OSError(f"{len(payload)} of {partial.total} bytes")
        except OSError as exc:
            log.error("cannot read back a spooled message on %s: %s", slot[0], exc)
            self._drop(slot, DropCause.SPOOL_FAILED)
            return None
        return payload

    def completes_spooled(self, key: Hashable, frame: ChunkFrame) -> int:
        """The bytes that feeding ``frame`` will read back from the spool into memory:
        its message's total when it is the last missing frame of a spooled message,
        else 0 (a caller that bounds its memory makes room first)."""
        partial = self._partials.get((key, frame.message_id))
        if (
            partial is None
            or partial.spool is None
            or frame.index in partial.have
            or len(partial.have) != partial.count - 1
        ):
            return 0
        return partial.total

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
            if not self._keep(slot, partial, frame):
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
