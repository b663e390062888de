"""The host side of ``make arm-check``: a provisioned fleet of seven devices, mosquitto,
the coordinator and six x86 agents here beside the aarch64 device's unit, until the device
took part in completed rounds as updater and as summer."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from maskfl.protocol.round import RoundOutcome
from maskfl.tools._arm_root import DEVICE, CheckFailedError, log, peak_rss_mb, run, start_unit
from maskfl.tools._demo_watch import query_read_only

HOST_AGENTS = tuple(f"pi-{i:03d}" for i in range(2, 8))  # six x86 agents beside pi-001
PET = """
[pet]
alive_window_s = 60.0
round_pause_s = 1.0
failure_pause_s = 2.0

[pet.sum]
target = 2
count_min = 1
count_max = 7
time_min_s = 5.0
time_max_s = 20.0

[pet.update]
target = 5
count_min = 3            # privacy.min_updates, the default floor
count_max = 7
time_min_s = 5.0
time_max_s = 30.0

[pet.sum2]
count_min = 1
count_max = 7
time_min_s = 1.0
time_max_s = 30.0
"""


def host_script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if not beside.exists():
        raise CheckFailedError(f"{name} is not installed next to {sys.executable}: make venv")
    return str(beside)


def provision(run_dir: Path, logfile: Path) -> tuple[Path, int, int]:
    """A fleet of pi-001..pi-007 for a broker on 127.0.0.1; (fleet dir, MQTT port, HTTP port)."""
    from maskfl.testing.broker import free_port

    fleet = run_dir / "fleet"
    port, http = free_port(), free_port()
    provision_cli = [host_script("maskfl-provision"), "--dir", str(fleet)]
    run(
        [
            *provision_cli,
            "init",
            "--fleet",
            "armcheck",
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--coordinator-host",
            "localhost",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--broker-config-dir",
            str(fleet / "broker"),
            "--broker-data-dir",
            str(run_dir / "broker-data"),
            "--broker-user",
            "root",
            "--coordinator-state-dir",
            str(run_dir / "state"),
        ],
        logfile=logfile,
    )
    run(
        [*provision_cli, "add-device", "pi", "--count", str(1 + len(HOST_AGENTS))],
        logfile=logfile,
    )
    (run_dir / "broker-data").mkdir()
    with (fleet / "coordinator" / "coordinator.toml").open("a") as f:
        f.write(PET)
    for index, device in enumerate(HOST_AGENTS, start=1):
        toml = fleet / "devices" / device / "agent.toml"
        with toml.open("a") as f:
            f.write(
                f'\n[state]\ndir = "{run_dir / "agents" / device}"\n\n'
                f"[data]\noptions = {{ shard = {index}, shards = {1 + len(HOST_AGENTS)} }}\n"
            )
    return fleet, port, http


def coordinator_rounds(fleet: Path) -> dict[int, RoundOutcome | None]:
    """round id -> outcome (None while it runs), from ``maskfl-coordinator status --json``."""
    done = subprocess.run(
        [
            host_script("maskfl-coordinator"),
            "status",
            "--json",
            "--config",
            str(fleet / "coordinator" / "coordinator.toml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        return {}
    return {
        r["round_id"]: None if r["outcome"] is None else RoundOutcome(r["outcome"])
        for r in json.loads(done.stdout)["rounds"]
    }


def accepted_from(state: Path, device: str) -> dict[int, set[str]]:
    """round id -> the message types the coordinator accepted from ``device``."""
    db = state / "coordinator.db"
    if not db.exists():
        return {}
    (rows,) = query_read_only(
        db, ("SELECT round_id, type FROM messages WHERE device_id = ?", (device,)), timeout_s=5.0
    )
    found: dict[int, set[str]] = {}
    for round_id, kind in rows:
        found.setdefault(int(round_id), set()).add(str(kind))
    return found


def run_fleet(
    args: argparse.Namespace, fleet: Path, ports: tuple[int, int], root: Path, run_dir: Path
) -> dict[str, Any]:
    """mosquitto, the coordinator and the host agents here, the device's unit in the
    aarch64 root, until the device took part as updater and summer: the rounds seen,
    peak RSS and the qemu version."""
    from maskfl.tools._supervise import Supervisor

    logs = run_dir / "logs"
    port, http = ports
    report: dict[str, Any] = {}
    with Supervisor(logs) as sup:
        sup.start_broker(fleet / "broker" / "mosquitto.conf", port)
        coordinator_env = {"MASKFL__HTTP__PORT": str(http)}
        sup.start(
            "coordinator",
            [
                host_script("maskfl-coordinator"),
                "run",
                "--config",
                str(fleet / "coordinator" / "coordinator.toml"),
            ],
            env=coordinator_env,
        )
        host_agents = [
            sup.start(
                device,
                [
                    host_script("maskfl-agent"),
                    "run",
                    "--config",
                    str(fleet / "devices" / device / "agent.toml"),
                ],
            )
            for device in HOST_AGENTS
        ]
        agent = start_unit(
            root, root / "etc/systemd/system/maskfl-agent.service", logs, sup, DEVICE
        )
        log(
            f"waiting for {DEVICE} (aarch64) to take part in completed rounds as updater and summer"
        )
        rounds = wait_for_roles(args.timeout, fleet, run_dir / "state", sup)
        report["rounds"] = rounds
        report["agent_peak_rss_mb"] = {
            "aarch64_under_qemu": peak_rss_mb(agent.pid),
            "x86_64": peak_rss_mb(host_agents[0].pid),
        }
        versions = subprocess.run(
            ["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=False
        )
        report["qemu"] = versions.stdout.splitlines()[0] if versions.stdout else None
    return report


def wait_for_roles(timeout: float, fleet: Path, state: Path, sup: Any) -> dict[str, Any]:
    """Poll until DEVICE's update was accepted in a completed round and its sum and sum2 in
    another; the rounds seen, as a dict."""
    deadline = time.monotonic() + timeout
    outcomes: dict[int, RoundOutcome | None] = {}
    accepted: dict[int, set[str]] = {}
    while time.monotonic() < deadline:
        sup.check()
        outcomes = coordinator_rounds(fleet) or outcomes
        accepted = accepted_from(state, DEVICE)
        completed = {r for r, outcome in outcomes.items() if outcome is RoundOutcome.COMPLETED}
        as_updater = sorted(r for r in completed if "update" in accepted.get(r, set()))
        as_summer = sorted(r for r in completed if {"sum", "sum2"} <= accepted.get(r, set()))
        if as_updater and as_summer:
            return {
                "updater_in_completed_round": as_updater[0],
                "summer_in_completed_round": as_summer[0],
                "outcomes": {str(k): v for k, v in sorted(outcomes.items())},
                "accepted_from_device": {str(k): sorted(v) for k, v in sorted(accepted.items())},
            }
        time.sleep(2)
    raise CheckFailedError(
        f"{DEVICE} did not take part in completed rounds as both updater and summer within "
        f"{timeout:.0f} s; rounds {outcomes}, accepted from it {accepted}"
    )
