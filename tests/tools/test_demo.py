"""End to end: ``maskfl-demo`` with a real mosquitto, coordinator and agent processes.

A short demo (5 devices, 3 rounds) must finish, write its report with the privacy
check, and leave no process behind; so must a demo interrupted with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def _processes(marker: Path) -> list[psutil.Process]:
    """Processes whose command line mentions ``marker`` (the demo's work directory)."""
    return [
        proc
        for proc in psutil.process_iter(["pid", "cmdline"])
        if str(marker) in " ".join(proc.info.get("cmdline") or []) and proc.pid != os.getpid()
    ]


def _survivors(marker: Path) -> list[str]:
    return [f"{p.pid}: {' '.join(p.info.get('cmdline') or [])}" for p in _processes(marker)]


def _demo(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "maskfl.tools.demo",
        "--devices",
        "5",
        "--rounds",
        "3",
        "--workdir",
        str(workdir),
        "--timeout",
        "150",
        *args,
    ]


def test_short_demo_reports_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(_demo(workdir), capture_output=True, text=True, timeout=240, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert _survivors(workdir) == []
    report = json.loads((workdir / "report.json").read_text())
    assert (workdir / "report.png").stat().st_size > 10_000
    rounds = [r for r in report["rounds"] if r["outcome"] == "completed"]
    assert len(rounds) == 3
    assert [r["model_version"] for r in rounds] == [1, 2, 3]
    # The privacy floor: no model from fewer than 3 updates (privacy.min_updates).
    assert all(r["participants"] >= 3 and r["summers"] >= 1 for r in rounds), rounds
    for r in report["rounds"]:  # one shape for every round, failed ones with a reason
        assert list(r["phases"]) == ["sum", "update", "sum2", "unmask"]
        assert (r["outcome"] == "failed") == (r["reason"] is not None)
    assert all(r["phases"]["sum"] is not None for r in rounds)
    # The fleet's own evaluation, under masking, beside the demo's held-out check.
    fleet = report["summary"]["fleet_evaluation"]
    assert [f["model_version"] for f in fleet] == [0, 1, 2]
    assert all(0.0 <= f["fleet_accuracy"] <= 1.0 and f["examples"] > 0 for f in fleet)
    assert fleet[-1]["fleet_accuracy"] > fleet[0]["fleet_accuracy"] + 0.1
    assert "fleet accuracy" in done.stdout
    assert "differential privacy: off" in done.stdout
    assert all(r["epsilon"] is None for r in rounds)
    summary = report["summary"]
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3
    assert summary["bytes_per_updater_per_round"] > 4 * 4810  # a masked update of the MLP
    privacy = report["privacy"]
    stored = privacy["stored_update"]
    assert stored["looks_random"], stored
    assert stored["masked"]["entropy_bits_per_byte"] > 7.9
    assert stored["same_update_encoded_unmasked"]["entropy_bits_per_byte"] < 7.0
    assert privacy["aggregate_matches_plain_mean"], privacy["aggregate_checks"]
    assert len(privacy["aggregate_checks"]) == 3
    assert "accuracy" in done.stdout and str(workdir / "report.json") in done.stdout
    for name in ("mosquitto", "coordinator", "agent-dev-001"):
        assert (workdir / "logs" / f"{name}.log").is_file()
    # [model] graph_file is set: the graph is published and the signed global models
    # state its digest, which is what lets an agent verify it.
    # Only devices that train need it, and sortition decides which do: any agent.
    agent_logs = [p.read_text() for p in (workdir / "logs").glob("agent-dev-*.log")]
    assert any("model graph for 'mlp' verified" in text for text in agent_logs)


# The demo as a terminal starts it: with the default SIGINT. A job started in the background
# (a CI script run with ``&``) ignores SIGINT, its children inherit that, Python then
# installs no Ctrl-C handler and the test's SIGINT would never arrive. The wrapper resets it
# and execs the demo in the same process.
_WITH_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    # The with block closes the pipe whatever happens: a failure here must not leave it
    # to the garbage collector, where it fails the next test (PytestUnraisableExceptionWarning).
    with subprocess.Popen(
        [*_WITH_DEFAULT_SIGINT, *_demo(workdir, "--rounds", "50")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 120
            seen = ""
            while "coordinator pid" not in seen and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line
            assert "coordinator pid" in seen, seen
            assert len(_survivors(workdir)) >= 7  # mosquitto, coordinator, 5 agents
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                for child in _processes(workdir):  # the demo's, orphaned by its SIGKILL
                    with contextlib.suppress(psutil.Error):
                        child.kill()
    assert proc.returncode == 130, seen + rest
    assert "interrupted" in rest
    assert _survivors(workdir) == []


def test_refuses_a_foreign_workdir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "maskfl.tools.demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "not empty" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_dp_demo_reports_accuracy_against_epsilon(tmp_path: Path) -> None:
    """--dp: every model carries epsilon, growing round by round; the report keeps
    it per round beside the accuracy and draws accuracy against epsilon."""
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [*_demo(workdir, "--in-process", "--dp"), "--devices", "8", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "differential privacy: distributed discrete Gaussian" in done.stdout
    report = json.loads((workdir / "report.json").read_text())
    rounds = [r for r in report["rounds"] if r["outcome"] == "completed"]
    assert len(rounds) == 2
    eps = [r["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] and all(r["delta"] == 1e-5 for r in rounds)
    assert rounds[0]["epsilon_round"] == pytest.approx(eps[0])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    assert "epsilon" in done.stdout
    assert (workdir / "report.png").stat().st_size > 10_000


def test_in_process_agents(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [*_demo(workdir, "--in-process", "--quiet"), "--devices", "8", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _survivors(workdir) == []
    report = json.loads((workdir / "report.json").read_text())
    assert report["config"]["in_process"] is True
    assert report["summary"]["rounds_completed"] == 2
    assert report["privacy"]["aggregate_matches_plain_mean"]
    assert "| accuracy" not in done.stdout  # --quiet: the summary only
    assert (workdir / "logs" / "agents-in-process.log").stat().st_size > 0
