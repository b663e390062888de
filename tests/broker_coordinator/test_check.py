"""``maskfl-coordinator check``: config, identity, files and the broker, then exit.

With a provisioned fleet behind its own mosquitto: all well is exit 0 and a JSON
summary; a stopped broker and a port without TLS are exit 1 with one line saying
so; a config mistake is exit 2. The check sends no MQTT CONNECT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskfl.broker_coordinator.cli import main
from maskfl.testing.broker import Mosquitto
from tests.broker_coordinator.provision.conftest import start_fleet_broker

pytestmark = pytest.mark.broker


def test_check_a_provisioned_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_fleet_broker(
        tmp_path / "fleet",
        tmp_path,
        [],
        extra=["--coordinator-host", "localhost", "--coordinator-state-dir", str(tmp_path / "s")],
    )
    config = str(tmp_path / "fleet" / "coordinator" / "coordinator.toml")
    monkeypatch.setenv("MASKFL__HTTP__PORT", "0")
    try:
        capsys.readouterr()
        assert main(["check", "--config", config]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["coordinator"] == "coordinator" and summary["fleet"] == "demo"
        assert summary["model"]["id"] == "mlp" and summary["model"]["length"] > 0
        assert summary["broker"] == {
            "address": f"localhost:{broker.port}",
            "tls": True,
            "ok": True,
            "problem": None,
        }
        # No MQTT CONNECT: the broker saw no client.
        assert "New client connected" not in broker.mosquitto.log()

        with Mosquitto(tmp_path / "plain") as plain:
            monkeypatch.setenv("MASKFL__BROKER__PORT", str(plain.port))
            assert main(["check", "--config", config]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "nothing speaking MQTT over TLS" in err, err
    finally:
        broker.mosquitto.stop()
    monkeypatch.delenv("MASKFL__BROKER__PORT")
    assert main(["check", "--config", config]) == 1
    assert "unreachable" in capsys.readouterr().err

    monkeypatch.setenv("MASKFL__BROKER__PROT", "1")
    assert main(["check", "--config", config]) == 2
    assert "did you mean port" in capsys.readouterr().err
