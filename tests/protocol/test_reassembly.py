"""The reassembler: bounds, eviction or refusal when full, the spool, and every
message let go released with its tags and counted by cause."""

from __future__ import annotations

import contextlib
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.chunking import ChunkFrame, split_payload
from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from maskfl.protocol.reassembly import DropCause, Reassembler, Released, WhenFull
from tests.protocol.test_chunking import big_reassembler, feed_all, reject


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


def test_a_message_in_memory_keeps_no_frame_it_was_fed() -> None:
    """Each frame is copied into the message's payload as it comes and not kept: a
    message in memory takes its size once. Kept frames joined at the end took twice
    its size meanwhile (a model's worth more at the coordinator's peak)."""
    payload = bytes(range(256)) * 40
    frames = split_payload(payload, 1024)
    before = [sys.getrefcount(f) for f in frames]
    r = big_reassembler()
    for frame in frames[:-1]:
        assert r.feed("t", frame, 0.0) is None
    del frame
    assert [sys.getrefcount(f) for f in frames] == before  # no reference to any frame
    assert r.reserved_bytes == len(payload)
    whole = r.feed("t", frames[-1], 0.0)
    assert whole is not None and whole.payload == payload and type(whole.payload) is bytes
    assert [sys.getrefcount(f) for f in frames] == before


def test_memory_held_elsewhere_counts_against_the_bound() -> None:
    """``held_elsewhere`` (the coordinator's whole messages and kept words) takes room
    from new partials: they go to the spool instead; a frame that completes a spooled
    message says so first (the caller makes room for the read-back)."""
    held = [0]
    r: Reassembler[None] = Reassembler(
        10,
        500,
        60.0,
        when_full=WhenFull.REFUSE,
        spool=_DictSpool(),
        spool_max_bytes=1000,
        held_elsewhere=lambda: held[0],
    )
    a, b = (split_payload(bytes([i]) * 200, 84) for i in range(2))
    assert r.feed("a", a[0], 0.0) is None
    assert r.reserved_bytes == 200  # 200 + 0 + 200 <= 500: memory
    held[0] = 200
    assert r.feed("b", b[0], 0.0) is None
    assert r.reserved_bytes == 200 and r.spooled_bytes == 200  # 200 + 200 + 200 > 500
    for frame in b[1:-1]:
        assert r.completes_spooled("b", ChunkFrame.parse(frame)) == 0
        assert r.feed("b", frame, 0.0) is None
    assert r.completes_spooled("b", ChunkFrame.parse(b[-1])) == 200
    assert r.completes_spooled("a", ChunkFrame.parse(a[-1])) == 0  # in memory: nothing to read
    whole = r.feed("b", b[-1], 0.0)
    assert whole is not None and whole.payload == bytes([1]) * 200
