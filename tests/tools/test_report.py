"""The demo report's statistics: randomness of bytes, the aggregate check, the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.masking import MaskConfig, encode_update, mask_stream
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import RoundOutcome
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


def _completed(i: int, version: int) -> rep.RoundReport:
    return rep.RoundReport(
        round_id=i,
        outcome=RoundOutcome.COMPLETED,
        model_version=version,
        participants=5,
        summers=2,
        accuracy=0.5 + 0.1 * i,
        loss=1.0 / i,
        seconds=3.0,
        bytes_per_device=20_000.0,
        phases=rep.phase_times({"sum": 1.0, "update": 1.5, "sum2": 0.2, "unmask": 0.01}),
        fleet_accuracy=0.4 + 0.1 * i,
        fleet_loss=1.2 / i,
        fleet_examples=300,
        evaluated_version=version - 1,
    )


def _failed(i: int) -> rep.RoundReport:
    """A round whose update phase timed out with no update."""
    return rep.RoundReport(
        round_id=i,
        outcome=RoundOutcome.FAILED,
        model_version=None,
        participants=0,
        summers=1,
        accuracy=None,
        loss=None,
        seconds=None,
        bytes_per_device=0.0,
        phases=rep.phase_times({"sum": 20.0}),
        reason="RoundFailedError: update phase: 0 of at least 2 messages by time_max",
    )


def test_report_writes_json_and_png(tmp_path: Path) -> None:
    report = rep.Report(config={"title": "t"})
    report.rounds += [_completed(1, 1), _completed(3, 2), _completed(4, 3)]
    report.rounds.append(_failed(2))
    report.summary = {"failed_rounds": [2], "initial_accuracy": 0.1, "initial_loss": 2.3}
    report.privacy = {
        "stored_update": {
            "looks_random": True,
            "masked": {"entropy_bits_per_byte": 7.998, "p_value": 0.41},
        },
        "aggregate_checks": [{"within": True, "max_abs_difference": 1e-7}] * 3,
    }
    json_path, png_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert [r["round_id"] for r in data["rounds"]] == [1, 3, 4, 2]
    failed = [r for r in data["rounds"] if r["outcome"] == "failed"]
    assert [r["round_id"] for r in failed] == [2] and "update phase" in failed[0]["reason"]
    # Every round's phases have the same keys, reached or not.
    assert {tuple(r["phases"]) for r in data["rounds"]} == {rep.PHASES}
    assert failed[0]["phases"]["update"] is None
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdict = rep.privacy_verdict(report.privacy)
    assert verdict is not None and "looks uniform" in verdict and "3/3" in verdict


async def test_round_rows_from_the_coordinator_database(tmp_path: Path) -> None:
    """The demo reads phase times and a failed round's reason from the real store."""
    import dataclasses

    from maskfl.broker_coordinator.store import RoundRecord as Row
    from maskfl.broker_coordinator.store import Store
    from maskfl.tools._demo_watch import coordinator_round

    row = Row(1, Phase.SUM, b"s" * 32, bytes(32), 0.5, 1.0, b"params", 100.0, 100.0)
    async with Store.open(tmp_path / "coordinator.db") as store:
        for phase, at in ((Phase.SUM, 100.0), (Phase.UPDATE, 101.5), (Phase.SUM2, 104.0)):
            async with store.transaction() as tx:
                row = dataclasses.replace(row, phase=phase, phase_opened_at=at)
                await tx.put_round(row)
        async with store.transaction() as tx:
            await tx.put_round(
                dataclasses.replace(
                    row,
                    phase=Phase.FAILURE,
                    outcome=RoundOutcome.FAILED,
                    detail="sum2: 0 of 1",
                    finished_at=134.0,
                )
            )
    got = coordinator_round(tmp_path, 1)
    assert got is not None and got.outcome is RoundOutcome.FAILED and got.detail == "sum2: 0 of 1"
    assert rep.phase_times(got.phases) == {"sum": 1.5, "update": 2.5, "sum2": 30.0, "unmask": None}
    assert (got.started_at, got.finished_at) == (100.0, 134.0)
    assert coordinator_round(tmp_path, 2) is None


def test_the_plot_shades_a_failed_round_and_keeps_legends_off_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report.png as the issue asks: the failed round shaded in both panels with its
    reason, no line across it, legends beside the axes, title and axis on the same
    rounds, round time and the privacy verdict on the figure."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    rounds = [_completed(1, 1), _failed(2), _completed(3, 2), _completed(4, 3)]
    verdict = "privacy: a stored masked update looks uniform"
    rep.plot(rounds, tmp_path / "r.png", title="demo", initial=(0.1, 2.3), privacy=verdict)
    (fig,) = figures
    ax_acc, ax_part = fig.axes[0], fig.axes[1]
    for ax in (ax_acc, ax_part):  # shaded across both panels, exactly round 2
        spans = [p.get_extents().transformed(ax.transData.inverted()) for p in ax.patches]
        assert any(abs(s.x0 - 1.5) < 1e-6 and abs(s.x1 - 2.5) < 1e-6 for s in spans), ax
    for ax in fig.axes:  # no line drawn across round 2
        for line in ax.get_lines():
            xs, ys = (list(v) for v in line.get_data())
            if 2 in xs:
                assert math.isnan(ys[xs.index(2)]), line.get_label()
    fig.canvas.draw()
    texts = [
        t.get_text()
        for leg in fig.legends + [a.get_legend() for a in fig.axes]
        if leg
        for t in leg.get_texts()
    ]
    assert any("round 2 failed: update phase" in t for t in texts), texts
    assert "round time (s)" in texts
    renderer = fig.canvas.get_renderer()
    for ax in (ax_acc, ax_part):  # legends to the right of every axes box
        legend = ax.get_legend()
        right = max(a.get_window_extent(renderer).x1 for a in fig.axes)
        assert legend.get_window_extent(renderer).x0 >= right - 1
    title = fig._suptitle.get_text()
    assert "3 rounds completed, 1 failed" in title
    lo, hi = ax_part.get_xlim()
    assert lo < 0 and 4 < hi < 5  # the axis shows rounds 0..4, as the title counts them
    assert verdict in [t.get_text() for t in fig.texts]
