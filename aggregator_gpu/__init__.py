"""Aggregation backends: the coordinator's running sum of masked updates, on numpy or CuPy.

One interface, two implementations with bit-identical results::

    backend = select_backend("auto")          # logs which backend and why
    acc = backend.accumulator(length=m + 1, word_bits=cfg.word_bits)
    acc.add(update.masked_words)              # bytes read in place, or an array
    checkpoint = acc.snapshot().to_bytes()    # atomic checkpoint by the coordinator
    vote = plurality_vote(sum2_masks, length=m + 1, word_bits=cfg.word_bits)
    acc.subtract_mask(vote.mask)
    weighted_sum, weight_sum = acc.decode(cfg)

CuPy is optional and imported only when a backend asks for it; everything here
raises :class:`~maskfl.protocol.errors.AggregationError` (or a subclass).
"""

from __future__ import annotations

from maskfl.aggregator_gpu._base import (
    Accumulator,
    Backend,
    BackendName,
    BackendUnavailableError,
    MaskVoteTieError,
    Snapshot,
    Words,
    WordsLike,
)
from maskfl.aggregator_gpu._cupy import CupyAccumulator, CupyBackend
from maskfl.aggregator_gpu._gpu_masks import aggregate_mask_gpu, mask_stream_gpu
from maskfl.aggregator_gpu._numpy import NumpyAccumulator, NumpyBackend
from maskfl.aggregator_gpu._select import select_backend
from maskfl.aggregator_gpu._vote import (
    DigestVote,
    MaskVote,
    mask_digest,
    plurality_of_digests,
    plurality_vote,
)

__all__ = [
    "Accumulator",
    "Backend",
    "BackendName",
    "BackendUnavailableError",
    "CupyAccumulator",
    "CupyBackend",
    "DigestVote",
    "MaskVote",
    "MaskVoteTieError",
    "NumpyAccumulator",
    "NumpyBackend",
    "Snapshot",
    "Words",
    "WordsLike",
    "aggregate_mask_gpu",
    "mask_digest",
    "mask_stream_gpu",
    "plurality_of_digests",
    "plurality_vote",
    "select_backend",
]
