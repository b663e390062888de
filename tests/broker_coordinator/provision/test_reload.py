"""Provisioning applies its broker changes itself: ``[broker] pid_file`` / ``reload_command``.

A real mosquitto runs the fleet's generated config. A device added while no reload is
configured is refused by the ACL (Not authorized) until the broker reloads; with a pid
file or a reload command in fleet.toml, ``add-device``, ``revoke`` and ``rotate`` reload
the broker themselves and say so in one line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.broker_coordinator.provision.cli import main
from tests.broker_coordinator.provision.conftest import (
    WAIT_S,
    Broker,
    provision,
    running_fleet_broker,
)

pytestmark = pytest.mark.broker

P = "maskfl/v1/demo"


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    with running_fleet_broker(tmp_path, ["dev-a"]) as broker:
        yield broker


def _reloads(broker: Broker) -> int:
    return broker.mosquitto.log().count("Reloading config")


def _wait_reloads(broker: Broker, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while _reloads(broker) < count:
        assert time.monotonic() < deadline, "mosquitto did not reload"
        time.sleep(0.02)  # inherent: mosquitto's log file, written by another process


def _run(root: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    provision(root, *args)
    return capsys.readouterr().out


def test_added_device_connects_after_the_provisioning_reload(
    fleet_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fleet_broker.root
    assert fleet_broker.mosquitto.proc is not None
    # Without a configured reload: the ACL changes on disk only, and the output says so.
    out = _run(root, capsys, "add-device", "dev-b")
    assert "reload the broker now" in out and "--reload-command" in out
    dev_b = fleet_broker.device("dev-b")
    assert dev_b.connect()
    refused = dev_b.publish(f"{P}/round/1/update/dev-b")
    assert refused.is_failure and refused.getName() == "Not authorized"
    dev_b.close()

    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{fleet_broker.mosquitto.proc.pid}\n")
    _run(root, capsys, "broker-config", "--broker-pid-file", str(pid_file))
    before = _reloads(fleet_broker)
    out = _run(root, capsys, "add-device", "dev-c")
    assert f"broker reloaded (SIGHUP to pid {fleet_broker.mosquitto.proc.pid}" in out
    assert out.count("\n") == 2, out  # the device's line and the reload's line
    _wait_reloads(fleet_broker, before + 1)
    for device in ("dev-b", "dev-c"):
        client = fleet_broker.device(device)
        assert client.connect()
        assert client.allowed(f"{P}/round/1/update/{device}"), device

    # revoke reloads as well: the revoked certificate is in the CRL at once.
    out = _run(root, capsys, "revoke", "dev-c")
    assert "broker reloaded" in out
    _wait_reloads(fleet_broker, before + 2)
    assert not fleet_broker.device("dev-c").connect()
    # Re-running add-device for an enrolled device changes nothing and reloads nothing.
    out = _run(root, capsys, "add-device", "dev-b")
    assert "broker" not in out


def test_reload_command_after_rotate_and_a_failing_one(
    fleet_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fleet_broker.root
    assert fleet_broker.mosquitto.proc is not None
    pid = fleet_broker.mosquitto.proc.pid
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("broker-ca.pem", "device-tls.pem", "device-tls.key"):
        (stale / name).write_bytes((root / "devices" / "dev-a" / name).read_bytes())
    _run(root, capsys, "broker-config", "--reload-command", f"kill -HUP {pid}")
    assert f'reload_command = "kill -HUP {pid}"' in (root / "fleet.toml").read_text()
    before = _reloads(fleet_broker)
    out = _run(root, capsys, "rotate", "dev-a")
    assert f"broker reloaded (`kill -HUP {pid}`)" in out
    _wait_reloads(fleet_broker, before + 1)
    assert not fleet_broker.device("dev-a", bundle=stale).connect()
    assert fleet_broker.device("dev-a").connect()

    # A reload that fails: one line, exit 2, and the change itself is saved.
    _run(root, capsys, "broker-config", "--reload-command", "false")
    capsys.readouterr()
    assert main(["--dir", str(root), "add-device", "dev-d"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert "broker NOT reloaded: `false` exited with status 1" in captured.err
    assert "the change is saved" in captured.err
    assert "user dev-d" in (root / "broker" / "acl").read_text()
