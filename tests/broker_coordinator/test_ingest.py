"""Chunk reassembly with held deliveries: bounds, eviction acks, any frame order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.broker_coordinator.ingest import ChunkTracker
from maskfl.protocol.chunking import CHUNK_HEADER_SIZE, ChunkFrame, split_payload
from maskfl.protocol.errors import Reason, RemoteProtocolError
from maskfl.transport import Message


class Acks:
    def __init__(self) -> None:
        self.mids: list[int] = []

    def __call__(self, message: Message) -> None:
        assert message.payload == b""  # held deliveries keep no payload
        self.mids.append(message.mid)


def _feed(tracker: ChunkTracker, key: str, frames: list[bytes], mid0: int, now: float = 0.0):  # type: ignore[no-untyped-def]
    out = None
    for i, frame in enumerate(frames):
        msg = Message(key, frame, qos=1, mid=mid0 + i)
        out = tracker.feed(key, msg, ChunkFrame.parse(frame), now)
    return out


@settings(max_examples=40, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=3000),
    part=st.integers(min_value=20, max_value=400),
    seed=st.integers(0, 2**32 - 1),
    dup=st.booleans(),
)
def test_any_order_and_duplicates_reassemble(
    payload: bytes, part: int, seed: int, dup: bool
) -> None:
    payload = payload + b"x" * (CHUNK_HEADER_SIZE + part + 1)  # always at least two frames
    frames = split_payload(payload, CHUNK_HEADER_SIZE + part)
    order = frames + (frames[:1] if dup else [])
    random.Random(seed).shuffle(order)
    acks = Acks()
    tracker = ChunkTracker(acks, max_messages=4, max_bytes=1 << 20, max_age_s=60)
    fed: list[int] = []
    result = None
    for i, frame in enumerate(order):
        fed.append(i + 1)
        out = tracker.feed("t", Message("t", frame, qos=1, mid=i + 1), ChunkFrame.parse(frame), 0.0)
        if out is not None:
            result = out
            break
    assert result is not None and result[0] == payload
    assert sorted(d.mid for d in result[1]) == fed  # every delivery, duplicates too, acked later
    assert acks.mids == [] and tracker.held == 0


def test_bounds_evict_oldest_and_ack_their_frames() -> None:
    acks = Acks()
    tracker = ChunkTracker(acks, max_messages=2, max_bytes=1 << 20, max_age_s=60, max_per_key=2)
    parts = [split_payload(bytes([k]) * 500, CHUNK_HEADER_SIZE + 100) for k in range(3)]
    assert _feed(tracker, "a", parts[0][:2], 10) is None
    assert _feed(tracker, "b", parts[1][:2], 20) is None
    assert tracker.held == 4 and acks.mids == []
    assert _feed(tracker, "c", parts[2][:1], 30) is None  # evicts "a", the oldest
    assert sorted(acks.mids) == [10, 11]
    assert tracker.pending_messages == 2 and tracker.held == 3


def test_per_key_limit_and_expiry() -> None:
    acks = Acks()
    tracker = ChunkTracker(acks, max_messages=10, max_bytes=1 << 20, max_age_s=5, max_per_key=1)
    one = split_payload(b"1" * 500, CHUNK_HEADER_SIZE + 100)
    two = split_payload(b"2" * 500, CHUNK_HEADER_SIZE + 100)
    _feed(tracker, "k", one[:1], 1)
    _feed(tracker, "k", two[:1], 2)  # the same sender starts another: the first goes
    assert acks.mids == [1]
    tracker.expire(100.0)
    assert acks.mids == [1, 2] and tracker.pending_messages == 0 and tracker.reserved_bytes == 0


def test_inconsistent_and_oversize_frames_are_rejected() -> None:
    acks = Acks()
    tracker = ChunkTracker(acks, max_messages=10, max_bytes=2000, max_age_s=60)
    big = split_payload(b"x" * 5000, CHUNK_HEADER_SIZE + 1000)
    with pytest.raises(RemoteProtocolError) as err:
        _feed(tracker, "k", big[:1], 1)
    assert err.value.reason is Reason.OVERSIZE
    a = split_payload(b"a" * 900, CHUNK_HEADER_SIZE + 300)
    _feed(tracker, "k", a[:1], 1)
    forged = bytearray(a[1])
    forged[32:36] = (200).to_bytes(4, "little")  # another part size, same message id
    with pytest.raises(RemoteProtocolError):
        tracker.feed(
            "k", Message("k", bytes(forged), qos=1, mid=9), ChunkFrame.parse(bytes(forged)), 0
        )
