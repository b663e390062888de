"""``maskfl-bench scale`` at toy sizes: every part runs and reports what it promises.

No time is asserted (benchmarks measure, tests do not): the rows must complete,
name their phases, count the idle fleet the coordinator saw, and show that devices
which fetch the model on demand make the broker send less than devices subscribed
to every model. The table it prints on stdout shows each row's figures in their columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from maskfl.tools.bench import main
from maskfl.tools.bench_scale import format_table

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(300)]


def test_scale_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert loaded["with_and_without"]["heartbeats_on"]["coordinator_cpu_s"] > 0
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
    # and where the machine's time went over it: each CPU's busy share, the brokers' CPU
    windows = loaded["rounds"] + fleet["rounds"]
    for r in windows:
        busy = r["cpu_busy_in_cpu_window"]
        assert busy and all(0 <= b <= 1 for b in busy.values()), busy
        _check_split(r, busy)
    if cpus is not None:
        _check_affinity(loaded["affinity"], cpus)
    # they carried the rounds' updates (one round alone may fall under a clock tick)
    assert sum(r["brokers_cpu_s_in_cpu_window"] for r in windows) > 0
    assert fleet["coordinator_idle"]["devices_alive"] == 150
    _check_table(capsys.readouterr().out, result)


def _check_split(r: dict[str, Any], busy: dict[str, float]) -> None:
    """A window's busy share by /proc/stat field, softirqs and other processes' CPU."""
    split = r["cpu_busy_split_in_cpu_window"]
    assert split.keys() == busy.keys()
    for cpu, fields in split.items():  # the fields add up to the busy share
        assert abs(sum(fields.values()) - busy[cpu]) <= 0.01, (fields, busy[cpu])
    assert r["softirqs_in_cpu_window"].keys() == busy.keys()
    assert r["others_cpu_in_cpu_window"]["total_s"] >= 0


def _check_affinity(aff: dict[str, dict[str, int]], cpus: dict[str, list[int]]) -> None:
    """Every thread of every process of the bed, read back, on the bed's CPUs (the
    coordinator's alone on its own)."""
    assert {"bench", "publisher", "coordinator", "core", "idle0"} <= aff.keys(), aff
    for name, threads in aff.items():
        want = cpus["coordinator"] if name == "coordinator" else cpus["bed"]
        assert set(threads) == {",".join(map(str, want))}, (name, threads)


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The printed tables by title: each row as {column: cell}; failed rows as {"failed": line}."""
    tables: dict[str, list[dict[str, str]]] = {}
    head: list[str] = []
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not head:
                head = cells
            elif not set(line) <= set("|-:"):
                rows.append(dict(zip(head, cells, strict=True)))
        elif line.startswith("failed: "):
            rows.append({"failed": line})
        elif line:
            rows = tables.setdefault(line, [])
            head = []
    return tables


def _num(cell: str) -> float:
    """The cell's first number, with its unit's factor (kB, MB, GB): '1.3 MB' -> 1.3e6."""
    value, *unit = cell.replace(",", "").split()
    return float(value) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit[0] if unit else "", 1)


def _near(value: float, half_digit: float) -> Any:
    """A printed figure is within half its last digit of the value, plus float error:
    0.365 is the float 0.36499..., printed '0.36', 0.005000000000000004 away."""
    return pytest.approx(value, abs=half_digit * 1.001)


def _check_table(printed: str, result: dict[str, Any]) -> None:
    tables = _tables(printed)
    rounds = tables["Rounds"]
    assert [(_num(c["N"]), float(c["M"])) for c in rounds] == [(4, 2000), (2, 3000)]
    for cells, row in zip(rounds, result["rounds"], strict=True):
        for phase, seconds in row["phases_s"].items():
            assert _num(cells[phase]) == _near(seconds, 0.005)
        assert _num(cells["first update → model"]) == _near(row["first_update_to_model_s"], 0.005)
        assert _num(cells["coordinator ingest"]) == _near(row["ingest_s"], 0.005)
        assert f"({row['ingest_updates_per_s']:,.0f}/s)" in cells["coordinator ingest"]
        assert _num(cells["CPU per update"]) == _near(row["coordinator_cpu_ms_per_update"], 0.5)
        coordinator, broker = (
            cells["peak RSS coordinator / broker"].removesuffix(" MB").split(" / ")
        )
        assert _num(coordinator) == _near(row["peak_rss_mb"]["coordinator"], 0.5)
        assert _num(broker) == _near(row["peak_rss_mb"]["core_broker"], 0.5)
        assert _num(cells["broker bytes out"]) == pytest.approx(row["broker_bytes_out"], rel=0.05)
    idle = tables["Idle fleet"]
    assert [_num(c["devices"]) for c in idle] == [0, 120]
    assert [_num(c["devices alive"]) for c in idle] == [0, 120]
    loaded = result["idle"][1]["coordinator_idle"]
    assert _num(idle[1]["heartbeats/s"]) == _near(loaded["heartbeats_per_s"], 0.5)
    assert _num(idle[1]["coordinator CPU (share of a core)"]) == _near(
        loaded["cpu_share_of_one_core"] * 100, 0.05
    )
    assert _num(idle[1]["per heartbeat, net"]) == _near(loaded["cpu_us_per_heartbeat_net"], 0.05)
    both = tables["Rounds with and without the idle fleet's heartbeats (medians)"]
    assert [(_num(c["devices"]), c["heartbeats"]) for c in both] == [
        (0, "—"), (120, "on"), (120, "paused")
    ]  # fmt: skip
    medians = [*result["idle"][0]["with_and_without"].values(),
               *result["idle"][1]["with_and_without"].values()]  # fmt: skip
    for cells, med in zip(both, medians, strict=True):
        assert _num(cells["first update → model"]) == _near(med["first_update_to_model_s"], 0.005)
        assert _num(cells["brokers CPU per round"]) == _near(med["brokers_cpu_s"], 0.005)
        shares = dict(c.split(": ") for c in cells["busy per CPU"].split(", "))
        assert shares.keys() == med["cpu_busy"].keys()
        for cpu, share in med["cpu_busy"].items():
            assert _num(shares[cpu]) == _near(share * 100, 0.5)
    before, after = tables["Model fan-out (broker bytes out over round 2)"]
    assert (before["subscribed to"], after["subscribed to"]) == ("every model", "models on demand")
    assert _num(after["broker bytes out"]) == pytest.approx(
        result["fanout"]["after"]["broker_bytes_out_round_2"], rel=0.05
    )
    fleet = tables["Fleet: 150 devices, 3 updaters per round"]
    assert [(c["round"], c["heartbeats"], c["outcome"]) for c in fleet] == [
        ("1", "on", "completed"), ("2", "paused", "completed")
    ]  # fmt: skip
    # A failed row is said below its table, and the rows that completed are still shown.
    failed = {"name": "round-n9-m9", "error": "TimeoutError: round 1"}
    partial = _tables(format_table({"rounds": [result["rounds"][1], failed]}))
    assert partial == {
        "Rounds": [rounds[1], {"failed": "failed: round-n9-m9: TimeoutError: round 1"}]
    }


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
