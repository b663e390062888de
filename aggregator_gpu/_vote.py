"""The plurality vote over the summers' aggregate masks (the end of sum2).

Every honest summer computes the same aggregate mask from the same seed
dictionary, so the masks are compared by their SHA-256 digest, not word by word.
The mask with the most votes wins; a tie for the top means the coordinator
cannot tell which summers are honest, and the round must fail rather than
publish a model unmasked with a mask that may be forged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from maskfl.aggregator_gpu._base import (
    MaskVoteTieError,
    Words,
    WordsLike,
    as_words,
    check_length,
    word_dtype,
)
from maskfl.protocol.errors import AggregationError


@dataclass(frozen=True, eq=False)
class MaskVote:
    """The outcome of a plurality vote.

    ``mask`` is the winning mask (a copy, safe to keep), ``voters`` the indexes
    (in input order) of the masks that agreed with it, ``dissenters`` the rest;
    ``tally`` maps every distinct digest to its votes, highest first.
    """

    mask: Words
    digest: bytes
    votes: int
    total: int
    voters: tuple[int, ...]
    dissenters: tuple[int, ...]
    tally: dict[bytes, int]


def mask_digest(words: Words) -> bytes:
    """SHA-256 of the mask's little-endian bytes (the same for bytes or array input)."""
    little = np.ascontiguousarray(words, dtype=words.dtype.newbyteorder("<"))
    return hashlib.sha256(little.data.cast("B")).digest()


@dataclass(frozen=True)
class DigestVote:
    """The outcome of a plurality vote over mask digests (the masks stay where they are).

    ``digest`` is the winner, ``voters`` the indexes (in input order) of the masks
    with that digest, ``dissenters`` the rest; ``tally`` maps every distinct digest
    to its votes, highest first.
    """

    digest: bytes
    votes: int
    total: int
    voters: tuple[int, ...]
    dissenters: tuple[int, ...]
    tally: dict[bytes, int]


def plurality_of_digests(digests: Iterable[bytes]) -> DigestVote:
    """The vote of :func:`plurality_vote` on digests computed when the masks arrived,
    so the coordinator need not hold every mask (S copies of the model) to vote.

    Raises :class:`MaskVoteTieError` when two digests share the top count and
    :class:`AggregationError` when there are none.
    """
    groups: dict[bytes, list[int]] = {}
    total = 0
    for index, digest in enumerate(digests):
        groups.setdefault(digest, []).append(index)
        total += 1
    if total == 0:
        raise AggregationError("no sum2 masks to vote on")
    ranked = sorted(groups.items(), key=lambda item: len(item[1]), reverse=True)
    tally = {digest: len(indexes) for digest, indexes in ranked}
    best_digest, best = ranked[0]
    if len(ranked) > 1 and len(ranked[1][1]) == len(best):
        leaders = sum(1 for count in tally.values() if count == len(best))
        raise MaskVoteTieError(
            f"{leaders} different aggregate masks tie with {len(best)} of {total} votes each",
            tally=tally,
        )
    return DigestVote(
        digest=best_digest,
        votes=len(best),
        total=total,
        voters=tuple(best),
        dissenters=tuple(sorted(i for d, idx in groups.items() if d != best_digest for i in idx)),
        tally=tally,
    )


def plurality_vote(masks: Iterable[WordsLike], *, length: int, word_bits: int) -> MaskVote:
    """Group the sum2 masks by digest; the largest group wins.

    Raises :class:`MaskVoteTieError` when two groups share the top count and
    :class:`AggregationError` when there are no masks or one has the wrong size
    (each mask is checked like an added vector).
    """
    check_length(length)
    dtype = word_dtype(word_bits)
    first: dict[bytes, Words] = {}
    digests = []
    for mask in masks:
        words = as_words(mask, length, dtype)
        digest = mask_digest(words)
        first.setdefault(digest, words)
        digests.append(digest)
    vote = plurality_of_digests(digests)
    return MaskVote(
        mask=np.array(first[vote.digest], dtype=dtype, copy=True),
        digest=vote.digest,
        votes=vote.votes,
        total=vote.total,
        voters=vote.voters,
        dissenters=vote.dissenters,
        tally=vote.tally,
    )
