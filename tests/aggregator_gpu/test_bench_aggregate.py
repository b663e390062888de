"""``maskfl-bench aggregate`` produces well-formed rows (tiny sizes; no timing asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from maskfl.aggregator_gpu import BackendUnavailableError, CupyBackend
from maskfl.tools import bench_aggregate


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_aggregate.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["aggregate", *argv])


def run(*argv: str) -> dict[str, Any]:
    result = bench_aggregate.run(parse(*argv))
    json.dumps(result)  # JSON-ready
    return result


def test_defaults_match_the_issue() -> None:
    args = parse()
    assert (args.backend, args.n, args.m, args.word_bits) == ("all", 100, 1_000_000, 64)
    assert parse("--m", "1e5").m == 100_000


@pytest.mark.parametrize("bad", ["0", "1.5", "x", "-3"])
def test_bad_counts_are_usage_errors(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse("--n", bad)


def test_numpy_row_has_numbers() -> None:
    result = run(
        "--backend", "numpy", "--n", "5", "--m", "1000", "--word-bits", "32", "--repeat", "2"
    )
    (row,) = result["rows"]
    assert row["backend"] == "numpy"
    assert (row["n"], row["m"], row["word_bits"]) == (5, 1000, 32)
    assert row["elements"] == 5000
    assert row["elements_per_s"] > 0
    assert row["gb_per_s_in"] > 0
    assert len(row["seconds_all"]) == 2
    assert row["host_peak_alloc_bytes"] >= 1000 * 4
    assert row["distinct_inputs"] == 5


def test_cupy_row_says_no_device_without_a_gpu() -> None:
    try:
        CupyBackend.open()
    except BackendUnavailableError as exc:
        reason = str(exc)
    else:
        pytest.skip("this machine has a working GPU")
    result = run("--backend", "all", "--n", "3", "--m", "100", "--repeat", "1")
    rows = {row["backend"]: row for row in result["rows"]}
    assert set(rows) == {"numpy", "cupy"}
    assert rows["cupy"]["elements_per_s"] == "no device"
    assert rows["cupy"]["gb_per_s_in"] == "no device"
    assert rows["cupy"]["reason"] == reason
    assert isinstance(rows["numpy"]["elements_per_s"], float)


def test_auto_reports_what_it_selected() -> None:
    (row,) = run("--backend", "auto", "--n", "2", "--m", "64", "--repeat", "1")["rows"]
    assert row["selected"] in {"numpy", "cupy"}


def test_json_option_is_registered(tmp_path: Path) -> None:
    assert parse("--json", str(tmp_path / "out.json")).json == tmp_path / "out.json"


def test_array_inputs() -> None:
    result = run("--backend", "numpy", "--input", "array", "--n", "3", "--m", "50", "--repeat", "1")
    assert result["input"] == "array"
    assert result["rows"][0]["input_pool_bytes"] == 3 * 50 * 8
