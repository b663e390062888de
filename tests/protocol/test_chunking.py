"""Chunk frames and the bounded reassembler."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.chunking import (
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ChunkFrame,
    is_chunk,
    message_id,
    split_payload,
)
from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from maskfl.protocol.reassembly import Reassembler
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
