"""The accumulator contract, run on every backend (CuPy ones are skipped without a GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.aggregator_gpu import (
    Backend,
    BackendName,
    NumpyBackend,
    Snapshot,
    plurality_vote,
)
from maskfl.protocol.errors import AggregationError, MaskflError
from maskfl.protocol.masking import (
    MaskConfig,
    add_mask,
    aggregate_mask,
    encode_update,
    error_bound,
    update_words,
)

WORD_BITS = [32, 64]


def dtype_of(word_bits: int) -> np.dtype[Any]:
    return np.dtype(np.uint32 if word_bits == 32 else np.uint64)


def reference_sum(rows: list[list[int]], length: int, word_bits: int) -> list[int]:
    """The sum with Python integers, reduced modulo 2^w only at the end."""
    return [sum(row[i] for row in rows) % (1 << word_bits) for i in range(length)]


def random_rows(
    rng: np.random.Generator, n: int, length: int, word_bits: int
) -> npt.NDArray[np.unsignedinteger]:
    dtype = dtype_of(word_bits)
    return rng.integers(0, np.iinfo(dtype).max, size=(n, length), dtype=dtype, endpoint=True)


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_new_accumulator_is_zero(backend: Backend, word_bits: int) -> None:
    acc = backend.accumulator(7, word_bits)
    assert acc.count == 0
    assert acc.length == 7
    assert acc.word_bits == word_bits
    assert acc.backend == backend.name
    assert not acc.unmasked
    total = acc.total()
    assert total.dtype == dtype_of(word_bits)
    assert total.tolist() == [0] * 7


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_all_input_forms_add_the_same(backend: Backend, word_bits: int) -> None:
    rng = np.random.default_rng(1)
    rows = random_rows(rng, 4, 33, word_bits)
    acc = backend.accumulator(33, word_bits)
    acc.add(rows[0])
    acc.add(rows[1].tobytes())
    acc.add(memoryview(rows[2].tobytes()))
    acc.add(bytearray(rows[3].tobytes()))
    assert acc.count == 4
    assert acc.total().tolist() == reference_sum(rows.tolist(), 33, word_bits)


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_wraparound_at_the_top_of_the_word(backend: Backend, word_bits: int) -> None:
    top = np.iinfo(dtype_of(word_bits)).max
    acc = backend.accumulator(3, word_bits)
    acc.add(np.array([top, top, 1], dtype=dtype_of(word_bits)))
    acc.add(np.array([1, top, top], dtype=dtype_of(word_bits)))
    assert acc.total().tolist() == [0, top - 1, 0]


@settings(max_examples=40, deadline=None)
@given(
    word_bits=st.sampled_from(WORD_BITS),
    data=st.data(),
)
def test_sum_is_the_modular_sum(word_bits: int, data: st.DataObject) -> None:
    length = data.draw(st.integers(1, 40), label="length")
    word = st.integers(0, (1 << word_bits) - 1) | st.sampled_from([0, 1, (1 << word_bits) - 1])
    rows = data.draw(st.lists(st.lists(word, min_size=length, max_size=length), max_size=12))
    acc = NumpyBackend().accumulator(length, word_bits)
    batch = np.array(rows, dtype=dtype_of(word_bits)).reshape(len(rows), length)
    half = len(rows) // 2
    for row in batch[:half]:
        acc.add(row.tobytes())
    acc.add_batch(batch[half:])
    assert acc.count == len(rows)
    assert acc.total().tolist() == reference_sum(rows, length, word_bits)


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_add_batch_forms(backend: Backend, word_bits: int) -> None:
    rng = np.random.default_rng(2)
    rows = random_rows(rng, 9, 17, word_bits)
    a = backend.accumulator(17, word_bits)
    assert a.add_batch(rows) == 9
    b = backend.accumulator(17, word_bits)
    assert b.add_batch(row.tobytes() for row in rows) == 9
    c = backend.accumulator(17, word_bits)
    for row in rows:
        c.add(row)
    expected = reference_sum(rows.tolist(), 17, word_bits)
    for acc in (a, b, c):
        assert acc.count == 9
        assert acc.total().tolist() == expected


def test_empty_batch_adds_nothing(backend: Backend) -> None:
    acc = backend.accumulator(5, 64)
    assert acc.add_batch([]) == 0
    assert acc.count == 0


def bad_inputs(word_bits: int, length: int) -> list[object]:
    other = np.uint64 if word_bits == 32 else np.uint32
    itemsize = word_bits // 8
    return [
        b"\x00" * (length * itemsize - 1),  # one byte short
        b"\x00" * ((length + 1) * itemsize),  # one word too many
        np.zeros(length, dtype=other),  # the other word size
        np.zeros(length, dtype=np.int64),  # signed
        np.zeros(length, dtype=np.float64),  # float
        np.zeros(length + 1, dtype=dtype_of(word_bits)),  # wrong length
        np.zeros((1, length), dtype=dtype_of(word_bits)),  # 2-D
        np.zeros(length, dtype=dtype_of(word_bits).newbyteorder(">")),  # big-endian
        [0] * length,  # a list is not a buffer
        "x" * length * itemsize,  # nor is a str
    ]


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_bad_vectors_are_rejected_and_change_nothing(backend: Backend, word_bits: int) -> None:
    rng = np.random.default_rng(3)
    good = random_rows(rng, 2, 6, word_bits)
    acc = backend.accumulator(6, word_bits)
    acc.add(good[0])
    before = acc.total().tolist()
    for bad in bad_inputs(word_bits, 6):
        with pytest.raises(AggregationError):
            acc.add(bad)  # type: ignore[arg-type]
        with pytest.raises(AggregationError):
            acc.add_batch([good[1], bad])  # type: ignore[list-item]
        with pytest.raises(AggregationError):
            acc.subtract_mask(bad)  # type: ignore[arg-type]
    with pytest.raises(AggregationError):
        acc.add_batch(np.zeros(6, dtype=dtype_of(word_bits)))  # 1-D is not a batch
    assert acc.count == 1
    assert not acc.unmasked
    assert acc.total().tolist() == before


def test_aggregation_errors_are_maskfl_errors() -> None:
    with pytest.raises(MaskflError):
        NumpyBackend().accumulator(0, 64)
    with pytest.raises(AggregationError):
        NumpyBackend().accumulator(4, 16)


def test_misaligned_bytes_are_read_correctly(backend: Backend) -> None:
    rng = np.random.default_rng(4)
    row = random_rows(rng, 1, 10, 64)[0]
    buffer = bytearray(1) + bytearray(row.tobytes())
    acc = backend.accumulator(10, 64)
    acc.add(memoryview(buffer)[1:])
    assert acc.total().tolist() == row.tolist()


def test_inputs_are_only_read_and_totals_are_copies(backend: Backend) -> None:
    rng = np.random.default_rng(5)
    rows = random_rows(rng, 2, 8, 32)
    original = rows.copy()
    acc = backend.accumulator(8, 32)
    acc.add(rows[0])
    acc.add_batch(rows)
    assert np.array_equal(rows, original)
    expected = reference_sum([original[0].tolist(), *original.tolist()], 8, 32)
    rows[:] = 0  # the accumulator kept no reference to the inputs
    total = acc.total()
    assert total.tolist() == expected
    total[:] = 1  # nor does it share memory with what it returned
    assert acc.total().tolist() == expected


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_masked_round_decodes_to_the_weighted_mean(backend: Backend, word_bits: int) -> None:
    """Encode, mask, add, vote, unmask, decode: within the protocol's error bound."""
    rng = np.random.default_rng(6)
    cfg = MaskConfig(bound=1.0, n_max=50, word_bits=word_bits)  # type: ignore[arg-type]
    m, n = 257, 6
    deltas = [rng.uniform(-1.2, 1.2, m).astype(np.float32) for _ in range(n)]
    weights = [1.0, 0.5, 0.25, 1.0, 0.75, 0.1]
    seeds = [rng.bytes(32) for _ in range(n)]
    acc = backend.accumulator(update_words(m), word_bits)
    for delta, weight, seed in zip(deltas, weights, seeds, strict=True):
        words = encode_update(delta, weight, cfg)
        add_mask(words, seed)
        acc.add(words.tobytes())
    honest = aggregate_mask(seeds, update_words(m), word_bits)  # type: ignore[arg-type]
    forged = honest.copy()
    forged[0] += 1
    vote = plurality_vote(
        [honest, forged, honest.tobytes()], length=update_words(m), word_bits=word_bits
    )
    assert vote.voters == (0, 2)
    with pytest.raises(AggregationError, match="subtract"):
        acc.decode(cfg)
    acc.subtract_mask(vote.mask)
    weighted_sum, weight_sum = acc.decode(cfg)
    expected = sum(
        np.clip(d.astype(np.float64), -1, 1) * w for d, w in zip(deltas, weights, strict=True)
    )
    assert weight_sum == pytest.approx(sum(weights), abs=n / cfg.weight_scale)
    mean = weighted_sum / weight_sum
    exact = expected / sum(weights)
    assert np.max(np.abs(mean - exact)) <= error_bound(n, weight_sum, cfg)


def test_unmasked_accumulator_refuses_more_work(backend: Backend) -> None:
    acc = backend.accumulator(4, 32)
    acc.add(np.ones(4, dtype=np.uint32))
    acc.subtract_mask(np.ones(4, dtype=np.uint32))
    assert acc.unmasked
    assert acc.total().tolist() == [0, 0, 0, 0]
    with pytest.raises(AggregationError):
        acc.add(np.ones(4, dtype=np.uint32))
    with pytest.raises(AggregationError):
        acc.add_batch([np.ones(4, dtype=np.uint32)])
    with pytest.raises(AggregationError):
        acc.subtract_mask(np.ones(4, dtype=np.uint32))
    with pytest.raises(AggregationError):
        acc.merge(NumpyBackend().accumulator(4, 32).snapshot())
    assert acc.count == 1


def test_decode_checks_config_and_count(backend: Backend) -> None:
    cfg32 = MaskConfig(bound=1.0, n_max=2, word_bits=32)
    acc = backend.accumulator(4, 64)
    acc.subtract_mask(np.zeros(4, dtype=np.uint64))
    with pytest.raises(AggregationError, match="32-bit"):
        acc.decode(cfg32)
    acc32 = backend.accumulator(4, 32)
    acc32.subtract_mask(np.zeros(4, dtype=np.uint32))
    with pytest.raises(AggregationError, match="nothing to decode"):
        acc32.decode(cfg32)
    with pytest.raises(AggregationError, match="n_max"):
        acc32.decode(cfg32, n_included=3)


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_snapshot_restore_continues_the_same_sum(backend: Backend, word_bits: int) -> None:
    rng = np.random.default_rng(7)
    rows = random_rows(rng, 10, 21, word_bits)
    whole = backend.accumulator(21, word_bits)
    whole.add_batch(rows)
    first = backend.accumulator(21, word_bits)
    first.add_batch(rows[:4])
    image = first.snapshot().to_bytes()
    resumed = backend.restore(Snapshot.from_bytes(image))
    assert resumed.count == 4
    resumed.add_batch(rows[4:])
    assert resumed.count == 10
    assert resumed.total().tolist() == whole.total().tolist()
    # the snapshot is a copy: adding afterwards does not change it
    snap = whole.snapshot()
    whole.add(rows[0])
    assert snap.words.tolist() == reference_sum(rows.tolist(), 21, word_bits)


def test_snapshot_keeps_the_unmasked_state(backend: Backend) -> None:
    acc = backend.accumulator(3, 64)
    acc.add(np.array([5, 6, 7], dtype=np.uint64))
    acc.subtract_mask(np.array([1, 1, 1], dtype=np.uint64))
    restored = backend.restore(Snapshot.from_bytes(acc.snapshot().to_bytes()))
    assert restored.unmasked
    assert restored.count == 1
    assert restored.total().tolist() == [4, 5, 6]
    with pytest.raises(AggregationError):
        restored.add(np.zeros(3, dtype=np.uint64))


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_merge_partial_aggregates(backend: Backend, word_bits: int) -> None:
    """Ingest workers sum disjoint parts; the leader merges them into one sum."""
    rng = np.random.default_rng(8)
    rows = random_rows(rng, 9, 12, word_bits)
    workers = [backend.accumulator(12, word_bits) for _ in range(3)]
    for i, row in enumerate(rows):
        workers[i % 3].add(row)
    leader = backend.accumulator(12, word_bits)
    leader.add(rows[0])
    for worker in workers:
        leader.merge(Snapshot.from_bytes(worker.snapshot().to_bytes()))
    assert leader.count == 10
    expected = reference_sum([*rows.tolist(), rows[0].tolist()], 12, word_bits)
    assert leader.total().tolist() == expected


def test_merge_rejects_mismatches(backend: Backend) -> None:
    leader = backend.accumulator(4, 32)
    with pytest.raises(AggregationError):
        leader.merge(Snapshot(np.zeros(5, dtype=np.uint32), count=1))
    with pytest.raises(AggregationError):
        leader.merge(Snapshot(np.zeros(4, dtype=np.uint64), count=1))
    with pytest.raises(AggregationError, match="unmasked"):
        leader.merge(Snapshot(np.zeros(4, dtype=np.uint32), count=1, unmasked=True))
    assert leader.count == 0


@pytest.mark.parametrize("backend_name", list(BackendName))
def test_backend_names_are_strings(backend_name: BackendName) -> None:
    assert BackendName(str(backend_name)) is backend_name


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_retract_takes_back_one_vector(backend: Backend, word_bits: int) -> None:
    rng = np.random.default_rng(9)
    rows = random_rows(rng, 5, 11, word_bits)
    acc = backend.accumulator(11, word_bits)
    acc.add_batch(rows)
    acc.retract(rows[2].tobytes())
    assert acc.count == 4
    kept = [row for i, row in enumerate(rows.tolist()) if i != 2]
    assert acc.total().tolist() == reference_sum(kept, 11, word_bits)
    with pytest.raises(AggregationError):
        acc.retract(rows[0][:5])
    assert acc.count == 4


def test_retract_needs_something_added_and_a_masked_sum(backend: Backend) -> None:
    acc = backend.accumulator(3, 32)
    with pytest.raises(AggregationError, match="none was added"):
        acc.retract(np.zeros(3, dtype=np.uint32))
    acc.add(np.ones(3, dtype=np.uint32))
    acc.subtract_mask(np.zeros(3, dtype=np.uint32))
    with pytest.raises(AggregationError):
        acc.retract(np.ones(3, dtype=np.uint32))
    assert acc.count == 1


def test_the_checkpoint_image_is_the_snapshot_without_copying_the_sum() -> None:
    acc = NumpyBackend().accumulator(1000, 32)
    acc.add(np.arange(1000, dtype=np.uint32))
    parts = acc.checkpoint_image()
    assert b"".join(parts) == acc.snapshot().to_bytes()
    words = parts[1]
    assert isinstance(words, memoryview) and len(words) == 4000
    acc.add(np.ones(1000, dtype=np.uint32))  # a view of the live sum: it moves with it
    assert np.frombuffer(words, dtype="<u4")[0] == 1
    assert Snapshot.from_bytes(b"".join(acc.checkpoint_image())).count == 2
