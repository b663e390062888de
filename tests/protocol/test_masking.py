"""Masking arithmetic: known answers, encode/decode, masks, wraparound, uniformity."""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import nacl.bindings
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.errors import AggregationError, ConfigError, CryptoError, LocalProtocolError
from maskfl.protocol.masking import (
    EVAL_WORDS,
    LOSS_CAP,
    EvalCounts,
    MaskConfig,
    WordBits,
    Words,
    add_mask,
    add_words,
    aggregate_mask,
    decode_aggregate,
    decode_evaluation,
    encode_evaluation,
    encode_update,
    error_bound,
    mask_stream,
    mask_update,
    unmask,
    update_words,
)

# Known answers made with libsodium (copied from the design's shared vectors).
VECTORS = Path(__file__).parent / "vectors" / "mask_stream.json"

BITS: tuple[WordBits, ...] = (32, 64)
seeds = st.binary(min_size=32, max_size=32)
word_bits = st.sampled_from(BITS)


def _vectors() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]
    return cases


def _reference(seed: bytes, n_words: int, bits: WordBits) -> Words:
    """libsodium's randombytes_buf_deterministic, read as little-endian words."""
    raw = nacl.bindings.randombytes_buf_deterministic(n_words * bits // 8, seed)
    le = np.dtype("<u4") if bits == 32 else np.dtype("<u8")
    words: Words = np.frombuffer(raw, dtype=le).astype(np.uint32 if bits == 32 else np.uint64)
    return words


# --- known answers -----------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_known_answers(index: int) -> None:
    cases = _vectors()
    case = cases[index]
    seed = bytes.fromhex(case["seed_hex"])
    w64 = mask_stream(seed, 1_000_000, 64)
    w32 = mask_stream(seed, 1_000_000, 32)
    assert [int(x) for x in w64[:8]] == case["first_8_words_u64"]
    assert [int(x) for x in w32[:8]] == case["first_8_words_u32"]
    raw = w64.astype("<u8").tobytes()
    assert len(raw) == 8_000_000
    assert hashlib.sha256(raw).hexdigest() == case["sha256_of_first_8000000_bytes"]
    assert int(w64.sum(dtype=np.uint64)) == case["sum_mod_2_64_of_first_1000000_u64"]
    assert int(w32.sum(dtype=np.uint32)) == case["sum_mod_2_32_of_first_1000000_u32"]
    # The chunked, fused paths give the same words as the reference.
    acc64 = np.zeros(1_000_000, dtype=np.uint64)
    add_mask(acc64, seed)
    assert (
        hashlib.sha256(acc64.astype("<u8").tobytes()).hexdigest()
        == (case["sha256_of_first_8000000_bytes"])
    )
    agg32 = aggregate_mask([seed], 1_000_000, 32)
    assert int(agg32.sum(dtype=np.uint32)) == case["sum_mod_2_32_of_first_1000000_u32"]
    # ... and libsodium agrees (the reference the vectors were made with).
    assert np.array_equal(_reference(seed, 4096, 64), w64[:4096])


def test_stream_of_u32_is_the_same_bytes_as_u64() -> None:
    seed = bytes(range(32))
    assert mask_stream(seed, 200, 32).astype("<u4").tobytes() == (
        mask_stream(seed, 100, 64).astype("<u8").tobytes()
    )


# --- the mask stream ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=seeds, n_words=st.integers(0, 3000), bits=word_bits)
def test_mask_stream_equals_libsodium(seed: bytes, n_words: int, bits: WordBits) -> None:
    assert np.array_equal(mask_stream(seed, n_words, bits), _reference(seed, n_words, bits))


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    n_words=st.integers(1, 3000),
    bits=word_bits,
    chunk_bytes=st.integers(64, 5000),
    data=st.data(),
)
def test_add_mask_is_chunk_size_independent_and_wraps(
    seed: bytes, n_words: int, bits: WordBits, chunk_bytes: int, data: st.DataObject
) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    top = (1 << bits) - 1
    values = data.draw(st.lists(st.integers(0, top), min_size=n_words, max_size=n_words))
    acc = np.array(values, dtype=dtype)
    add_mask(acc, seed, chunk_bytes=chunk_bytes)
    mask = mask_stream(seed, n_words, bits)
    expected = [(v + int(m)) % (1 << bits) for v, m in zip(values, mask, strict=True)]
    assert [int(x) for x in acc] == expected


def test_add_mask_wraps_from_the_top() -> None:
    seed = b"\x07" * 32
    for bits in BITS:
        dtype = np.uint32 if bits == 32 else np.uint64
        acc = np.full(1000, (1 << bits) - 1, dtype=dtype)
        add_mask(acc, seed)
        mask = mask_stream(seed, 1000, bits)
        assert np.array_equal(acc, mask - dtype(1))  # (2^w - 1) + m == m - 1 (mod 2^w)


@settings(max_examples=30, deadline=None)
@given(
    seed_list=st.lists(seeds, min_size=0, max_size=6),
    n_words=st.integers(0, 2000),
    bits=word_bits,
    chunk_bytes=st.integers(64, 3000),
)
def test_aggregate_mask_is_the_sum_of_masks(
    seed_list: list[bytes], n_words: int, bits: WordBits, chunk_bytes: int
) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    expected = np.zeros(n_words, dtype=dtype)
    for seed in seed_list:
        add_words(expected, mask_stream(seed, n_words, bits))
    got = aggregate_mask(seed_list, n_words, bits, chunk_bytes=chunk_bytes)
    assert got.dtype == dtype
    assert np.array_equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, bits=word_bits, n=st.integers(1, 2000), data=st.data())
def test_mask_then_unmask_restores_the_words(
    seed: bytes, bits: WordBits, n: int, data: st.DataObject
) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    encoded = rng.integers(0, 1 << bits, size=n, dtype=dtype, endpoint=False)
    masked = encoded.copy()
    add_mask(masked, seed)
    assert not np.array_equal(masked, encoded)
    restored = unmask(masked, mask_stream(seed, n, bits))
    assert np.array_equal(restored, encoded)


def _chi_square_of_bytes(words: Words) -> float:
    counts = np.bincount(np.frombuffer(words.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", BITS)
def test_masked_words_look_uniform(bits: WordBits) -> None:
    # A very non-uniform update (all zeros but one spike) becomes uniform bytes once
    # masked. 255 degrees of freedom: 377 is the 1e-6 upper tail; seeds are fixed, so
    # the test is deterministic, and it does fail on unmasked words (second assert).
    cfg = MaskConfig(1.0, 100, bits)
    delta = np.zeros(100_000, dtype=np.float32)
    delta[::97] = 1.0
    encoded = encode_update(delta, 0.5, cfg)
    masked = mask_update(delta, 0.5, hashlib.sha256(b"uniform").digest(), cfg)
    assert _chi_square_of_bytes(masked) < 377.0
    assert _chi_square_of_bytes(encoded) > 10_000.0
    # Each byte position within a word too (the low byte would show a bad generator).
    per_position = masked.view(np.uint8).reshape(-1, bits // 8)
    for column in per_position.T:
        counts = np.bincount(column, minlength=256)
        expected = counts.sum() / 256
        assert float(((counts - expected) ** 2 / expected).sum()) < 377.0


# --- encoding and decoding ---------------------------------------------------------------


def _exact_mean(
    deltas: list[npt.NDArray[np.float32]], weights: list[float], bound: float
) -> tuple[list[Fraction], Fraction]:
    """Σ a_k·clip(delta_k) / Σ a_k per element, exactly (clip first, then weight)."""
    b = Fraction(bound)
    total_weight = sum((Fraction(a) for a in weights), Fraction(0))
    means = []
    for i in range(len(deltas[0])):
        acc = Fraction(0)
        for delta, a in zip(deltas, weights, strict=True):
            x = float(delta[i])
            clipped = b if x >= bound else -b if x <= -bound else Fraction(x)
            acc += clipped * Fraction(a)
        means.append(acc / total_weight if total_weight else Fraction(0))
    return means, total_weight


configs = st.builds(
    MaskConfig,
    bound=st.sampled_from([1.0, 0.5, 0.1, 0.3, 2.0, 1e-3, 10.0]),
    n_max=st.integers(1, 5000),
    word_bits=word_bits,
)
floats32 = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, width=32),
    st.floats(min_value=-3.0, max_value=3.0, width=32),
    st.sampled_from([math.inf, -math.inf, 0.0, -0.0]),
)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, data=st.data())
def test_round_trip_within_error_bound(cfg: MaskConfig, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, min(cfg.n_max, 6)))
    m = data.draw(st.integers(1, 12))
    deltas = [
        np.array(data.draw(st.lists(floats32, min_size=m, max_size=m)), dtype=np.float32)
        for _ in range(n)
    ]
    weights = [data.draw(st.floats(0.0, 1.0)) for _ in range(n)]
    total = np.zeros(update_words(m), dtype=cfg.dtype)
    for delta, a in zip(deltas, weights, strict=True):
        words = encode_update(delta, a, cfg)
        assert words.dtype == cfg.dtype
        assert words.shape == (m + 1 + EVAL_WORDS,)
        assert int(words[:m].max()) <= 2 * cfg.offset  # never wraps when summed
        assert words[m + 1 :].tolist() == [0, 0, 0]  # no evaluation
        add_words(total, words)
    weighted_sum, weight_sum = decode_aggregate(total, n, cfg)
    means, exact_weight = _exact_mean(deltas, weights, cfg.bound)
    float_slack = Fraction(weight_sum) * Fraction(2) ** -52  # the float returned
    assert abs(Fraction(weight_sum) - exact_weight) <= (
        Fraction(n, 2 * cfg.weight_scale) + float_slack
    )
    if weight_sum == 0:
        assert error_bound(n, weight_sum, cfg) == math.inf
        return
    bound = error_bound(n, weight_sum, cfg)
    assert bound < math.inf
    decoded = weighted_sum / weight_sum
    for got, want in zip(decoded, means, strict=True):
        assert abs(Fraction(float(got)) - want) <= Fraction(bound), (got, float(want), bound)


@settings(max_examples=60, deadline=None)
@given(cfg=configs, a=st.floats(0.0, 1.0), data=st.data())
def test_clipping_then_weighting(cfg: MaskConfig, a: float, data: st.DataObject) -> None:
    big = data.draw(st.floats(min_value=cfg.bound, max_value=1e30))
    delta = np.array([big, -big, np.inf, -np.inf], dtype=np.float64)
    words = encode_update(delta, a, cfg)
    values, weight = decode_aggregate(words, 1, cfg)
    step = error_bound(1, 1.0, cfg)  # error of a single element with weight 1
    for value, sign in zip(values, (1, -1, 1, -1), strict=True):
        assert abs(value - sign * cfg.bound * a) <= step
    assert abs(weight - a) <= 0.5 / cfg.weight_scale + 2**-53  # + the float returned


def test_scale_and_resolution_follow_the_formula() -> None:
    cfg = MaskConfig(1.0, 1000, 32)
    assert cfg.scale == (2**32 - 1) // 2000
    assert cfg.weight_scale == (2**32 - 1) // 2000
    assert cfg.resolution == pytest.approx(1 / cfg.scale)
    assert cfg.resolution < 5e-7  # design: N_max = 1000, B = 1 gives about 2e-7... per unit
    big = MaskConfig(1.0, 10_000, 64)
    assert big.scale == (2**64 - 1) // 20_000
    assert 9.2e14 < big.scale < 9.3e14
    odd = MaskConfig(0.1, 7, 32)
    assert odd.scale == math.floor(Fraction(2**32 - 1) / (7 * 2 * Fraction(0.1)))
    assert odd.offset == math.floor(Fraction(0.1) * odd.scale)
    assert cfg.dtype is np.uint32
    assert big.dtype is np.uint64


@pytest.mark.parametrize("bits", BITS)
def test_n_max_extreme_updates_never_wrap(bits: WordBits) -> None:
    cfg = MaskConfig(0.3, 11, bits)
    top = encode_update(np.full(5, np.inf, dtype=np.float32), 1.0, cfg)
    bottom = encode_update(np.full(5, -np.inf, dtype=np.float32), 1.0, cfg)
    # Exactly 0 and 2K where float64 holds K exactly (32 bits); within float64's
    # rounding of K (a few ulps) otherwise, and never outside [0, 2K].
    slack = cfg.offset * 2**-50
    assert 0 <= int(bottom[0]) <= slack
    assert 2 * cfg.offset - slack <= int(top[0]) <= 2 * cfg.offset
    if bits == 32:
        assert int(bottom[0]) == 0
        assert int(top[0]) == 2 * cfg.offset
    assert cfg.n_max * (2 * cfg.offset) <= 2**bits - 1
    assert cfg.n_max * int(top[5]) <= 2**bits - 1
    total = np.zeros(update_words(5), dtype=cfg.dtype)
    for _ in range(cfg.n_max):
        add_words(total, top)
    values, weight = decode_aggregate(total, cfg.n_max, cfg)
    assert weight == pytest.approx(cfg.n_max)
    assert np.allclose(values, cfg.n_max * 0.3, rtol=0, atol=error_bound(cfg.n_max, 1.0, cfg))
    total[:] = 0
    for _ in range(cfg.n_max):
        add_words(total, bottom)
    values, _ = decode_aggregate(total, cfg.n_max, cfg)
    assert np.all(values < 0)  # two's complement read correctly
    assert np.allclose(values, -cfg.n_max * 0.3, rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    cfg=configs,
    seed=seeds,
    m=st.integers(0, 3000),
    chunk_bytes=st.integers(64, 20_000),
    data=st.data(),
)
def test_mask_update_equals_encode_then_add_mask(
    cfg: MaskConfig, seed: bytes, m: int, chunk_bytes: int, data: st.DataObject
) -> None:
    a = data.draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    delta = (rng.standard_normal(m) * cfg.bound).astype(np.float32)
    examples = data.draw(st.integers(0, cfg.eval_max_examples))
    ev = EvalCounts(examples, examples // 2, examples * 0.7)
    expected = encode_update(
        delta, a, cfg, evaluation=ev, chunk_words=data.draw(st.integers(1, 500))
    )
    add_mask(expected, seed, chunk_bytes=chunk_bytes)
    got = mask_update(delta, a, seed, cfg, evaluation=ev, chunk_bytes=chunk_bytes)
    assert np.array_equal(got, expected)


def test_weight_zero_contributes_nothing() -> None:
    cfg = MaskConfig(1.0, 10, 32)
    words = encode_update(np.array([np.inf, -np.inf, 0.5], dtype=np.float32), 0.0, cfg)
    assert [int(w) for w in words] == [cfg.offset] * 3 + [cfg.weight_scale, 0, 0, 0]
    values, weight = decode_aggregate(words, 1, cfg)
    assert weight == 0.0
    assert np.array_equal(values, np.zeros(3))
    assert error_bound(1, weight, cfg) == math.inf


def test_encode_rejects_bad_input() -> None:
    cfg = MaskConfig(1.0, 10, 32)
    with pytest.raises(LocalProtocolError, match="NaN"):
        encode_update(np.array([0.0, np.nan], dtype=np.float32), 0.5, cfg)
    with pytest.raises(LocalProtocolError, match="NaN"):
        encode_update(np.array([np.nan], dtype=np.float32), 0.0, cfg)
    with pytest.raises(LocalProtocolError, match="NaN"):
        mask_update(np.array([np.nan], dtype=np.float32), 1.0, bytes(32), cfg)
    for weight in (-0.1, 1.5, math.nan):
        with pytest.raises(LocalProtocolError, match="weight"):
            encode_update(np.zeros(3, dtype=np.float32), weight, cfg)
    with pytest.raises(LocalProtocolError, match="float"):
        encode_update(np.zeros(3, dtype=np.int32), 0.5, cfg)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="1-D"):
        encode_update(np.zeros((2, 2), dtype=np.float32), 0.5, cfg)


def test_decode_rejects_mismatches() -> None:
    cfg = MaskConfig(1.0, 10, 32)
    words = encode_update(np.zeros(3, dtype=np.float32), 1.0, cfg)
    with pytest.raises(AggregationError, match="64-bit"):
        decode_aggregate(words, 1, MaskConfig(1.0, 10, 64))
    for n in (0, 11, -1):
        with pytest.raises(AggregationError, match="n_included"):
            decode_aggregate(words, n, cfg)
    with pytest.raises(AggregationError):
        decode_aggregate(np.zeros(0, dtype=np.uint32), 1, cfg)


def test_word_operations_reject_mismatches() -> None:
    acc = np.zeros(4, dtype=np.uint32)
    with pytest.raises(AggregationError, match="word size"):
        add_words(acc, np.zeros(4, dtype=np.uint64))
    with pytest.raises(AggregationError, match="length"):
        add_words(acc, np.zeros(5, dtype=np.uint32))
    with pytest.raises(AggregationError):
        add_words(np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.int32))  # type: ignore[arg-type]
    with pytest.raises(AggregationError, match="length"):
        unmask(acc, np.zeros(3, dtype=np.uint32))
    with pytest.raises(AggregationError, match="writeable"):
        add_mask(np.zeros((2, 2), dtype=np.uint32), bytes(32))
    readonly = np.zeros(4, dtype=np.uint64)
    readonly.flags.writeable = False
    with pytest.raises(AggregationError):
        add_mask(readonly, bytes(32))
    assert not readonly.any()
    with pytest.raises(CryptoError, match="32 bytes"):
        add_mask(acc, bytes(31))
    with pytest.raises(CryptoError):
        aggregate_mask([bytes(32), b"short"], 4, 32)
    with pytest.raises(LocalProtocolError):
        mask_stream(bytes(32), 4, 16)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        add_mask(acc, bytes(32), chunk_bytes=8)
    assert not acc.any()


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bound": 0.0, "n_max": 10, "word_bits": 32}, "bound"),
        ({"bound": -1.0, "n_max": 10, "word_bits": 32}, "bound"),
        ({"bound": math.inf, "n_max": 10, "word_bits": 32}, "bound"),
        ({"bound": math.nan, "n_max": 10, "word_bits": 32}, "bound"),
        ({"bound": "1", "n_max": 10, "word_bits": 32}, "bound"),
        ({"bound": 1.0, "n_max": 0, "word_bits": 32}, "n_max"),
        ({"bound": 1.0, "n_max": 2.5, "word_bits": 32}, "n_max"),
        ({"bound": 1.0, "n_max": True, "word_bits": 32}, "n_max"),
        ({"bound": 1.0, "n_max": 10, "word_bits": 16}, "word_bits"),
        ({"bound": 1e12, "n_max": 10, "word_bits": 32}, "n_max"),
        ({"bound": 1.0, "n_max": 2**31, "word_bits": 32}, "n_max"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MaskConfig(**kwargs)
    assert info.value.field == field


def test_for_tolerance_prefers_32_bits() -> None:
    cfg = MaskConfig.for_tolerance(1.0, 1000, 1e-6)
    assert cfg.word_bits == 32
    assert cfg.resolution <= 1e-6
    wide = MaskConfig.for_tolerance(1.0, 1000, 1e-9)
    assert wide.word_bits == 64
    assert wide.resolution <= 1e-9
    # 32-bit words cannot hold n_max = 2^31 at all: 64 bits, not an error.
    assert MaskConfig.for_tolerance(1.0, 2**31, 1e-3).word_bits == 64
    with pytest.raises(ConfigError) as info:
        MaskConfig.for_tolerance(1.0, 1000, 1e-30)
    assert info.value.field == "tolerance"
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError) as info:
            MaskConfig.for_tolerance(1.0, 1000, bad)
        assert info.value.field == "tolerance"
    with pytest.raises(ConfigError) as info:
        MaskConfig.for_tolerance(-1.0, 1000, 1e-3)
    assert info.value.field == "bound"


def test_error_bound_matches_the_design_for_bound_one() -> None:
    # B = 1: B·S is an integer, so the bound is the design's n/(2·S·W) for each of the
    # weighted sum and the weight sum, plus float slack.
    cfg = MaskConfig(1.0, 1000, 32)
    n, weight_sum = 100, 40.0
    design = n / (2 * cfg.scale * weight_sum) + n / (2 * cfg.weight_scale * weight_sum)
    assert error_bound(n, weight_sum, cfg) == pytest.approx(design, rel=1e-6)
    assert error_bound(0, 1.0, cfg) < 1e-14
    with pytest.raises(LocalProtocolError):
        error_bound(-1, 1.0, cfg)


@pytest.mark.parametrize("bits", BITS)
def test_out_receives_the_words_without_allocation(bits: WordBits) -> None:
    cfg = MaskConfig(1.0, 10, bits)
    delta = np.linspace(-2, 2, 1001, dtype=np.float32)
    seed = b"\x03" * 32
    buffer = bytearray(8 + update_words(1001) * bits // 8)  # e.g. after an 8-byte header
    slot = np.frombuffer(buffer, dtype=cfg.dtype, offset=8)
    assert mask_update(delta, 0.25, seed, cfg, out=slot) is slot
    assert np.array_equal(slot, mask_update(delta, 0.25, seed, cfg))
    assert encode_update(delta, 0.25, cfg, out=slot) is slot
    assert np.array_equal(slot, encode_update(delta, 0.25, cfg))
    for bad in (np.empty(1002, dtype=cfg.dtype), np.empty(1005, dtype=np.float64)):
        with pytest.raises(AggregationError):
            mask_update(delta, 0.25, seed, cfg, out=bad)  # type: ignore[arg-type]
    before = bytes(buffer)
    with pytest.raises(LocalProtocolError):
        encode_update(np.full(1001, np.nan, dtype=np.float32), 0.25, cfg, out=slot)
    assert bytes(buffer) == before  # nothing written on error


@settings(max_examples=40, deadline=None)
@given(cfg=configs, data=st.data())
def test_masked_aggregate_recovers_the_mean(cfg: MaskConfig, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, min(cfg.n_max, 5)))
    m = data.draw(st.integers(1, 300))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    deltas = [(rng.standard_normal(m) * cfg.bound).astype(np.float32) for _ in range(n)]
    weights = [data.draw(st.floats(0.01, 1.0)) for _ in range(n)]
    update_seeds = [data.draw(seeds) for _ in range(n)]
    evals = []
    for _ in range(n):
        examples = data.draw(st.integers(0, cfg.eval_max_examples))
        correct = data.draw(st.integers(0, examples))
        loss = data.draw(st.floats(0.0, float(examples * LOSS_CAP)))
        evals.append(EvalCounts(examples, correct, loss))
    total = np.zeros(update_words(m), dtype=cfg.dtype)
    for delta, a, seed, ev in zip(deltas, weights, update_seeds, evals, strict=True):
        add_words(total, mask_update(delta, a, seed, cfg, evaluation=ev))
    mask = aggregate_mask(update_seeds, update_words(m), cfg.word_bits)
    plain = unmask(total, mask)
    weighted_sum, weight_sum = decode_aggregate(plain, n, cfg)
    means, _ = _exact_mean(deltas, weights, cfg.bound)
    bound = error_bound(n, weight_sum, cfg)
    for got, want in zip(weighted_sum / weight_sum, means, strict=True):
        assert abs(Fraction(float(got)) - want) <= Fraction(bound)
    # Only the fleet totals come out: counts exactly, the loss within half a unit each.
    fleet = decode_evaluation(plain, n, cfg)
    assert fleet.examples == sum(e.examples for e in evals)
    assert fleet.correct == sum(e.correct for e in evals)
    exact_loss = sum(Fraction(e.loss_sum) for e in evals)
    float_slack = exact_loss * Fraction(2) ** -52  # the float returned
    assert abs(Fraction(fleet.loss_sum) - exact_loss) <= (
        Fraction(n, 2 * cfg.loss_scale) + float_slack
    )


@settings(max_examples=60, deadline=None)
@given(cfg=configs)
def test_evaluation_words_never_wrap(cfg: MaskConfig) -> None:
    """N_max updates at every evaluation word's maximum still sum below 2^w."""
    assert cfg.loss_scale >= 1 and cfg.eval_max_examples >= 1
    top = encode_evaluation(
        EvalCounts(cfg.eval_max_examples, cfg.eval_max_examples, cfg.eval_max_examples * LOSS_CAP),
        cfg,
    )
    assert max(top) * cfg.n_max <= cfg.modulus - 1
    total = np.array([w * cfg.n_max for w in top], dtype=object)
    fleet = decode_evaluation(np.array(total, dtype=cfg.dtype), cfg.n_max, cfg)
    assert fleet.accuracy == 1.0 and fleet.loss == LOSS_CAP


@pytest.mark.parametrize(
    "bad",
    [
        EvalCounts(-1, 0, 0.0),
        EvalCounts(3, 4, 0.0),
        EvalCounts(5000, 0, 0.0),
        EvalCounts(3, 1, 3 * LOSS_CAP + 1.0),
        EvalCounts(3, 1, float("nan")),
        EvalCounts(3, 1, -0.5),
    ],
)
def test_evaluation_out_of_range_is_refused(bad: EvalCounts) -> None:
    cfg = MaskConfig(1.0, 1000, 32)
    with pytest.raises(LocalProtocolError):
        encode_evaluation(bad, cfg)
    with pytest.raises(LocalProtocolError):
        mask_update(np.zeros(4, np.float32), 0.5, bytes(32), cfg, evaluation=bad)


def test_impossible_fleet_totals_are_refused() -> None:
    cfg = MaskConfig(1.0, 1000, 32)
    with pytest.raises(AggregationError):  # more correct than examples: a bad updater
        decode_evaluation(np.array([0, 0, 5, 6, 0], dtype=np.uint32), 1, cfg)
    with pytest.raises(AggregationError):  # more examples than n updates may hold
        decode_evaluation(np.array([0, 0, cfg.eval_max_examples + 1, 0, 0], np.uint32), 1, cfg)
