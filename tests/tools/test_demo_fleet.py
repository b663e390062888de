"""The demo's fleet: provisioned by the real ``maskfl-provision`` under the names the demo
expects, at any size (a 1000-device demo failed with "provisioning wrote no bundle for
dev-0001" while the provisioner had written dev-001 ... dev-1000)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.provision import numbered_device_ids
from maskfl.protocol.errors import ConfigError
from maskfl.tools._demo_fleet import DATA_SHARDS_MAX, FleetSettings, demo_pet, provision_fleet
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
