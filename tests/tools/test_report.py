"""The demo report's statistics: randomness of bytes, the aggregate check, the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.masking import MaskConfig, encode_update, mask_stream
from maskfl.tools import report as rep


def test_masked_words_look_random_and_plain_words_do_not() -> None:
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 0.05, 20_000).astype(np.float32)
    cfg = MaskConfig(1.0, 1000, 32)
    encoded = encode_update(delta, 0.3, cfg)
    masked = encoded + mask_stream(bytes(range(32)), encoded.size, 32)  # wraps mod 2^32
    random = rep.randomness(masked)
    plain = rep.randomness(encoded)
    assert random.n_bytes == 4 * encoded.size
    assert random.entropy_bits_per_byte > 7.99
    assert random.p_value > 1e-4
    assert plain.entropy_bits_per_byte < 7.0
    assert plain.p_value < 1e-12
    assert rep.randomness(delta).chi_square > 10 * random.chi_square


def test_constant_bytes_have_zero_entropy() -> None:
    r = rep.randomness(b"\x00" * 4096)
    assert r.entropy_bits_per_byte == 0.0
    assert r.p_value < 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_plain_weighted_mean_is_fedavg_of_clipped_deltas(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    deltas = [rng.uniform(-2, 2, 50).astype(np.float32) for _ in range(k)]
    samples = [int(s) for s in rng.integers(1, 3000, k)]
    mean, ws = rep.plain_weighted_mean(
        list(zip(deltas, samples, strict=True)), sample_cap=1000, bound=1.0
    )
    weights = [min(s, 1000) / 1000 for s in samples]
    expected = sum(
        w * np.clip(d.astype(np.float64), -1, 1) for w, d in zip(weights, deltas, strict=True)
    )
    assert ws == pytest.approx(sum(weights))
    np.testing.assert_allclose(mean, expected / sum(weights), rtol=1e-12, atol=1e-12)
    assert np.abs(mean).max() <= 1.0 + 1e-12


def test_aggregate_check_accepts_the_bound_and_rejects_more() -> None:
    previous = np.linspace(-1, 1, 100).astype(np.float32)
    mean = np.linspace(-0.01, 0.01, 100)
    current = (previous + mean).astype(np.float32)
    ok = rep.check_aggregate(
        3,
        previous,
        current,
        mean,
        updates=4,
        lr=1.0,
        error_bound=1e-6,
        weight_sum_plain=1.0,
        weight_sum_decoded=1.0,
    )
    assert ok.within and ok.max_abs_difference <= ok.tolerance
    off = rep.check_aggregate(
        3,
        previous,
        current,
        mean + 1e-4,
        updates=4,
        lr=1.0,
        error_bound=1e-6,
        weight_sum_plain=1.0,
        weight_sum_decoded=1.0,
    )
    assert not off.within
    assert off.max_abs_difference == pytest.approx(1e-4, rel=0.1)


def test_report_writes_json_and_png(tmp_path: Path) -> None:
    report = rep.Report(config={"title": "t"})
    for i in range(1, 4):
        report.rounds.append(
            rep.RoundRecord(i, i, 5, 2, 0.5 + 0.1 * i, 1.0 / i, 3.0, 20_000.0, {"sum": 1.0})
        )
    report.summary = {"failed_rounds": [2], "initial_accuracy": 0.1, "initial_loss": 2.3}
    json_path, png_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert [r["round_id"] for r in data["rounds"]] == [1, 2, 3]
    assert data["rounds"][0]["phases"] == {"sum": 1.0}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
