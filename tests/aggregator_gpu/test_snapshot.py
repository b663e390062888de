"""The checkpoint image of an accumulator: exact round trip, and refusal of damage."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.aggregator_gpu import Snapshot
from maskfl.protocol.errors import AggregationError


def sample(word_bits: int = 64, length: int = 6, count: int = 3) -> Snapshot:
    dtype = np.uint32 if word_bits == 32 else np.uint64
    factor = 0x0123456789ABCDEF % (1 << word_bits)
    words: npt.NDArray[Any] = np.array(
        [i * factor % (1 << word_bits) for i in range(length)], dtype=dtype
    )
    return Snapshot(words=words, count=count)


@settings(max_examples=40, deadline=None)
@given(
    word_bits=st.sampled_from([32, 64]),
    values=st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=30),
    count=st.integers(0, 1 << 40),
    unmasked=st.booleans(),
)
def test_round_trip(word_bits: int, values: list[int], count: int, unmasked: bool) -> None:
    dtype = np.uint32 if word_bits == 32 else np.uint64
    snap = Snapshot(words=np.array(values, dtype=dtype), count=count, unmasked=unmasked)
    back = Snapshot.from_bytes(snap.to_bytes())
    assert back.words.dtype == dtype
    assert back.words.tolist() == values
    assert (back.count, back.unmasked, back.length, back.word_bits) == (
        count,
        unmasked,
        len(values),
        word_bits,
    )


def test_words_are_8_byte_aligned_in_the_image() -> None:
    image = sample().to_bytes()
    header = 24
    assert header % 8 == 0
    assert np.frombuffer(image, dtype="<u8", count=6, offset=header).tolist() == (
        sample().words.tolist()
    )


def test_restored_words_are_writable_copies() -> None:
    image = bytearray(sample().to_bytes())
    snap = Snapshot.from_bytes(image)
    image[24:32] = b"\xff" * 8
    assert snap.words.tolist() == sample().words.tolist()


@pytest.mark.parametrize("position", [0, 5, 6, 8, 16, 24, 40, -1])
def test_any_flipped_byte_is_refused(position: int) -> None:
    image = bytearray(sample().to_bytes())
    image[position] ^= 0x01
    with pytest.raises(AggregationError):
        Snapshot.from_bytes(image)


@pytest.mark.parametrize("cut", [0, 1, 23, 55, -1])
def test_truncated_images_are_refused(cut: int) -> None:
    image = sample().to_bytes()
    with pytest.raises(AggregationError):
        Snapshot.from_bytes(image[:cut])


def test_extra_bytes_are_refused() -> None:
    with pytest.raises(AggregationError):
        Snapshot.from_bytes(sample().to_bytes() + b"\x00")


def test_a_future_version_is_refused_by_name() -> None:
    image = bytearray(sample().to_bytes())
    image[4] = 2
    with pytest.raises(AggregationError, match="version 2"):
        Snapshot.from_bytes(image)


def test_header_lies_are_refused_even_with_a_fresh_digest() -> None:
    """A header that disagrees with the size is refused before the digest is trusted."""
    snap = sample()
    image = bytearray(snap.to_bytes())
    struct.pack_into("<Q", image, 16, 1 << 60)  # absurd length
    body = bytes(image[:-32])
    image[-32:] = hashlib.sha256(body).digest()
    with pytest.raises(AggregationError, match="does not match"):
        Snapshot.from_bytes(image)


def test_invalid_snapshots_cannot_be_built() -> None:
    with pytest.raises(AggregationError):
        Snapshot(words=np.zeros(3, dtype=np.int64), count=0)
    with pytest.raises(AggregationError):
        Snapshot(words=np.zeros(3, dtype=np.uint16), count=0)
    with pytest.raises(AggregationError):
        Snapshot(words=np.zeros((1, 3), dtype=np.uint64), count=0)
    with pytest.raises(AggregationError):
        Snapshot(words=np.zeros(3, dtype=np.uint64), count=-1)
