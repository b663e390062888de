"""``maskfl-bench scale`` at toy sizes: every part runs and reports what it promises.

No time is asserted (benchmarks measure, tests do not): the rows must complete,
name their phases, count the idle fleet the coordinator saw, and show that devices
which fetch the model on demand make the broker send less than devices subscribed
to every model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskfl.tools.bench import main

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(300)]


def test_scale_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    # fmt: off
    argv = [
        "scale", "--json", str(out),
        "--n", "4", "--n-m", "2000", "--m", "3000", "--m-n", "2",
        "--idle", "120", "--interval", "1", "--window", "2", "--round-n", "3", "--idle-rounds", "1",
        "--fanout-devices", "120", "--fanout-n", "2", "--fanout-m", "20000",
        "--fleet-devices", "150", "--fleet-updaters", "3", "--fleet-rounds", "2",
        "--per-broker", "100", "--per-process", "80",
    ]
    # fmt: on
    assert main(argv) == 0
    result = json.loads(out.read_text())["results"]
    assert [(r["n"], r["m"]) for r in result["rounds"]] == [(4, 2000), (2, 3000)]
    for row in result["rounds"]:
        assert "error" not in row, row
        assert row["outcome"] == "completed"
        assert set(row["phases_s"]) == {"sum", "update", "sum2", "unmask"}
        assert row["ingest_s"] > 0 and row["coordinator_cpu_ms_per_update"] >= 0
        assert row["peak_rss_mb"]["coordinator"] > 0 and row["peak_rss_mb"]["core_broker"] > 0
        assert row["broker_bytes_out"] > row["n"] * row["update_bytes"] // 10
    base, loaded = result["idle"]
    assert base["devices"] == 0 and loaded["devices"] == 120
    assert loaded["brokers"] == 3  # 120 devices at 100 per broker: core + 2 bridged edges
    assert loaded["fleet"]["connected"] == 120
    assert loaded["coordinator_idle"]["devices_alive"] == 120  # heard through the bridges
    assert loaded["coordinator_idle"]["heartbeats_per_s"] > 0
    # the round with the fleet's heartbeats on, then paused, on the same bed
    assert [r["heartbeats_paused"] for r in loaded["rounds"]] == [False, True]
    assert [r["outcome"] for r in base["rounds"] + loaded["rounds"]] == ["completed"] * 3
    assert set(loaded["with_and_without"]) == {"heartbeats_on", "heartbeats_paused"}
    assert loaded["with_and_without"]["heartbeats_on"]["heartbeats_own_cpu_s"] > 0
    assert set(base["with_and_without"]) == {"no_fleet"}
    # the coordinator alone on its CPU, the rest of the bed on the others
    cpus = result["cpus"]
    if cpus is not None:
        assert loaded["cpus"] == cpus and cpus["coordinator"] == [0]
        assert 0 not in cpus["bed"]
    before, after = result["fanout"]["before"], result["fanout"]["after"]
    assert before["devices_subscribe_to_models"] and not after["devices_subscribe_to_models"]
    assert after["round_2"]["model_fetches"] == 2  # the two updaters of round 2
    # 120 devices x an 80 kB model, against two fetches of it.
    assert before["broker_bytes_out_round_2"] > 120 * 80_000
    assert after["broker_bytes_out_round_2"] < before["broker_bytes_out_round_2"] / 5
    fleet = result["fleet"]
    assert [r["outcome"] for r in fleet["rounds"]] == ["completed", "completed"]
    assert [r["heartbeats_paused"] for r in fleet["rounds"]] == [False, True]
    # each round's CPU window, and the fleet's heartbeats in it (none while paused)
    assert all(r["coordinator_cpu_window_s"] > 0 for r in fleet["rounds"])
    assert fleet["rounds"][1]["heartbeats_in_cpu_window"] == 0
    assert fleet["coordinator_idle"]["devices_alive"] == 150


def test_scale_rounds_with_two_mask_groups(tmp_path: Path) -> None:
    """The hand-built updates take the round's g: one seed per group, each sealed to its
    group's summers (with g = 1 assumed, the sum dictionary's group check refused them)."""
    out = tmp_path / "scale.json"
    argv = ["scale", "--json", str(out), "--parts", "rounds", "--groups", "2"]
    assert main([*argv, "--n", "3", "--n-m", "2000", "--m", "2000", "--m-n", "2"]) == 0
    result = json.loads(out.read_text())["results"]
    assert result["groups"] == 2
    for row in result["rounds"]:
        assert "error" not in row, row
        assert row["outcome"] == "completed"


def test_scale_refuses_groups_out_of_range() -> None:
    with pytest.raises(SystemExit, match="--groups 256: pick 1 to 255"):
        main(["scale", "--parts", "rounds", "--groups", "256"])
