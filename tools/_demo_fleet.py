"""Provisioning a demo fleet in a work directory, and the configs the demo runs with.

The fleet is made by the real ``maskfl-provision`` (fleet CA, broker TLS CA and
server certificate, mosquitto config and ACL, coordinator and device bundles); the
demo then rewrites the generated ``coordinator.toml`` and each ``agent.toml`` with
the demo's settings (round timing for a small fleet, local state folders, each
device's share of the digits data), through the config models' own keys.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from maskfl.broker_coordinator.config import PrivacyConfig
from maskfl.broker_coordinator.provision import numbered_device_ids
from maskfl.models import model_path
from maskfl.protocol.errors import ConfigError
from maskfl.testing.broker import free_port

__all__ = [
    "OBSERVER",
    "DemoFleet",
    "FleetSettings",
    "console_script",
    "provision_fleet",
]

FLEET = "demo"
DATA_SHARDS_MAX = 700
"""The digits training set (~1,440 samples) split into at most this many shards of
two or more samples; a larger fleet shares them (device i trains on shard i mod 700)."""
OBSERVER = "demo-observer"
"""The read-only identity the demo watches the fleet with (``maskfl-provision
add-observer``): its ACL reads round parameters, sum dictionaries, models and status,
which is all the demo needs, and publishes nothing."""


def console_script(name: str, module: str) -> list[str]:
    """How to run maskfl's console script ``name``: the one installed next to this
    interpreter (a venv), else ``python -c`` on the module's ``main``."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


@dataclass(frozen=True)
class FleetSettings:
    """What the demo asks of the fleet."""

    devices: int
    model: str
    num_params: int
    epochs: int = 5
    batch_size: int = 32
    partition: str = "dirichlet"
    alpha: float = 0.5
    data_seed: int = 0
    sample_cap: int = 1000
    heartbeat_s: float = 5.0

    @property
    def shards(self) -> int:
        """How many parts the data set is cut into (one per device up to DATA_SHARDS_MAX)."""
        return min(self.devices, DATA_SHARDS_MAX)

    @property
    def min_samples(self) -> int:
        return max(1, min(10, 1400 // (2 * self.shards)))


@dataclass(frozen=True)
class DemoFleet:
    """Paths of a provisioned demo fleet."""

    root: Path
    broker_port: int
    http_port: int
    broker_conf: Path
    coordinator_toml: Path
    coordinator_state: Path
    observer_dir: Path
    device_ids: tuple[str, ...]

    @property
    def fleet(self) -> str:
        return FLEET

    def device_dir(self, device: str) -> Path:
        return self.root / "fleet" / "devices" / device

    def agent_toml(self, device: str) -> Path:
        return self.device_dir(device) / "agent.toml"

    def agent_state(self, device: str) -> Path:
        return self.root / "agents" / device

    def plain_log(self, device: str) -> Path:
        """Where the demo agent keeps its plain deltas: the device's own local log."""
        return self.agent_state(device) / "plain-updates"


def _run(argv: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        raise ConfigError(f"{' '.join(argv[:3])} ... failed (status {done.returncode}):\n{tail}")


def provision_fleet(
    root: Path,
    settings: FleetSettings,
    *,
    pet: dict[str, Any],
    initial: np.ndarray,
    privacy: dict[str, Any] | None = None,
) -> DemoFleet:
    """Provision ``settings.devices`` devices (dev-001 ..., named by
    :func:`numbered_device_ids` like ``add-device --count``) and the read-only observer into
    ``root/fleet``, then write the demo's coordinator and agent settings."""
    fleet_dir = root / "fleet"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    provision = console_script("maskfl-provision", "maskfl.broker_coordinator.provision.cli")
    base = [*provision, "--dir", str(fleet_dir)]
    state = root / "coordinator-state"
    _run([*base, "init", *_init_options(root, settings, port, state)], logs / "provision.log")
    _run([*base, "add-device", "dev", "--count", str(settings.devices)], logs / "provision.log")
    _run([*base, "add-observer", OBSERVER], logs / "provision.log")
    (root / "broker-data").mkdir(exist_ok=True)
    devices = tuple(numbered_device_ids("dev", settings.devices))
    fleet = DemoFleet(
        root=root,
        broker_port=port,
        http_port=http_port,
        broker_conf=fleet_dir / "broker" / "mosquitto.conf",
        coordinator_toml=fleet_dir / "coordinator" / "coordinator.toml",
        coordinator_state=state,
        observer_dir=fleet_dir / "observers" / OBSERVER,
        device_ids=devices,
    )
    missing = [d for d in devices if not fleet.agent_toml(d).is_file()]
    if missing:
        raise ConfigError(f"provisioning wrote no bundle for {', '.join(missing[:3])}")
    np.save(fleet.coordinator_toml.with_name("initial.npy"), initial.astype(np.float32))
    _write_coordinator(fleet, pet, model_path(settings.model), privacy or {})
    for index, device in enumerate(devices):
        _write_agent(fleet, device, index, settings)
    return fleet


def _init_options(root: Path, settings: FleetSettings, port: int, state: Path) -> list[str]:
    """``maskfl-provision init`` for a broker and coordinator on loopback, files under
    ``root``, the broker running as this user, the demo's model as a model of its own."""
    fleet_dir = root / "fleet"
    return [
        "--fleet",
        FLEET,
        "--host",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--coordinator-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--broker-config-dir",
        str(fleet_dir / "broker"),
        "--broker-data-dir",
        str(root / "broker-data"),
        "--broker-user",
        getpass.getuser(),
        "--model-id",
        settings.model,
        "--model-length",
        str(settings.num_params),
        "--coordinator-state-dir",
        str(state),
    ]


def _edit_toml(path: Path, changes: dict[str, dict[str, Any]]) -> None:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    header = "".join(
        line + "\n"
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    )
    path.write_text(
        header + "# Rewritten by maskfl-demo with the demo's settings.\n\n" + tomli_w.dumps(data)
    )


def _write_coordinator(
    fleet: DemoFleet, pet: dict[str, Any], graph_file: Path, privacy: dict[str, Any]
) -> None:
    _edit_toml(
        fleet.coordinator_toml,
        {
            # Distributed DP for --dp (keys of [privacy]); nothing otherwise (off).
            **({"privacy": privacy} if privacy else {}),
            # The coordinator publishes the graph and states its SHA-256 in every signed
            # global model; the agents check their shipped copy against it.
            "model": {"initial_weights": "initial.npy", "graph_file": str(graph_file)},
            # Keep every accepted masked update in the update log on disk (the default
            # keeps them in memory): the demo's privacy check reads one from there.
            "storage": {"update_words": "file"},
            "pet": pet,
            "http": {"enabled": True, "host": "127.0.0.1", "port": fleet.http_port},
            "log": {"level": "info", "format": "text"},
            "broker": {"host": "127.0.0.1"},
        },
    )


def _write_agent(fleet: DemoFleet, device: str, index: int, s: FleetSettings) -> None:
    _edit_toml(
        fleet.agent_toml(device),
        {
            "broker": {"host": "127.0.0.1", "reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
            "state": {"dir": str(fleet.agent_state(device))},
            "training": {
                "epochs": s.epochs,
                "batch_size": s.batch_size,
                "sample_cap": s.sample_cap,
                "threads": 1,
            },
            "data": {
                "source": "digits",
                "options": {
                    "shard": index % s.shards,
                    "shards": s.shards,
                    "partition": s.partition,
                    "alpha": s.alpha,
                    "seed": s.data_seed,
                    "min_samples": s.min_samples,
                },
            },
            "heartbeat": {"interval_s": s.heartbeat_s},
            "logging": {"level": "INFO", "format": "text"},
        },
    )


#: The privacy floor the demo keeps: the coordinator's default ``privacy.min_updates``.
DEMO_MIN_UPDATES = PrivacyConfig().min_updates
#: A round needs a summer besides the updaters the floor asks for.
DEMO_MIN_DEVICES = DEMO_MIN_UPDATES + 1


def demo_pet(devices: int) -> dict[str, Any]:
    """Round timing for a demo fleet on one machine: phases close as soon as the
    fleet has answered, failed rounds are retried quickly.

    The privacy floor stays at the coordinator's default (3 updates), and the update
    phase waits for that many. Sortition draws each device independently, so a round
    completes only when it draws at least one summer and leaves at least 3 updaters
    (every non-summer updates in fleets up to 100). The sum target is the one that
    completes the most rounds (by ``probabilities_for_targets`` and the binomial law;
    ``tests/tools/test_demo_fleet.py`` checks it): ``(devices - 2) // 2``, at least 1,
    at most 5 (6 would split the summers into two mask groups, each needing one).
    Completed rounds: 42 % with 4 devices, 61 % with 5, 81 % with 6, 88 % with 7, 94 %
    with 8 (the rest draw no summer, or so many that fewer than 3 devices update;
    no target does better), 97 % with 9, then 98-99.8 % from 10 devices on. A
    fleet smaller than :data:`DEMO_MIN_DEVICES` can never complete a round and is
    refused.
    """
    if devices < DEMO_MIN_DEVICES:
        raise ConfigError(
            f"--devices must be at least {DEMO_MIN_DEVICES}: a round needs a summer and "
            f"{DEMO_MIN_UPDATES} updaters (the privacy floor, privacy.min_updates)",
            field="--devices",
        )
    summers = min(5, max(1, (devices - 2) // 2))
    updaters = min(devices - summers, 100)
    busy = 2.0 + 0.02 * devices  # in-process fleets of hundreds train and mask in turn
    return {
        "sum": {
            "target": summers,
            "count_min": 1,
            "count_max": 100,
            "time_min_s": 1.0 + 0.005 * devices,
            "time_max_s": 3.0 + 0.02 * devices,  # no summer drawn: retry soon
        },
        "update": {
            "target": updaters,
            "count_min": DEMO_MIN_UPDATES,
            "count_max": 1000,
            "time_min_s": busy,
            "time_max_s": 10.0 + 2 * busy,  # too few updaters drawn: retry soon
        },
        "sum2": {"count_min": 1, "count_max": 100, "time_min_s": 0.0, "time_max_s": 30.0},
        "alive_window_s": 30.0,
        "round_pause_s": 0.2,
        "failure_pause_s": 0.5,
    }
