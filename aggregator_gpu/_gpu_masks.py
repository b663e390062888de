"""Mask expansion on the GPU: the protocol's ``aggregate_mask`` and ``mask_stream`` on CuPy.

Nothing in the tree calls it yet: the coordinator never expands masks, and the
agent and the fleet simulator's participants expand theirs with
``maskfl.protocol.masking`` on the CPU. It is exported for a participant or
simulator on a GPU host, and the GPU parity tests (``tests/aggregator_gpu/test_parity.py``,
``pytest -m gpu``) check it word for word against libsodium and the protocol.

One CUDA thread computes one 64-byte ChaCha20 block for every seed and keeps
the running sum in registers, so the aggregate mask of many seeds costs no
device memory beyond the result. The words are those of
``maskfl.protocol.masking.mask_stream`` and of libsodium's
``randombytes_buf_deterministic``: key = seed, nonce ``b"LibsodiumDRG"``,
counter from 0, little-endian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maskfl.aggregator_gpu._base import Words, check_length, word_dtype
from maskfl.aggregator_gpu._cuda_source import (
    CHACHA20_BLOCK_BYTES,
    CHACHA20_SUM,
    NONCE_WORDS,
    THREADS_PER_BLOCK,
    grid_for,
)
from maskfl.aggregator_gpu._cupy import open_cupy
from maskfl.protocol.errors import AggregationError

SEED_BYTES = 32
SEEDS_PER_LAUNCH = 256
"""Seeds per kernel launch, so one launch stays short whatever the fleet size."""
MAX_BLOCKS = 1 << 32
"""The 32-bit block counter of the IETF ChaCha20 that libsodium uses."""


def aggregate_mask_gpu(seeds: Sequence[bytes], n_words: int, word_bits: int) -> Words:
    """Sum, modulo ``2^word_bits``, of the mask streams of ``seeds`` (``n_words`` each).

    Raises :class:`~maskfl.aggregator_gpu.BackendUnavailableError` without a
    usable GPU and :class:`AggregationError` for a seed that is not 32 bytes.
    """
    n_words = check_length(n_words)
    dtype = word_dtype(word_bits)
    for index, seed in enumerate(seeds):
        if len(seed) != SEED_BYTES:
            raise AggregationError(f"seed {index} has {len(seed)} bytes, not {SEED_BYTES}")
    n_blocks = -(-n_words * dtype.itemsize // CHACHA20_BLOCK_BYTES)
    if n_blocks > MAX_BLOCKS:
        raise AggregationError(f"{n_words} words exceed the ChaCha20 block counter")
    rt = open_cupy()
    if not seeds:
        return np.zeros(n_words, dtype=dtype)
    cp = rt.cp
    kernel = rt.kernel(CHACHA20_SUM[word_bits])
    words_per_block = CHACHA20_BLOCK_BYTES // dtype.itemsize
    nonce = tuple(np.uint32(w) for w in NONCE_WORDS)
    try:
        total = cp.zeros(n_blocks * words_per_block, dtype=dtype)
        part = cp.empty_like(total)
        for start in range(0, len(seeds), SEEDS_PER_LAUNCH):
            chunk = seeds[start : start + SEEDS_PER_LAUNCH]
            keys = cp.asarray(np.frombuffer(b"".join(chunk), dtype="<u4"))
            kernel(
                (grid_for(n_blocks),),
                (THREADS_PER_BLOCK,),
                (keys, np.int64(len(chunk)), np.int64(n_blocks), *nonce, part),
            )
            cp.add(total, part, out=total)
        result: Words = cp.asnumpy(total[:n_words])
    except rt.errors() as exc:
        raise AggregationError(f"GPU mask expansion failed: {exc}") from exc
    return result


def mask_stream_gpu(seed: bytes, n_words: int, word_bits: int) -> Words:
    """The mask stream of one seed, computed on the GPU."""
    return aggregate_mask_gpu([seed], n_words, word_bits)
