"""Chunk frames and the bounded reassembler."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.chunking import (
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ChunkFrame,
    DropCause,
    Reassembler,
    Released,
    WhenFull,
    is_chunk,
    message_id,
    split_payload,
)
from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from tests.protocol.wire_samples import bodies, sign, sum_message


def big_reassembler() -> Reassembler[None]:
    return Reassembler(max_messages=16, max_bytes=1 << 20, max_age_s=60.0)


def feed_all(
    r: Reassembler[None], key: object, frames: list[bytes], now: float = 0.0
) -> bytes | None:
    result = None
    for frame in frames:
        out = r.feed(key, frame, now)  # type: ignore[arg-type]
        if out is not None:
            assert result is None
            result = out.payload
    return result


@settings(max_examples=80, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=3000),
    chunk_size=st.integers(MIN_CHUNK_SIZE, 600),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(0, 1000), max_size=5),
)
def test_split_and_reassemble_in_any_order(
    *, payload: bytes, chunk_size: int, order: object, duplicates: list[int]
) -> None:
    frames = split_payload(payload, chunk_size)
    assert all(len(f) <= chunk_size for f in frames)
    if len(payload) <= chunk_size:
        assert frames == [payload]
        return
    assert all(is_chunk(f) for f in frames)
    shuffled = list(frames)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    # redelivered frames (MQTT QoS 1) are harmless, also after the message completed
    for d in duplicates:
        shuffled.insert(d % len(shuffled), shuffled[d % len(shuffled)])
    r = big_reassembler()
    assert feed_all(r, "topic", shuffled) == payload


def test_frame_layout() -> None:
    payload = bytes(range(100))
    frames = split_payload(payload, 84)
    assert len(frames) == 3
    frame = ChunkFrame.parse(frames[2])
    assert frame.message_id == message_id(payload)
    assert (frame.total, frame.part_size, frame.index, frame.count) == (100, 40, 2, 3)
    assert bytes(frame.data) == payload[80:]
    assert frames[0][:8] == b"MFLC\x01\x00\x00\x00"


def test_messages_are_not_chunks() -> None:
    assert not is_chunk(sum_message())
    assert not is_chunk(b"")


def test_split_rejects_bad_chunk_sizes() -> None:
    with pytest.raises(LocalProtocolError):
        split_payload(b"x" * 1000, MIN_CHUNK_SIZE - 1)
    assert split_payload(b"x" * DEFAULT_CHUNK_SIZE) == [b"x" * DEFAULT_CHUNK_SIZE]
    assert len(split_payload(b"x" * (DEFAULT_CHUNK_SIZE + 1))) == 2


def test_signed_message_survives_chunking() -> None:
    body, ident = bodies()["update"]
    raw = sign(body, ident)
    frames = split_payload(raw, 128)
    assert feed_all(big_reassembler(), "t", frames) == raw


def reject(
    r: Reassembler[None], frame: bytes, reason: Reason, key: str = "t", now: float = 0.0
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        r.feed(key, frame, now)
    assert info.value.reason == reason, str(info.value)


def edit(frame: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_inconsistent_frames_are_malformed() -> None:
    frames = split_payload(bytes(range(200)), 84)  # part 40, 5 frames
    r = big_reassembler()
    first = frames[0]
    reject(r, first[: CHUNK_HEADER_SIZE - 1], Reason.MALFORMED)
    reject(r, b"MFLM" + first[4:], Reason.MALFORMED)
    reject(r, edit(first, "<B", 4, 2), Reason.MALFORMED)  # version
    reject(r, edit(first, "<B", 5, 1), Reason.MALFORMED)  # reserved
    reject(r, edit(first, "<Q", 24, 0), Reason.MALFORMED)  # total 0
    reject(r, edit(first, "<I", 32, 0), Reason.MALFORMED)  # part size 0
    reject(r, edit(first, "<I", 36, 5), Reason.MALFORMED)  # index == count
    reject(r, edit(first, "<I", 40, 6), Reason.MALFORMED)  # count != ceil(total / part)
    reject(r, first + b"\x00", Reason.MALFORMED)  # more data than the part size
    reject(r, frames[-1][:-1], Reason.MALFORMED)  # last part too short
    assert r.pending_messages == 0
    # a frame that disagrees with the first one of its message
    r.feed("t", first, 0.0)
    other = edit(edit(frames[1], "<Q", 24, 240), "<I", 40, 6)
    reject(r, other, Reason.MALFORMED)


def test_payload_that_does_not_hash_to_its_id_is_dropped() -> None:
    frames = split_payload(bytes(range(200)), 84)
    corrupt = bytearray(frames[3])
    corrupt[-1] ^= 0xFF
    r = big_reassembler()
    feed_all(r, "t", frames[:3])
    r.feed("t", frames[4], 0.0)
    reject(r, bytes(corrupt), Reason.MALFORMED)
    assert r.pending_messages == 0
    assert r.reserved_bytes == 0


def test_keys_are_separate() -> None:
    frames = split_payload(bytes(range(200)), 84)
    r = big_reassembler()
    feed_all(r, "device-a", frames[:-1])
    assert r.feed("device-b", frames[-1], 0.0) is None
    assert r.pending_messages == 2
    assert feed_all(r, "device-a", frames[-1:]) == bytes(range(200))


def test_oversize_message_is_refused_at_its_first_frame() -> None:
    r: Reassembler[None] = Reassembler(max_messages=4, max_bytes=150, max_age_s=10.0)
    reject(r, split_payload(bytes(200), 84)[0], Reason.OVERSIZE)
    assert r.pending_messages == 0


def test_too_many_messages_drop_the_oldest() -> None:
    r: Reassembler[None] = Reassembler(max_messages=2, max_bytes=10_000, max_age_s=10.0)
    payloads = [bytes([i]) * 200 for i in range(3)]
    frames = [split_payload(p, 84) for p in payloads]
    r.feed("a", frames[0][0], 0.0)
    r.feed("b", frames[1][0], 1.0)
    r.feed("c", frames[2][0], 2.0)  # evicts message 0
    assert r.dropped == {DropCause.EVICTED: 1}
    assert r.pending_messages == 2
    assert feed_all(r, "b", frames[1][1:], 3.0) == payloads[1]
    assert feed_all(r, "c", frames[2][1:], 3.0) == payloads[2]
    # message 0 restarts from scratch and is incomplete without its first frame
    assert feed_all(r, "a", frames[0][1:], 3.0) is None


def test_byte_budget_drops_the_oldest() -> None:
    r: Reassembler[None] = Reassembler(max_messages=10, max_bytes=450, max_age_s=10.0)
    a, b, c = (split_payload(bytes([i]) * 200, 84) for i in range(3))
    r.feed("a", a[0], 0.0)
    r.feed("b", b[0], 0.0)
    assert r.reserved_bytes == 400
    r.feed("c", c[0], 0.0)  # 600 > 450: a goes
    assert r.reserved_bytes == 400
    assert r.dropped == {DropCause.EVICTED: 1}
    assert feed_all(r, "b", b[1:]) == bytes([1]) * 200


def test_old_partials_expire() -> None:
    r: Reassembler[None] = Reassembler(max_messages=10, max_bytes=10_000, max_age_s=5.0)
    frames = split_payload(bytes(range(200)), 84)
    r.feed("t", frames[0], 100.0)
    r.expire(104.0)
    assert r.pending_messages == 1 and not r.dropped
    assert feed_all(r, "t", frames[1:3], 105.0) is None
    assert r.feed("t", frames[3], 105.5) is None  # 5.5 s after the first: dropped first
    assert r.dropped == {DropCause.EXPIRED: 1}
    assert r.pending_messages == 1  # frame 3 started a new partial


def test_reassembler_bounds_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError):
        Reassembler(0, 10, 1.0)
    with pytest.raises(LocalProtocolError):
        Reassembler(1, 10, 0.0)


@settings(max_examples=200, deadline=None)
@given(garbage=st.lists(st.binary(max_size=120), max_size=20))
def test_garbage_frames_only_raise_remote_protocol_errors(garbage: list[bytes]) -> None:
    r: Reassembler[None] = Reassembler(max_messages=3, max_bytes=1000, max_age_s=1.0)
    for i, data in enumerate(garbage):
        frame = b"MFLC\x01\x00\x00\x00" + data if i % 2 else data
        with contextlib.suppress(RemoteProtocolError):
            r.feed("t", frame, float(i))
        assert r.reserved_bytes <= 1000
        assert r.pending_messages <= 3


def test_one_sender_cannot_push_out_the_others() -> None:
    r: Reassembler[None] = Reassembler(
        max_messages=4, max_bytes=10_000, max_age_s=10.0, max_per_key=2
    )
    honest = split_payload(bytes(range(200)), 84)
    r.feed("good", honest[0], 0.0)
    for i in range(10):
        r.feed("evil", split_payload(bytes([i]) * 200, 84)[0], 1.0 + i)
    assert r.pending_messages == 3
    assert r.dropped == {DropCause.SUPERSEDED: 8}
    assert feed_all(r, "good", honest[1:], 20.0 - 11.0) == bytes(range(200))


class _DictSpool:
    """A spool in a dict; ``fail_after`` writes it raises OSError (a full disk)."""

    def __init__(self, fail_after: int = 1 << 30) -> None:
        self.files: dict[str, bytearray] = {}
        self.fail_after = fail_after

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        self.fail_after -= 1
        if self.fail_after < 0:
            raise OSError(28, "No space left on device")
        f = self.files.setdefault(name, bytearray())
        f[offset : offset + len(data)] = data if len(f) >= offset else bytes(offset - len(f)) + data

    def read(self, name: str) -> bytes:
        return bytes(self.files[name])

    def remove(self, name: str) -> None:
        self.files.pop(name, None)


def test_refusing_reassembler_spools_then_refuses_and_releases_every_tag() -> None:
    released: list[Released[int]] = []
    spool = _DictSpool()
    r: Reassembler[int] = Reassembler(
        10,
        250,
        60.0,
        when_full=WhenFull.REFUSE,
        spool=spool,
        spool_max_bytes=250,
        on_release=released.append,
    )
    a, b, c = (split_payload(bytes([i]) * 200, 84) for i in range(3))
    assert r.feed("a", a[0], 0.0, 1) is None  # memory
    assert r.feed("b", b[0], 0.0, 2) is None  # spool
    assert r.reserved_bytes == 200 and r.spooled_bytes == 200 and len(spool.files) == 1
    assert r.feed("c", c[0], 0.0, 3) is None  # no room anywhere: refused, not evicted
    assert r.feed("c", c[1], 0.0, 4) is None  # the rest of it: let go, not counted again
    assert [(x.cause, x.tags, x.counted) for x in released] == [
        (DropCause.REFUSED, (3,), True),
        (DropCause.REFUSED, (4,), False),
    ]
    assert r.dropped == {DropCause.REFUSED: 1} and r.evicted == 0
    whole = None
    for i, frame in enumerate(b[1:]):
        whole = r.feed("b", frame, 0.0, 10 + i)
    assert (
        whole is not None
        and whole.payload == bytes([1]) * 200
        and whole.tags == (2, *range(10, 9 + len(b)))
    )
    assert r.spooled_bytes == 0 and spool.files == {} and r.spooled_peak == 200
    assert r.status()["refused"] == 1 and r.status()["dropped_refused"] == 1


def test_a_failing_spool_drops_its_message_with_every_tag() -> None:
    released: list[Released[int]] = []
    r: Reassembler[int] = Reassembler(
        10,
        1,
        60.0,
        when_full=WhenFull.REFUSE,
        spool=_DictSpool(fail_after=2),
        spool_max_bytes=1000,
        on_release=released.append,
    )
    frames = split_payload(bytes(200), 84)
    for i, frame in enumerate(frames[:3]):  # the third write fails
        assert r.feed("t", frame, 0.0, i) is None
    assert released[0].cause is DropCause.SPOOL_FAILED and released[0].tags == (0, 1, 2)
    assert r.pending_messages == 0 and r.spooled_bytes == 0 and r.evicted == 1


def test_a_mismatched_payload_releases_the_other_frames_tags() -> None:
    released: list[Released[int]] = []
    r: Reassembler[int] = Reassembler(4, 1000, 60.0, on_release=released.append)
    frames = split_payload(bytes(range(200)), 84)
    corrupt = bytearray(frames[-1])
    corrupt[-1] ^= 0xFF
    for i, frame in enumerate(frames[:-1]):
        r.feed("t", frame, 0.0, i)
    with pytest.raises(RemoteProtocolError) as err:
        r.feed("t", bytes(corrupt), 0.0, 99)  # the caller settles this frame itself
    assert err.value.reason is Reason.MALFORMED
    others = tuple(range(len(frames) - 1))
    assert [(x.cause, x.tags) for x in released] == [(DropCause.MISMATCHED, others)]
