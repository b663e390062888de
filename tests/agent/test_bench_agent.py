"""``maskfl-bench agent`` runs and reports what it promises (tiny sizes; no timing asserts)."""

from __future__ import annotations

import argparse

from maskfl.tools import bench_agent


def test_bench_agent_smoke() -> None:
    parser = argparse.ArgumentParser()
    bench_agent.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "agent",
            "--no-train",
            "--repeats",
            "1",
            "--sizes",
            "1000",
            "--updates",
            "3",
            "--expansion-size",
            "5000",
            "--groups",
            "1",
            "3",
            "--groups-size",
            "2000",
            "--dp-sizes",
            "500",
        ]
    )
    result = bench_agent.run(args)
    assert set(result["updater"]) >= {"mlp", "cnn", "M=1000"}
    mlp = result["updater"]["mlp"]
    assert mlp["words"] == mlp["params"] + 1
    assert mlp["message_bytes"] > 4 * mlp["params"]
    bulk = result["summer"][0]
    assert bulk["updates"] == 3 and bulk["words"] == 5001
    assert bulk["expansion_gwords_per_s"] > 0
    assert "meets_target" in bulk
    assert len(result["global_model"]) == 3
    one, three = result["mask_groups"]
    assert (one["groups"], one["summers"]) == (1, 3)
    assert (three["groups"], three["summers"]) == (3, 9)
    assert three["sealed_bytes"] == 3 * one["sealed_bytes"] > 0
    assert three["mask_s"] > 0 and three["seal_s"] > 0
    dp = result["dp_noise"]
    assert set(dp) == {"mlp", "cnn", "M=500"}
    small = dp["M=500"]
    assert small["params"] == 500 and small["noise_variance"] > 1
    assert small["noise_s"] > 0 and small["clip_add_mask_s"] > 0
    # The noise tail widens the encoding: a coarser resolution than without DP.
    assert small["resolution"] > small["resolution_without_dp"]
