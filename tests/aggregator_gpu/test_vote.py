"""The plurality vote over sum2 masks."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.aggregator_gpu import MaskVoteTieError, WordsLike, mask_digest, plurality_vote
from maskfl.protocol.errors import AggregationError


def mask(
    value: int, length: int = 5, dtype: type[np.unsignedinteger[Any]] = np.uint64
) -> npt.NDArray[Any]:
    return np.full(length, value, dtype=dtype)


def test_unanimous() -> None:
    vote = plurality_vote([mask(7)] * 3, length=5, word_bits=64)
    assert vote.votes == vote.total == 3
    assert vote.voters == (0, 1, 2)
    assert vote.dissenters == ()
    assert vote.mask.tolist() == [7] * 5
    assert vote.digest == hashlib.sha256(mask(7).tobytes()).digest()


def test_plurality_without_majority_wins() -> None:
    masks = [mask(1), mask(2), mask(3), mask(1), mask(2), mask(1)]
    vote = plurality_vote(masks, length=5, word_bits=64)
    assert vote.mask.tolist() == [1] * 5
    assert (vote.votes, vote.total) == (3, 6)
    assert vote.voters == (0, 3, 5)
    assert vote.dissenters == (1, 2, 4)
    assert list(vote.tally.values()) == [3, 2, 1]


def test_tie_for_the_top_fails() -> None:
    masks = [mask(1), mask(2), mask(2), mask(1), mask(3)]
    with pytest.raises(MaskVoteTieError) as info:
        plurality_vote(masks, length=5, word_bits=64)
    assert isinstance(info.value, AggregationError)
    assert sorted(info.value.tally.values()) == [1, 2, 2]


def test_single_mask_wins() -> None:
    assert plurality_vote([mask(4)], length=5, word_bits=64).votes == 1


def test_two_different_single_masks_tie() -> None:
    with pytest.raises(MaskVoteTieError):
        plurality_vote([mask(4), mask(5)], length=5, word_bits=64)


def test_no_masks() -> None:
    with pytest.raises(AggregationError, match="no sum2 masks"):
        plurality_vote([], length=5, word_bits=64)


def test_bytes_and_arrays_vote_together() -> None:
    masks: list[WordsLike] = [
        mask(9, dtype=np.uint32).tobytes(),
        mask(9, dtype=np.uint32),
        mask(8, dtype=np.uint32),
    ]
    vote = plurality_vote(masks, length=5, word_bits=32)
    assert vote.votes == 2
    assert vote.mask.dtype == np.uint32
    assert mask_digest(mask(9, dtype=np.uint32)) == vote.digest


def test_wrong_masks_are_rejected() -> None:
    with pytest.raises(AggregationError):
        plurality_vote([mask(1), mask(1, length=4)], length=5, word_bits=64)
    with pytest.raises(AggregationError):
        plurality_vote([mask(1, dtype=np.uint32)], length=5, word_bits=64)
    with pytest.raises(AggregationError):
        plurality_vote([mask(1)], length=5, word_bits=16)


def test_winner_is_a_copy() -> None:
    winner = mask(3)
    vote = plurality_vote([winner, mask(3)], length=5, word_bits=64)
    winner[:] = 0
    assert vote.mask.tolist() == [3] * 5


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=15))
def test_vote_matches_counting(choices: list[int]) -> None:
    counts = {c: choices.count(c) for c in set(choices)}
    top = max(counts.values())
    leaders = [c for c, n in counts.items() if n == top]
    masks = [mask(c, length=3) for c in choices]
    if len(leaders) > 1:
        with pytest.raises(MaskVoteTieError):
            plurality_vote(masks, length=3, word_bits=64)
        return
    vote = plurality_vote(masks, length=3, word_bits=64)
    assert vote.mask.tolist() == [leaders[0]] * 3
    assert vote.votes == top
    assert vote.voters == tuple(i for i, c in enumerate(choices) if c == leaders[0])
    assert len(vote.voters) + len(vote.dissenters) == len(choices)
