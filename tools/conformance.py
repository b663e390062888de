"""``maskfl-conformance``: check a participant implementation against a real coordinator.

For each scenario (the participant as *summer*, then as *updater*; ``--roles groups``
adds an updater in a round of g = 2 mask groups) the tool

1. provisions a fresh fleet with ``maskfl-provision`` (fleet CA, broker TLS CA,
   mosquitto config and ACL, bundles for the participant, five helpers and a
   monitor) in a work directory, and starts that mosquitto on loopback;
2. picks the initial seed so that round 1's tickets (docs/protocol.md §4) make
   the participant a summer (or an updater) and the helpers fill the other roles,
   with ``p_sum`` and ``p_update`` fixed in the coordinator's config; the seed is
   also chosen so that the usual ticket mistakes (big-endian, no personalisation)
   would give the participant the other role, so they cannot pass by chance;
3. starts a monitor that reads every topic of the fleet, the helpers (protocol-
   level participants of :mod:`maskfl.testing.participants` with known deltas), the
   participant command, and the coordinator;
4. waits for round 1 to publish its model (or fail), then judges every message
   the participant sent against the specification and prints one line per rule:
   ``ok`` or ``FAIL`` with the section of docs/protocol.md it breaks.

The command runs with ``MASKFL_BUNDLE`` (the device's bundle directory, with its
``agent.toml``), ``MASKFL_DEVICE_ID``, ``MASKFL_BROKER_HOST`` and
``MASKFL_BROKER_PORT`` in its environment, e.g.::

    maskfl-conformance --participant 'maskfl-agent run --config "$MASKFL_BUNDLE/agent.toml"'

This is a test bench: the monitor may read every topic and the tool opens the
participant's sealed seed with its own summer's key to check the encoding, which
no party of a real fleet can do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.agent.config import load_config
from maskfl.agent.daemon import build_mqtt_config
from maskfl.agent.identity import load_identity
from maskfl.models import shipped_model
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.identity import Identity
from maskfl.protocol.messages import (
    weights_digest,
)
from maskfl.protocol.topics import TopicKind
from maskfl.protocol.version import version_text
from maskfl.testing.participants import Behaviour, SimParticipant
from maskfl.tools._conformance_rules import (
    GROUPS_ROLE,
    MAX_IN,
    P_SUM,
    P_UPDATE,
    ROLES,
    Check,
    Judge,
    Monitor,
    RoundSeen,
    choose_initial_seed,
    judge_round,
)
from maskfl.tools._demo_fleet import (
    OBSERVER,
    DemoFleet,
    FleetSettings,
    _edit_toml,
    console_script,
    provision_fleet,
)
from maskfl.tools._demo_watch import observer_config
from maskfl.tools._supervise import Supervisor
from maskfl.transport import MqttConfig, MqttTransport

__all__ = ["Check", "main", "run_conformance"]

HELPERS = 5
MODEL = "mlp"
ALL_ROLES = (*ROLES, GROUPS_ROLE)


# --- one scenario ------------------------------------------------------------------------------


def _pet(role: str) -> dict[str, Any]:
    # five updaters either way: five helpers, or the participant and four (three with
    # g = 2, where two helpers sum); target only bounds [masking] groups (prob is set)
    summers = 2 if role == GROUPS_ROLE else 1
    updaters = HELPERS + 1 - summers if role == GROUPS_ROLE else HELPERS
    return {
        "sum": {
            "prob": P_SUM,
            "target": 3,
            "count_min": summers,
            "count_max": summers,
            "time_min_s": 0.0,
            "time_max_s": 60.0,
        },
        "update": {
            "prob": P_UPDATE,
            "count_min": updaters,
            "count_max": updaters,
            "time_min_s": 0.0,
            "time_max_s": 90.0,
        },
        "sum2": {
            "count_min": summers,
            "count_max": summers,
            "time_min_s": 0.0,
            "time_max_s": 60.0,
        },
        "alive_window_s": 30.0,
        "round_pause_s": 0.5,
        "failure_pause_s": 1.0,
    }


def _allow_monitor(fleet: DemoFleet) -> None:
    """The monitor (the provisioned observer) may read every topic of the fleet."""
    text = fleet.broker_conf.read_text(encoding="utf-8")
    found = re.search(r"^acl_file\s+(.+)$", text, re.MULTILINE)
    if found is None:
        raise MaskflError(f"{fleet.broker_conf} names no acl_file")
    acl = Path(found.group(1).strip())
    with acl.open("a", encoding="utf-8") as out:
        out.write(
            f"\n# maskfl-conformance: the monitor reads the whole fleet\nuser {OBSERVER}\n"
            f"topic read maskfl/v1/{fleet.fleet}/#\n"
        )


def _load(fleet: DemoFleet, device: str) -> tuple[Identity, Any]:
    config = load_config(fleet.agent_toml(device))
    ident = load_identity(config.device)
    return ident.identity, build_mqtt_config(config, None)


async def _wait_outcome(monitor: Monitor, limit_s: float) -> RoundSeen:
    """'model' when round 1 published its model, 'failed' when round 2 started, else 'timeout'."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for _, signed in monitor.decoded(TopicKind.MODEL_LATEST):
            if signed.header.round_id == 1:
                return "model"
        for _, signed in monitor.decoded(TopicKind.ROUND):
            if signed.header.round_id >= 2:
                return "failed"
        monitor.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # not wait_for: it can drop a Ctrl-C on 3.11
                await monitor.changed.wait()
    return "timeout"


async def run_scenario(
    role: str, command: str, workdir: Path, *, say: Callable[[str], None], limit_s: float
) -> list[Check]:
    """Provision, start everything, run round 1 with the participant as ``role``, judge."""
    judge = Judge(role)
    root = workdir / role
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    say(f"[{role}] provisioning a fleet in {root}")
    scenario = await _Scenario.provision(role, root)
    fleet, device = scenario.fleet, scenario.device
    with Supervisor(root / "logs") as sup:
        await asyncio.to_thread(sup.start_broker, fleet.broker_conf, fleet.broker_port)
        monitor = Monitor(MqttTransport(_monitor_config(fleet)), fleet.fleet)
        await monitor.start()
        sims = await scenario.start_helpers()
        env = {
            "MASKFL_BUNDLE": str(fleet.device_dir(device)),
            "MASKFL_DEVICE_ID": device,
            "MASKFL_BROKER_HOST": "127.0.0.1",
            "MASKFL_BROKER_PORT": str(fleet.broker_port),
        }
        participant = sup.start("participant", ["/bin/sh", "-c", command], env=env)
        say(f"[{role}] participant {device}: pid {participant.pid}, log {participant.log_path}")
        await asyncio.sleep(1.0)
        sup.start(
            "coordinator",
            [
                *console_script("maskfl-coordinator", "maskfl.broker_coordinator.cli"),
                "run",
                "--config",
                str(fleet.coordinator_toml),
            ],
        )
        outcome = await _wait_outcome(monitor, limit_s)
        say(f"[{role}] round 1: {outcome}")
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        await monitor.stop()
    judge_round(
        judge,
        role=role,
        device=device,
        me=scenario.me,
        monitor=monitor,
        sims=sims,
        initial=scenario.initial,
        outcome=outcome,
        log_tail=participant.log_tail(5),
        ca=_ca_key(fleet, device),
    )
    return judge.checks


Plan = Callable[[int, int], tuple[npt.NDArray[np.float32], float]]
"""A helper's update in a round: (delta, weight) for (round id, M)."""


@dataclass
class _Scenario:
    """A provisioned fleet whose initial seed gives the participant its role, and the
    helpers' known updates."""

    fleet: DemoFleet
    device: str
    me: Identity
    helpers: list[tuple[Identity, Any]]
    initial: npt.NDArray[np.float32]
    plans: dict[str, tuple[npt.NDArray[np.float32], float]]

    @classmethod
    async def provision(cls, role: str, root: Path) -> _Scenario:
        model = shipped_model(MODEL)
        initial = model.initial_weights()
        settings = FleetSettings(
            devices=1 + HELPERS, model=MODEL, num_params=model.num_params, epochs=1, heartbeat_s=2.0
        )
        fleet = await asyncio.to_thread(
            provision_fleet, root, settings, pet=_pet(role), initial=initial
        )
        _allow_monitor(fleet)
        device, helper_ids = fleet.device_ids[0], fleet.device_ids[1:]
        me, _ = _load(fleet, device)
        helpers = [_load(fleet, h) for h in helper_ids]
        initial_seed = choose_initial_seed(
            role, me.public_key, [h.public_key for h, _ in helpers], weights_digest(initial)
        )
        _edit_toml(fleet.coordinator_toml, {"pet": {"initial_seed": initial_seed.hex()}})
        if role == GROUPS_ROLE:
            _edit_toml(fleet.coordinator_toml, {"masking": {"groups": 2}})
        rng = np.random.default_rng(int.from_bytes(initial_seed[:8], "little"))
        plans = {
            str(h.device_id): (
                rng.uniform(-0.02, 0.02, model.num_params).astype(np.float32),
                round(float(rng.uniform(0.3, 1.0)), 3),
            )
            for h, _ in helpers
        }
        return cls(fleet, device, me, helpers, initial, plans)

    def plan(self, device_id: str) -> Plan:
        return lambda _rid, _m: self.plans[device_id]

    async def start_helpers(self) -> list[SimParticipant]:
        """The helpers, protocol-level participants sending their planned updates."""
        fleet = self.fleet
        sims = [
            SimParticipant(
                h,
                ca_public_key=b"",
                host="127.0.0.1",
                port=fleet.broker_port,
                behaviour=Behaviour(delta=self.plan(h.device_id)),
                mqtt=mqtt,
            )
            for h, mqtt in self.helpers
        ]
        for sim in sims:
            sim.ca = _ca_key(fleet, sim.device)
            await sim.start()
        return sims


def _monitor_config(fleet: DemoFleet) -> MqttConfig:
    """The provisioned read-only observer's TLS identity (the ACL is widened for it)."""
    return dataclasses.replace(
        observer_config(fleet.observer_dir, "127.0.0.1", fleet.broker_port),
        max_incoming_payload=MAX_IN,
        incoming_queue_size=100_000,
    )


def _ca_key(fleet: DemoFleet, device: str) -> bytes:
    config = load_config(fleet.agent_toml(device))
    return load_identity(config.device).ca_public_key


# --- the command -------------------------------------------------------------------------------


async def run_conformance(
    command: str,
    workdir: Path,
    *,
    roles: tuple[str, ...] = ROLES,
    say: Callable[[str], None] = print,
    limit_s: float = 240.0,
) -> list[Check]:
    checks: list[Check] = []
    for role in roles:
        checks += await run_scenario(role, command, workdir, say=say, limit_s=limit_s)
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-conformance",
        description="Check a maskfl participant implementation against a real coordinator "
        "and mosquitto on loopback (docs/protocol.md §14).",
        epilog="example:\n  maskfl-conformance --participant "
        "'maskfl-agent run --config \"$MASKFL_BUNDLE/agent.toml\"'\n\n"
        "The command gets MASKFL_BUNDLE (its provisioned bundle directory), MASKFL_DEVICE_ID,\n"
        "MASKFL_BROKER_HOST and MASKFL_BROKER_PORT. Exit status: 0 every check passed,\n"
        "1 a check failed, 2 the bench itself could not run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-conformance"))
    parser.add_argument(
        "--participant", required=True, metavar="COMMAND", help="shell command of the participant"
    )
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help="scenarios to run, comma separated (default: summer,updater; also groups: an "
        "updater in a round of g = 2 mask groups, sealing a seed per group)",
    )
    parser.add_argument("--workdir", type=Path, help="keep fleets and logs here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the checks as JSON")
    parser.add_argument(
        "--timeout", type=float, default=240.0, help="seconds per round (default 240)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    unknown = [r for r in roles if r not in ALL_ROLES]
    if unknown or not roles:
        print(f"--roles: unknown {unknown}; choose from {', '.join(ALL_ROLES)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="maskfl-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        checks = asyncio.run(
            run_conformance(args.participant, workdir, roles=roles, limit_s=args.timeout)
        )
    except (MaskflError, OSError) as exc:
        print(f"maskfl-conformance: cannot run the bench: {exc}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(
        f"{len(checks) - len(failed)} of {len(checks)} checks passed; logs and fleets in {workdir}"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in checks], indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
