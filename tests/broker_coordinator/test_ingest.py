"""Chunk reassembly with held deliveries: admission (never eviction for another upload),
the spool, drops counted by cause, any frame order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.broker_coordinator.ingest import FileSpool, _light
from maskfl.protocol.chunking import CHUNK_HEADER_SIZE, split_payload
from maskfl.protocol.errors import Reason, RemoteProtocolError
from maskfl.protocol.reassembly import Reassembler, Released, WhenFull, Whole
from maskfl.transport import Message


class Acks:
    def __init__(self) -> None:
        self.mids: list[int] = []

    def __call__(self, message: Message) -> None:
        assert message.payload == b""  # held deliveries keep no payload
        self.mids.append(message.mid)


def _tracker(
    acks: Acks,
    *,
    max_messages: int,
    max_bytes: int,
    max_age_s: float,
    max_per_key: int = 2,
    spool_dir: Path | None = None,
    spool_max_bytes: int = 0,
    drops: list[str] | None = None,
) -> Reassembler[Message]:
    """The reassembler as Ingest configures it: refuse when full, the file spool, no id
    hash, released deliveries acked and counted drops recorded."""

    def released(r: Released[Message]) -> None:
        for delivery in r.tags:
            acks(delivery)
        if r.counted and drops is not None:
            drops.append(r.cause.value)

    return Reassembler(
        max_messages,
        max_bytes,
        max_age_s,
        max_per_key=max_per_key,
        when_full=WhenFull.REFUSE,
        spool=None if spool_dir is None else FileSpool(spool_dir),
        spool_max_bytes=spool_max_bytes,
        check_id=False,
        on_release=released,
    )


def _one(
    tracker: Reassembler[Message], key: str, frame: bytes, mid: int, now: float = 0.0
) -> Whole[Message] | None:
    return tracker.feed(key, frame, now, _light(Message(key, frame, qos=1, mid=mid)))


def _feed(
    tracker: Reassembler[Message], key: str, frames: list[bytes], mid0: int, now: float = 0.0
) -> Whole[Message] | None:
    out = None
    for i, frame in enumerate(frames):
        out = _one(tracker, key, frame, mid0 + i, now)
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
    tracker = _tracker(acks, max_messages=4, max_bytes=1 << 20, max_age_s=60)
    fed: list[int] = []
    result = None
    for i, frame in enumerate(order):
        fed.append(i + 1)
        out = _one(tracker, "t", frame, i + 1)
        if out is not None:
            result = out
            break
    assert result is not None and result.payload == payload
    assert sorted(d.mid for d in result.tags) == fed  # every delivery, duplicates too, acked later
    assert acks.mids == [] and tracker.held == 0


def test_a_full_reassembler_refuses_new_messages_and_keeps_admitted_ones() -> None:
    acks = Acks()
    drops: list[str] = []
    tracker = _tracker(acks, max_messages=2, max_bytes=1 << 20, max_age_s=60, drops=drops)
    parts = [split_payload(bytes([k]) * 500, CHUNK_HEADER_SIZE + 100) for k in range(3)]
    assert _feed(tracker, "a", parts[0][:2], 10) is None
    assert _feed(tracker, "b", parts[1][:2], 20) is None
    assert tracker.held == 4 and acks.mids == []
    assert _feed(tracker, "c", parts[2][:2], 30) is None  # no room: "c" is refused, not "a"
    assert acks.mids == [30, 31] and drops == ["refused"]
    assert tracker.pending_messages == 2 and tracker.held == 4 and tracker.evicted == 0
    done = _feed(tracker, "a", parts[0][2:], 12)
    assert done is not None and done.payload == bytes([0]) * 500
    assert _feed(tracker, "c", parts[2][2:3], 32) is None  # the rest of the refused one: acked
    assert acks.mids == [30, 31, 32]
    resent = _feed(tracker, "c", parts[2], 40)  # its sender publishes it again: admitted
    assert resent is not None and resent.payload == bytes([2]) * 500
    assert drops == ["refused"] and tracker.evicted == 0


def test_uploads_beyond_memory_go_to_the_spool(tmp_path: Path) -> None:
    acks = Acks()
    spool = tmp_path / "spool"
    tracker = _tracker(
        acks,
        max_messages=100,
        max_bytes=1200,
        max_age_s=60,
        spool_dir=spool,
        spool_max_bytes=5000,
    )
    payloads = [bytes(range(k, k + 250)) * 2 for k in range(6)]  # 500 bytes each
    frames = [split_payload(p, CHUNK_HEADER_SIZE + 120) for p in payloads]
    done: dict[bytes, list[int]] = {}
    mid = 0
    for index in range(len(frames[0])):  # the worst order: every upload started at once
        for k, fs in enumerate(frames):
            mid += 1
            out = _one(tracker, f"t{k}", fs[index], mid)
            if out is not None:
                done[out.payload] = sorted(d.mid for d in out.tags)
        if index == 0:
            assert tracker.reserved_bytes == 1000 and tracker.spooled_bytes == 2000
            assert len(list(spool.iterdir())) == 4
    assert set(done) == set(payloads) and acks.mids == [] and tracker.evicted == 0
    assert tracker.spooled_bytes == 0 and list(spool.iterdir()) == []


def test_many_concurrent_uploads_make_progress() -> None:
    """The livelock of issue 13: 300 uploads of 40 frames, room for 134 at a time, every
    upload started before any finished. The old policy evicted the oldest partial for
    each new one and completed none; now each wave completes what it admitted and the
    refused senders' resends complete in the next."""
    acks = Acks()
    size, part = 4000, 100
    tracker = _tracker(acks, max_messages=4096, max_bytes=134 * size, max_age_s=600)
    frames = {
        k: split_payload(k.to_bytes(2, "big") * (size // 2), CHUNK_HEADER_SIZE + part)
        for k in range(300)
    }
    pending = set(frames)
    waves = 0
    mid = 0
    while pending and waves < 5:
        waves += 1
        for index in range(size // part):
            for k in sorted(pending):
                mid += 1
                frame = frames[k][index]
                out = _one(tracker, str(k), frame, mid)
                if out is not None:
                    assert out.payload == frames[k][0][CHUNK_HEADER_SIZE:] + b"".join(
                        f[CHUNK_HEADER_SIZE:] for f in frames[k][1:]
                    )
                    pending.discard(k)
    assert not pending and waves == 3  # 134 + 134 + 32
    assert tracker.evicted == 0 and tracker.dropped["refused"] == 166 + 32
    assert tracker.pending_messages == 0 and tracker.held == 0


def test_per_key_limit_and_expiry_are_counted_by_cause() -> None:
    acks = Acks()
    drops: list[str] = []
    tracker = _tracker(
        acks, max_messages=10, max_bytes=1 << 20, max_age_s=5, max_per_key=1, drops=drops
    )
    one = split_payload(b"1" * 500, CHUNK_HEADER_SIZE + 100)
    two = split_payload(b"2" * 500, CHUNK_HEADER_SIZE + 100)
    _feed(tracker, "k", one[:1], 1)
    _feed(tracker, "k", two[:1], 2)  # the same sender starts another: the first goes
    assert acks.mids == [1] and drops == ["superseded"]
    tracker.expire(100.0)
    assert acks.mids == [1, 2] and tracker.pending_messages == 0 and tracker.reserved_bytes == 0
    assert drops == ["superseded", "expired"] and tracker.evicted == 2


def test_inconsistent_and_oversize_frames_are_rejected() -> None:
    acks = Acks()
    tracker = _tracker(acks, max_messages=10, max_bytes=2000, max_age_s=60)
    big = split_payload(b"x" * 5000, CHUNK_HEADER_SIZE + 1000)
    with pytest.raises(RemoteProtocolError) as err:
        _feed(tracker, "k", big[:1], 1)
    assert err.value.reason is Reason.OVERSIZE
    a = split_payload(b"a" * 900, CHUNK_HEADER_SIZE + 300)
    _feed(tracker, "k", a[:1], 1)
    forged = bytearray(a[1])
    forged[32:36] = (200).to_bytes(4, "little")  # another part size, same message id
    with pytest.raises(RemoteProtocolError):
        _one(tracker, "k", bytes(forged), 9)
