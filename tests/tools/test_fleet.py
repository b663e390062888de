"""``maskfl-fleet up/status/down`` with real processes: mosquitto, coordinator, agents.

``up`` exits once the fleet is ready and its processes run on without it; ``status``
reports them; ``down`` (a separate process) stops exactly them and nothing else, and
a second ``up`` reuses the provisioned fleet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from maskfl.tools._supervise import recorded

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def fleet(root: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskfl.tools.fleet", "--dir", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def survivors(root: Path) -> list[str]:
    """Live processes whose command line mentions the fleet's folder."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if (
            str(root) in cmdline
            and proc.pid != os.getpid()
            and proc.info.get("status") != psutil.STATUS_ZOMBIE
        ):
            found.append(f"{proc.pid}: {cmdline}")
    return found


def test_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "trial"
    try:
        up = fleet(root, "up", "--devices", "4")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "4/4 agents connected" in up.stdout
        children = recorded(root / "run")
        names = [c.name for c in children]
        assert names == [
            "mosquitto",
            "coordinator",
            "agent-dev-001",
            "agent-dev-002",
            "agent-dev-003",
            "agent-dev-004",
        ]
        # The `up` process is gone; what it started runs on, each with its own log.
        assert all(c.alive() for c in children)
        for child in children:
            assert (root / "logs" / f"{child.name}.log").is_file()
        assert len(survivors(root)) == 6

        status = fleet(root, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "6 of 6 processes running" in status.stdout
        assert "coordinator: round" in status.stdout

        again = fleet(root, "up", "--devices", "4")
        assert again.returncode == 2 and "already up" in again.stderr

        # A bystander whose pid sits in a pid file with another start time (a recycled
        # pid) is not touched by down.
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (root / "run" / "99-stale.pid").write_text(f"{bystander.pid} 1\n")
            down = fleet(root, "down")
            assert down.returncode == 0, down.stdout + down.stderr
            assert "stopped 6 processes" in down.stdout
            assert bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()
        assert survivors(root) == []
        assert not any((root / "run").glob("*.pid"))
        stopped = fleet(root, "status")
        assert stopped.returncode == 1 and "is down" in stopped.stdout

        # A second up reuses the fleet (no provisioning) and down stops it again. A device
        # revoked meanwhile (README's example) is left out, not started to fail the up.
        revoked = subprocess.run(
            [
                *(sys.executable, "-m", "maskfl.broker_coordinator.provision.cli"),
                *("--dir", str(root / "fleet"), "revoke", "dev-004"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        second = fleet(root, "up", "--devices", "4")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "provisioning" not in second.stdout
        assert "dev-004      revoked, not started" in second.stdout
        assert "3/3 agents connected" in second.stdout
        # ... connected again, not found in the first up's part of the appended log
        broker_log = (root / "logs" / "mosquitto.log").read_text()
        assert all(broker_log.count(f" as dev-00{i} ") >= 2 for i in (1, 2, 3)), broker_log
        assert [c.name for c in recorded(root / "run")][-1] == "agent-dev-003"
        assert fleet(root, "down").returncode == 0
        assert survivors(root) == []
    finally:
        fleet(root, "down")


def test_up_refuses_too_few_devices_and_a_foreign_folder(tmp_path: Path) -> None:
    few = fleet(tmp_path / "few", "up", "--devices", "2")
    assert few.returncode == 2 and "--devices must be between" in few.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = fleet(foreign, "up")
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
