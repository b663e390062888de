"""Helpers for the coordinator tests: a fleet with known roles and a running coordinator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.broker_coordinator.config import load_config
from maskfl.broker_coordinator.service import Coordinator
from maskfl.protocol.identity import Identity
from maskfl.protocol.messages import GlobalModel
from maskfl.testing.broker import Mosquitto
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import Behaviour, SimParticipant

M = 1000
P_SUM = 0.5


def fixed_delta(index: int) -> Any:
    """A deterministic delta and weight for participant ``index``."""

    def make(round_id: int, m: int) -> tuple[np.ndarray, float]:
        rng = np.random.default_rng(1000 * round_id + index)
        delta = rng.uniform(-0.8, 0.8, m).astype(np.float32)
        delta[:3] = (1.5, -1.5, 0.0)  # clipped at B = 1
        return delta, 0.2 + 0.8 * ((index * 37) % 100) / 100

    return make


def trained(participant: SimParticipant) -> list[GlobalModel]:
    """The models a participant received that came out of a round (version >= 1)."""
    return [m for m in participant.models if m.version >= 1]


@dataclass
class Setup:
    fleet: SimFleet
    config_path: Path
    summers: list[Identity]
    updaters: list[Identity]
    initial: np.ndarray

    def participants(
        self,
        broker: Mosquitto,
        *,
        summer: Callable[[int], Behaviour] = lambda _k: Behaviour(),
        updater: Callable[[int], Behaviour] = lambda k: Behaviour(delta=fixed_delta(k)),
    ) -> list[SimParticipant]:
        """The summers, then the updaters, on ``broker``: the k-th of each behaves as
        ``summer(k)`` / ``updater(k)`` (default: updater k sends ``fixed_delta(k)``)."""
        return [
            SimParticipant(
                identity,
                ca_public_key=self.fleet.ca_public_key,
                host=broker.host,
                port=broker.port,
                behaviour=behave(k),
            )
            for identities, behave in ((self.summers, summer), (self.updaters, updater))
            for k, identity in enumerate(identities)
        ]


def make_setup(
    tmp: Path,
    port: int,
    *,
    summers: int,
    updaters: int,
    pet: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    length: int = M,
    initial: np.ndarray | None = None,
    fleet_id: str = "simfleet",
    groups: int = 1,
    fill: int | None = None,
) -> Setup:
    fleet = SimFleet(fleet_id)
    if initial is None:
        initial = np.linspace(-0.1, 0.1, length).astype(np.float32)
    seed1 = first_round_seed(bytes(32), initial)
    s, u = fleet.identities_for_roles(
        seed1,
        p_sum=P_SUM,
        p_update=1.0,
        summers=summers,
        updaters=updaters,
        groups=groups,
        fill=fill,
    )
    pet_cfg: dict[str, Any] = {
        "sum": {"prob": P_SUM, "count_min": summers, "count_max": summers, "time_max_s": 30.0},
        "update": {
            "prob": 1.0,
            "count_min": max(1, updaters),
            "count_max": max(1, updaters),
            "time_max_s": 60.0,
        },
        "sum2": {"count_min": summers, "count_max": summers, "time_max_s": 30.0},
        "failure_pause_s": 0.2,
        "max_rounds": 1,
    }
    for key, value in (pet or {}).items():
        if isinstance(value, dict):
            merged = {**pet_cfg.get(key, {}), **value}
            pet_cfg[key] = {k: v for k, v in merged.items() if v is not None}  # None: unset
        else:
            pet_cfg[key] = value
    overrides: dict[str, dict[str, Any]] = {"pet": pet_cfg, "masking": {"groups": groups}}
    if updaters < 3:
        # Below the default privacy floor (3): the smallest one the config allows, and
        # an update phase that waits for it (a round of one updater never unmasks).
        overrides["privacy"] = {"min_updates": 2}
        pet_cfg["update"]["count_min"] = max(2, pet_cfg["update"]["count_min"])
        pet_cfg["update"]["count_max"] = max(2, pet_cfg["update"]["count_max"])
    overrides.update(extra or {})
    path = fleet.write_coordinator(
        tmp / "coordinator", port=port, length=length, initial=initial, overrides=overrides
    )
    return Setup(fleet, path, s, u, initial)


@contextlib.asynccontextmanager
async def running_coordinator(config_path: Path) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(coordinator.run(stop))
    try:
        yield coordinator
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task
