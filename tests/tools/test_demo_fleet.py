"""The demo's fleet: provisioned by the real ``maskfl-provision`` under the names the demo
expects, at any size (a 1000-device demo failed with "provisioning wrote no bundle for
dev-0001" while the provisioner had written dev-001 ... dev-1000)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.config import PrivacyConfig
from maskfl.broker_coordinator.provision import numbered_device_ids
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.sortition import (
    Task,
    default_groups,
    probabilities_for_targets,
    select_task,
)
from maskfl.tools._demo_fleet import (
    DATA_SHARDS_MAX,
    DEMO_MIN_DEVICES,
    FleetSettings,
    demo_pet,
    provision_fleet,
)
from maskfl.tools.demo import _check, build_parser


def test_numbered_ids_keep_their_names_as_the_fleet_grows() -> None:
    assert numbered_device_ids("dev", 3) == ["dev-001", "dev-002", "dev-003"]
    big = numbered_device_ids("dev", 1200)
    assert big[:999] == numbered_device_ids("dev", 999)
    assert big[999] == "dev-1000" and big[-1] == "dev-1200"
    assert len(set(big)) == 1200


def test_the_demo_takes_more_than_a_thousand_devices() -> None:
    options = _check(build_parser().parse_args(["--devices", "5000", "--in-process"]))
    assert options.devices == 5000
    with pytest.raises(ConfigError, match="at least 4"):
        _check(build_parser().parse_args(["--devices", "1"]))


def test_large_fleets_share_data_shards() -> None:
    small = FleetSettings(devices=40, model="mlp", num_params=1)
    assert (small.shards, small.min_samples) == (40, 10)
    big = FleetSettings(devices=5000, model="mlp", num_params=1)
    assert big.shards == DATA_SHARDS_MAX
    assert big.min_samples >= 1 and big.shards * big.min_samples <= 1400


@pytest.mark.slow
def test_a_thousand_device_fleet_is_provisioned_under_the_demo_names(tmp_path: Path) -> None:
    settings = FleetSettings(devices=1000, model="mlp", num_params=4810)
    fleet = provision_fleet(
        tmp_path, settings, pet=demo_pet(1000), initial=np.zeros(4810, np.float32)
    )
    assert fleet.device_ids[0] == "dev-001" and fleet.device_ids[-1] == "dev-1000"
    assert all(fleet.agent_toml(d).is_file() for d in fleet.device_ids)
    last = tomllib.loads(fleet.agent_toml("dev-1000").read_text())["data"]["options"]
    assert (last["shard"], last["shards"]) == (999 % DATA_SHARDS_MAX, DATA_SHARDS_MAX)


def _binomial(n: int, p: float, upto: int) -> list[float]:
    """P(k) of Binomial(n, p) for k = 0 .. min(n, upto) (no huge binomial coefficients)."""
    if p >= 1.0:
        return [float(k == n) for k in range(min(n, upto) + 1)]
    pmf = [(1.0 - p) ** n]
    for k in range(min(n, upto)):
        pmf.append(pmf[-1] * (n - k) / (k + 1) * p / (1.0 - p))
    return pmf


def _completion(devices: int, sum_target: int, update_target: int, floor: int) -> float:
    """P(a round completes) with every device alive, as the coordinator draws roles
    (``probabilities_for_targets``): one summer or more (one mask group), and at least
    ``floor`` updaters among the devices that are not summers."""
    p_sum, p_update = probabilities_for_targets(devices, sum_target, update_target, floor)
    summers = _binomial(devices, p_sum, devices)
    return sum(
        summers[k] * (1.0 - sum(_binomial(devices - k, p_update, floor - 1)))
        for k in range(1, devices + 1)
    )


def _demo_completion(devices: int) -> float:
    pet = demo_pet(devices)
    return _completion(
        devices, pet["sum"]["target"], pet["update"]["target"], pet["update"]["count_min"]
    )


@pytest.mark.parametrize("devices", [5, 9])
def test_the_completion_formula_is_what_sortition_draws(devices: int) -> None:
    """The formula the next test relies on, against the real sortition (``select_task``
    on pseudo-random keys and seeds): within four standard deviations of 4000 rounds."""
    pet = demo_pet(devices)
    p_sum, p_update = probabilities_for_targets(
        devices, pet["sum"]["target"], pet["update"]["target"], pet["update"]["count_min"]
    )
    rng = np.random.default_rng(devices)
    keys = [rng.bytes(32) for _ in range(devices)]
    rounds, completed = 4000, 0
    for _ in range(rounds):
        seed = rng.bytes(32)
        tasks = [select_task(seed, key, p_sum, p_update) for key in keys]
        completed += tasks.count(Task.SUM) >= 1 and tasks.count(Task.UPDATE) >= 3
    expected = _demo_completion(devices)
    assert abs(completed / rounds - expected) < 4 * math.sqrt(expected * (1 - expected) / rounds)


def test_the_demo_completes_nearly_every_round_from_nine_devices() -> None:
    """The demo's PET parameters keep the privacy floor (3 updates, one mask group) and
    complete >= 95 % of rounds from 9 devices on; smaller fleets cannot (sortition draws
    each device on its own), so there the sum target must be the best one there is."""
    for devices in [*range(DEMO_MIN_DEVICES, 64), 99, 100, 101, 102, 105, 150, 300, 1000, 5000]:
        pet = demo_pet(devices)
        floor = PrivacyConfig().min_updates
        assert floor == 3 and pet["update"]["count_min"] == floor, devices
        assert pet["sum"]["count_min"] >= 1 and default_groups(pet["sum"]["target"]) == 1
        achieved = _demo_completion(devices)
        best = max(
            _completion(devices, s, min(devices - s, 100), floor)
            for s in range(1, min(devices, 6))  # 6 summers or more: two mask groups
        )
        assert achieved >= best - 1e-12, (devices, achieved, best)
        if devices >= 9:
            assert achieved >= 0.95, (devices, achieved)
