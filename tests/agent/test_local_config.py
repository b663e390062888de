"""The operator's ``agent.local.toml`` survives a new bundle (rotate + reinstall).

The bundle's agent.toml is replaced whenever a device gets a new bundle; settings the
operator made for the device live in agent.local.toml beside it, which no bundle
contains, and override agent.toml key by key (the environment still wins over both).
The device is installed as README's device steps do it: the bundle's tarball extracted
into the device's config folder.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from maskfl.agent.config import LOCAL_TOML, load_config
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.identity import Certificate
from tests.broker_coordinator.provision.conftest import provision

LOCAL = """\
[state]
dir = "/srv/agent-state"

[data]
source = "npz"
options = { path = "/srv/data/camera.npz" }
holdout = 0.1

[training]
epochs = 3
"""


def install(bundle: Path, into: Path) -> None:
    """README: tar -C /etc/maskfl/agent --strip-components=1 --no-same-owner -xzf ID.tar.gz"""
    into.mkdir(exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(into), "--strip-components=1", "--no-same-owner", "-xzf", str(bundle)],
        check=True,
    )


def test_rotate_and_reinstall_keep_the_local_settings(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    provision(fleet, "init", "--fleet", "demo")
    provision(fleet, "add-device", "pi-001")
    with tarfile.open(fleet / "devices" / "pi-001.tar.gz") as tar:
        assert not any(m.name.endswith(LOCAL_TOML) for m in tar.getmembers())
    device = tmp_path / "etc-maskfl-agent"
    install(fleet / "devices" / "pi-001.tar.gz", device)
    (device / LOCAL_TOML).write_text(LOCAL)
    before = load_config(device / "agent.toml")
    old_serial = Certificate.from_bytes((device / "device.cert").read_bytes()).serial

    provision(fleet, "rotate", "pi-001")
    install(fleet / "devices" / "pi-001.tar.gz", device)

    assert (device / LOCAL_TOML).read_text() == LOCAL
    after = load_config(device / "agent.toml")
    new_serial = Certificate.from_bytes((device / "device.cert").read_bytes()).serial
    assert new_serial != old_serial  # the new bundle is in place
    for config in (before, after):
        assert config.state.dir == Path("/srv/agent-state")
        assert config.data.source == "npz"
        assert config.data.options == {"path": "/srv/data/camera.npz"}
        assert config.data.holdout == 0.1
        assert config.training.epochs == 3
        assert config.device.id == "pi-001"  # the bundle's settings still apply
    # The environment overrides the local file.
    env = {"MASKFL__TRAINING__EPOCHS": "7"}
    assert load_config(device / "agent.toml", env=env).training.epochs == 7


def test_a_bad_local_setting_names_the_local_file(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    provision(fleet, "init", "--fleet", "demo")
    provision(fleet, "add-device", "pi-001")
    device = tmp_path / "agent"
    install(fleet / "devices" / "pi-001.tar.gz", device)
    (device / LOCAL_TOML).write_text("[training]\nepoch = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(device / "agent.toml")
    assert "did you mean epochs" in str(caught.value)
    assert LOCAL_TOML in str(caught.value)
    (device / LOCAL_TOML).write_text("[training\n")
    with pytest.raises(ConfigError, match=r"agent\.local\.toml is not valid TOML"):
        load_config(device / "agent.toml")
