"""``maskfl-bench round`` on a tiny round: the JSON it reports (never its timings)."""

from __future__ import annotations

import pytest

from maskfl.tools.bench_round import run_one

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_small_round_reports_phases_bytes_and_the_plain_baseline() -> None:
    result = run_one(4, 1000, summers=2, word_bits=32, plain=True)
    masked, plain = result["masked"], result["plain"]
    seconds = masked["seconds"]
    assert set(seconds) == {"sum", "update", "sum2", "unmask", "total"}
    assert all(v >= 0 for v in seconds.values())
    assert seconds["total"] == pytest.approx(
        seconds["sum"] + seconds["update"] + seconds["sum2"] + seconds["unmask"], abs=1e-3
    )
    # An update is M + 1 32-bit words plus certificate, header, signature and 2 sealed seeds.
    assert 4 * 1001 < masked["bytes_per_updater"] < 4 * 1001 + 2 * 112 + 1024
    assert masked["bytes_per_summer"] > 4 * 1001  # sum + sum2 (the aggregate mask)
    assert masked["model_weights_bytes"] == 4 * 1000
    # The coordinator's unmasking backend, from /status once it is ready (was null: read
    # before the coordinator had built its round services).
    assert isinstance(masked["backend"], str) and masked["backend"], masked["backend"]
    # The plain update is the same message without the sealed seeds (word alignment: +-8).
    extra = masked["bytes_per_updater"] - plain["bytes_per_updater"]
    assert abs(extra - 2 * 112) <= 8
    assert plain["seconds"]["total"] > 0
    overhead = result["masking_overhead"]
    assert overhead["extra_bytes_per_updater"] == extra
    assert overhead["ratio"] > 0
