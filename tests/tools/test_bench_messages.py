"""``maskfl-bench messages`` runs and reports what it promises (no times asserted)."""

from __future__ import annotations

import argparse

from maskfl.tools.bench_messages import add_parser, run


def test_bench_messages_reports_every_rate() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["messages", "--sizes", "1000", "--repeats", "1"])
    report = run(args)
    assert [(r["M"], r["word_bits"]) for r in report["results"]] == [(1000, 32), (1000, 64)]
    for result in report["results"]:
        assert result["message_bytes"] > 1001 * result["word_bits"] // 8
        for name in ("encode", "decode_verify", "sha256", "chunk"):
            assert result[name]["gbps_median"] > 0
    assert report["target"]["target_met"] is None  # the 8 MB case was not run


def test_bench_messages_takes_a_list_of_sizes() -> None:
    assert len(run([500])["results"]) == 2
