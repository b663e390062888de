"""``maskfl-fleet``: a trial fleet on this machine from real provisioned bundles.

``maskfl-fleet up --devices 10`` provisions a fleet in ``--dir`` (default ``./fleet-run``)
the first time (``maskfl-provision``: CAs, broker TLS + ACL, coordinator and device
bundles, a read-only observer), then starts, each as its own process with its own log:

    mosquitto      the generated config (mutual TLS, per-device ACL) on a loopback port
    coordinator    ``maskfl-coordinator run`` with round timing for a small fleet
    agents         ``maskfl-agent run`` from each device's bundle (dev-001 ...)

and returns once every agent is connected and the coordinator is ready. The processes
keep running after ``up`` exits; their pid files are in ``DIR/run``.
``maskfl-fleet status`` shows them and the coordinator's round; ``maskfl-fleet down``
stops exactly the processes ``up`` started (SIGTERM, then SIGKILL) and nothing else.
State (coordinator database, agent state, broker persistence) stays in ``DIR`` for the
next ``up``; remove the folder to start over.

The fleet's ``fleet.toml`` names the broker's pid file, so ``maskfl-provision --dir
DIR/fleet add-device|revoke|rotate|add-observer`` reloads this broker by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from maskfl.broker_coordinator.provision import Fleet
from maskfl.models import shipped_model
from maskfl.protocol.errors import ConfigError, MaskflError
from maskfl.protocol.version import version_text
from maskfl.tools._demo_fleet import (
    DEMO_MIN_DEVICES,
    DemoFleet,
    FleetSettings,
    console_script,
    demo_pet,
    provision_fleet,
)
from maskfl.tools._demo_watch import fetch_status
from maskfl.tools._help import plain
from maskfl.tools._supervise import Supervisor, recorded, stop_recorded

__all__ = ["build_parser", "main"]

STATE_FILE = "maskfl-fleet.json"
EXIT_USAGE = 2
EXIT_FAILED = 1
MAX_DEVICES = 50


@dataclass(frozen=True)
class Trial:
    """What ``up`` provisioned once and reuses: ports, devices, model."""

    root: Path
    broker_port: int
    http_port: int
    devices: tuple[str, ...]
    model: str

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def fleet_dir(self) -> Path:
        return self.root / "fleet"

    def agent_toml(self, device: str) -> Path:
        return self.fleet_dir / "devices" / device / "agent.toml"

    @property
    def coordinator_toml(self) -> Path:
        return self.fleet_dir / "coordinator" / "coordinator.toml"

    @property
    def broker_conf(self) -> Path:
        return self.fleet_dir / "broker" / "mosquitto.conf"

    @property
    def broker_pid_file(self) -> Path:
        return self.run_dir / "01-mosquitto.pid"

    def save(self) -> None:
        state = {
            "broker_port": self.broker_port,
            "http_port": self.http_port,
            "devices": list(self.devices),
            "model": self.model,
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> Trial | None:
        path = root / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(
                root=root,
                broker_port=int(raw["broker_port"]),
                http_port=int(raw["http_port"]),
                devices=tuple(str(d) for d in raw["devices"]),
                model=str(raw["model"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); remove {root} to start over") from exc


def _say(text: str) -> None:
    print(text, flush=True)


def _provision(root: Path, devices: int, model: str) -> Trial:
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"--dir {root} is not empty and holds no trial fleet ({STATE_FILE}); "
            "choose an empty or new directory",
            field="--dir",
        )
    spec = shipped_model(model)
    settings = FleetSettings(devices=devices, model=model, num_params=spec.num_params)
    fleet: DemoFleet = provision_fleet(
        root, settings, pet=demo_pet(devices), initial=spec.initial_weights()
    )
    trial = Trial(root, fleet.broker_port, fleet.http_port, fleet.device_ids, model)
    _set_broker_pid_file(trial)
    trial.save()
    return trial


def _set_broker_pid_file(trial: Trial) -> None:
    """Name this fleet's broker pid file in fleet.toml: provisioning then reloads it."""
    fleet = Fleet.open(trial.fleet_dir)
    with fleet.locked():
        broker = replace(fleet.settings.broker, pid_file=str(trial.broker_pid_file))
        fleet.save_settings(replace(fleet.settings, broker=broker))


def up(root: Path, devices: int, model: str, limit_s: float) -> int:
    root = root.resolve()
    trial = Trial.load(root)
    if trial is None:
        _say(f"provisioning a fleet of {devices} devices in {root / 'fleet'} ...")
        t = time.monotonic()
        trial = _provision(root, devices, model)
        took = time.monotonic() - t
        _say(f"  provisioned in {took:.1f} s (maskfl-provision; logs/provision.log)")
    elif len(trial.devices) != devices:
        raise ConfigError(
            f"{root} holds a fleet of {len(trial.devices)} devices; run `maskfl-fleet up "
            f"--devices {len(trial.devices)}`, or remove {root} for a new fleet",
            field="--devices",
        )
    running = [c for c in recorded(trial.run_dir) if c.alive()]
    if running:
        raise ConfigError(
            f"the fleet in {root} is already up ({len(running)} processes); "
            f"`maskfl-fleet --dir {root} down` first",
            field="--dir",
        )
    stop_recorded(trial.run_dir)  # pid files of processes that are gone
    supervisor = Supervisor(trial.logs, pid_dir=trial.run_dir)
    try:
        _start(trial, supervisor, limit_s)
    except BaseException:
        supervisor.stop_all()
        raise
    supervisor.detach()
    _say(f"fleet up in {root}; `maskfl-fleet --dir {root} status`, `... down` to stop it")
    return 0


def _start(trial: Trial, supervisor: Supervisor, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    # the logs are appended to: only what this broker writes says who connected now
    log = trial.logs / "mosquitto.log"
    offset = log.stat().st_size if log.exists() else 0
    broker = supervisor.start_broker(trial.broker_conf, trial.broker_port)
    _say(f"  mosquitto    pid {broker.pid:<7} 127.0.0.1:{trial.broker_port} (mutual TLS, ACL)")
    coordinator = supervisor.start(
        "coordinator",
        [
            *console_script("maskfl-coordinator", "maskfl.broker_coordinator.cli"),
            "run",
            "--config",
            str(trial.coordinator_toml),
        ],
    )
    agent = console_script("maskfl-agent", "maskfl.agent.cli")
    # a device revoked since (README: `maskfl-provision --dir DIR/fleet revoke dev-004`)
    # would exit with status 2 at once and fail the whole up: leave it out, and say so
    active = set(Fleet.open(trial.fleet_dir).registry.active_devices())
    devices = [d for d in trial.devices if d in active]
    for device in trial.devices:
        if device not in active:
            _say(f"  {device:<12} revoked, not started")
    for device in devices:
        child = supervisor.start(
            f"agent-{device}", [*agent, "run", "--config", str(trial.agent_toml(device))]
        )
        _say(f"  {device:<12} pid {child.pid:<7} log {child.log_path}")
    while True:
        supervisor.check()
        status = asyncio.run(fetch_status(trial.http_port, 1.0)) or {}
        if status.get("ready"):
            break
        if time.monotonic() > deadline:
            raise MaskflError(f"the coordinator was not ready within {limit_s:.0f} s; see its log")
        time.sleep(0.2)
    _say(
        f"  coordinator  pid {coordinator.pid:<7} ready, status "
        f"http://127.0.0.1:{trial.http_port}/status"
    )
    while True:
        supervisor.check()
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        missing = [d for d in devices if f" as {d} " not in text]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise MaskflError(
                f"{len(missing)} agents did not connect within {limit_s:.0f} s "
                f"({', '.join(missing[:3])}); see their logs in {trial.logs}"
            )
        time.sleep(0.2)
    _say(f"  {len(devices)}/{len(devices)} agents connected")


def status(root: Path) -> int:
    root = root.resolve()
    trial = Trial.load(root)
    if trial is None:
        _say(f"no trial fleet in {root} (start one with `maskfl-fleet --dir {root} up`)")
        return EXIT_FAILED
    children = recorded(trial.run_dir)
    if not children:
        _say(f"fleet in {root} is down")
        return EXIT_FAILED
    alive = 0
    for child in children:
        state = "running" if child.alive() else "EXITED"
        alive += state == "running"
        _say(f"  {child.name:<20} pid {child.pid:<7} {state:<8} {trial.logs / child.name}.log")
    info = asyncio.run(fetch_status(trial.http_port, 2.0))
    if info:
        _say(
            f"coordinator: round {info.get('round_id')} phase {info.get('phase')}, model "
            f"v{info.get('model_version')}, {info.get('rounds_completed')} rounds completed, "
            f"{info.get('rounds_failed')} failed, {info.get('devices_alive')} devices alive"
        )
        failure = info.get("last_failure")
        if isinstance(failure, dict):
            _say(f"  last failed round {failure.get('round_id')}: {failure.get('reason')}")
    else:
        _say(f"coordinator: no answer on http://127.0.0.1:{trial.http_port}/status")
    _say(f"{alive} of {len(children)} processes running")
    return 0 if alive == len(children) else EXIT_FAILED


def down(root: Path) -> int:
    root = root.resolve()
    trial = Trial.load(root)
    if trial is None:
        _say(f"no trial fleet in {root}; nothing to stop")
        return 0
    stopped = stop_recorded(trial.run_dir)
    if not stopped:
        _say(f"fleet in {root} was not running; nothing to stop")
    else:
        _say(f"stopped {len(stopped)} processes ({', '.join(c.name for c in reversed(stopped))})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-fleet",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-fleet"))
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("fleet-run"),
        help="the trial fleet's folder (default ./fleet-run)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = sub.add_parser("up", help="provision if needed, start broker, coordinator, agents")
    start.add_argument(
        "--devices",
        type=int,
        default=10,
        help=f"devices (default 10: 98 %% of rounds complete, 61 %% with 5; {DEMO_MIN_DEVICES} "
        f"to {MAX_DEVICES}); fixed once provisioned",
    )
    start.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="default mlp")
    start.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for readiness (120)"
    )
    sub.add_parser("status", help="the fleet's processes and the coordinator's round")
    sub.add_parser("down", help="stop exactly the processes `up` started")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        match args.command:
            case "up":
                if not DEMO_MIN_DEVICES <= args.devices <= MAX_DEVICES:
                    raise ConfigError(
                        f"--devices must be between {DEMO_MIN_DEVICES} (a summer and the "
                        f"privacy floor's updaters) and {MAX_DEVICES}",
                        field="--devices",
                    )
                return up(args.dir, args.devices, args.model, args.timeout)
            case "status":
                return status(args.dir)
            case _:
                return down(args.dir)
    except ConfigError as exc:
        print(f"maskfl-fleet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("maskfl-fleet: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    except MaskflError as exc:
        print(f"maskfl-fleet: failed: {exc}; every process it started is stopped", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
