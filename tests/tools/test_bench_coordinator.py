"""``maskfl-bench coordinator`` at a toy size with g = 2: the hand-built updates seal one
seed per mask group (the sum dictionary's groups checked against the round seed) and
the round completes, so the coordinator unmasked one agreed mask per group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskfl.tools.bench import main

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(300)]


def test_coordinator_bench_with_two_mask_groups(tmp_path: Path) -> None:
    out = tmp_path / "coordinator.json"
    argv = ["coordinator", "--n", "3", "--m", "1000", "--repeat", "1", "--groups", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    assert result["groups"] == 2
    [row] = result["runs"]
    assert (row["n"], row["m"]) == (3, 1000)
    assert row["round_wall_s"] > 0 and row["unmask_publish_s"] >= 0  # the model came out
    # the coordinator's own figures, read from its unmask log line
    assert 0 < row["coordinator_unmask_s"] <= row["coordinator_unmask_publish_s"]
    assert row["coordinator_unmask_cpu_s"] > 0
    # and its per-step breakdown, in order, from its steps log line
    steps = row["coordinator_unmask_steps"]
    assert list(steps) == [
        "mask",
        "subtract",
        "decode_step",
        "metrics",
        "sign",
        "file",
        "commit",
        "publish",
    ]
    assert all(
        set(v) == {"wall_s", "user_s", "system_s", "minor_faults", "major_faults"}
        for v in steps.values()
    )
    total = sum(v["wall_s"] for v in steps.values())  # the steps cover the whole path
    assert total == pytest.approx(row["coordinator_unmask_publish_s"], abs=0.01)
    # memory: the kernel's high-water mark, the default message memory bound and the most
    # of it the ingest held (3 updates of ~4 kB); no base round at this M
    assert row["coordinator_vmhwm_mb"] >= row["coordinator_peak_rss_mb"] > 0
    assert row["message_memory_bound_mb"] == round((256 << 20) / 1e6, 1)
    assert 0 < row["message_memory_peak_mb"] < 1
    assert row["rss_base_mb"] is None


def test_coordinator_bench_refuses_groups_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["coordinator", "--groups", "0"])
    assert "--groups 0: pick 1 to 255" in str(exc.value)
