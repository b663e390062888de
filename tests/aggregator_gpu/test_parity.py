"""numpy and CuPy on the same random inputs must agree bit for bit (needs a GPU).

On a machine without a usable GPU every test here is skipped with the reason
CuPy gave; nothing is emulated.
"""

from __future__ import annotations

import numpy as np
import pytest
from nacl.bindings import randombytes_buf_deterministic

from maskfl.aggregator_gpu import (
    CupyBackend,
    NumpyBackend,
    Snapshot,
    aggregate_mask_gpu,
    mask_stream_gpu,
)
from maskfl.protocol.masking import aggregate_mask

pytestmark = pytest.mark.gpu


def random_words(rng: np.random.Generator, shape: tuple[int, ...], word_bits: int) -> np.ndarray:
    dtype = np.uint32 if word_bits == 32 else np.uint64
    words = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    words.reshape(-1)[::7] = np.iinfo(dtype).max  # plenty of carries out of the top bit
    return words


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize(("n", "length"), [(1, 1), (5, 3), (200, 1001), (37, 65_537)])
def test_sums_are_bit_identical(
    gpu_backend: CupyBackend, word_bits: int, n: int, length: int
) -> None:
    rng = np.random.default_rng(n * length + word_bits)
    rows = random_words(rng, (n, length), word_bits)
    mask = random_words(rng, (length,), word_bits)
    cpu = NumpyBackend().accumulator(length, word_bits)
    gpu = gpu_backend.accumulator(length, word_bits)
    for acc in (cpu, gpu):
        half = n // 2
        for row in rows[:half]:
            acc.add(row.tobytes())
        acc.add_batch(rows[half:])
    assert gpu.count == cpu.count == n
    assert np.array_equal(gpu.total(), cpu.total())
    cpu.subtract_mask(mask)
    gpu.subtract_mask(mask.tobytes())
    assert np.array_equal(gpu.total(), cpu.total())
    assert gpu.snapshot().to_bytes() == cpu.snapshot().to_bytes()


@pytest.mark.parametrize("word_bits", [32, 64])
def test_many_slot_cycles_with_tiny_staging(gpu_backend: CupyBackend, word_bits: int) -> None:
    """Rows per slot = 3, three slots: the pipeline wraps around its ring many times."""
    length = 1000
    itemsize = word_bits // 8
    rng = np.random.default_rng(11)
    rows = random_words(rng, (100, length), word_bits)
    gpu = gpu_backend.accumulator(length, word_bits, staging_bytes=3 * length * itemsize)
    assert gpu.rows_per_slot == 3
    cpu = NumpyBackend().accumulator(length, word_bits)
    for i, row in enumerate(rows):
        gpu.add(row)
        cpu.add(row)
        if i % 17 == 0:  # reading mid-stream must not disturb the pipeline
            assert np.array_equal(gpu.total(), cpu.total())
    assert np.array_equal(gpu.total(), cpu.total())


@pytest.mark.parametrize("word_bits", [32, 64])
def test_snapshots_cross_backends(gpu_backend: CupyBackend, word_bits: int) -> None:
    rng = np.random.default_rng(12)
    rows = random_words(rng, (20, 513), word_bits)
    cpu = NumpyBackend().accumulator(513, word_bits)
    cpu.add_batch(rows[:10])
    on_gpu = gpu_backend.restore(Snapshot.from_bytes(cpu.snapshot().to_bytes()))
    on_gpu.add_batch(rows[10:])
    back = NumpyBackend().restore(on_gpu.snapshot())
    whole = NumpyBackend().accumulator(513, word_bits)
    whole.add_batch(rows)
    assert back.count == 20
    assert np.array_equal(back.total(), whole.total())
    merged = gpu_backend.accumulator(513, word_bits)
    merged.merge(cpu.snapshot())
    merged.add_batch(rows[10:])
    assert np.array_equal(merged.total(), whole.total())


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("n_words", [1, 3, 16, 17, 100_003])
def test_gpu_mask_stream_is_libsodium(
    gpu_backend: CupyBackend, word_bits: int, n_words: int
) -> None:
    seed = bytes(range(32))
    dtype = "<u4" if word_bits == 32 else "<u8"
    reference = np.frombuffer(
        randombytes_buf_deterministic(n_words * word_bits // 8, seed), dtype=dtype
    )
    assert np.array_equal(mask_stream_gpu(seed, n_words, word_bits), reference)


@pytest.mark.parametrize("word_bits", [32, 64])
def test_gpu_aggregate_mask_is_the_protocols(gpu_backend: CupyBackend, word_bits: int) -> None:
    rng = np.random.default_rng(13)
    seeds = [rng.bytes(32) for _ in range(300)]  # more than one launch of 256 seeds
    expected = aggregate_mask(seeds, 4099, word_bits)  # type: ignore[arg-type]
    assert np.array_equal(aggregate_mask_gpu(seeds, 4099, word_bits), expected)
