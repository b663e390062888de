"""``maskfl-agent`` commands: keygen, check, status, and one-line errors with exit 2."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.cli import main
from maskfl.models import model_path
from maskfl.protocol.keys import public_key_from_pem
from maskfl.testing.broker import Mosquitto
from maskfl.testing.tls import TestPki
from tests.agent.fleet import Fleet


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskfl.agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keygen_writes_a_private_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys" / "device.key"
    assert main(["keygen", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(public_key_from_pem(capsys.readouterr().out.encode())) == 32
    assert main(["keygen", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_check_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config = fleet.device("dev-c", Mosquitto(tmp_path / "unused"))
    assert main(["check", "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "dev-c"
    assert summary["fleet"] == fleet.name
    # check loads the data and every shipped model, and trains one batch on each
    # the test bundle's [data] is shard 0 of 4: a quarter of the 1438 training digits
    assert summary["data"] == {"source": "digits", "train_samples": 360, "test_samples": 359}
    assert summary["runtime"].startswith(("ai-edge-litert", "tflite-runtime"))
    by_name = {m["model"]: m for m in summary["models"]}
    assert set(by_name) == {"mlp", "cnn"}
    assert by_name["mlp"]["parameters"] == 4810
    for model in by_name.values():
        assert model["fits_data"] is True
        assert 0 < model["one_batch_loss"] < 10
    assert main(["status", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config = fleet.device("dev-e", Mosquitto(tmp_path / "unused"))
    missing = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr
    key = config.parent / "device.key"
    key.chmod(0o644)
    loose = run_cli("check", "--config", str(config))
    assert loose.returncode == 2
    assert "chmod 600" in loose.stderr
    assert "Traceback" not in loose.stderr
    key.chmod(0o600)
    config.write_text(config.read_text().replace('id = "dev-e"', 'id = "dev-x"'))
    mismatch = run_cli("check", "--config", str(config))
    assert mismatch.returncode == 2
    assert "certificate is for 'dev-e'" in mismatch.stderr


def _tls_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Point [broker] at a real TLS CA and client pair through MASKFL__ overrides."""
    pki = TestPki(tmp_path / "pki")
    client = pki.client_cert("dev-t")
    client.key.chmod(0o600)
    monkeypatch.setenv("MASKFL__BROKER__TLS", "true")
    monkeypatch.setenv("MASKFL__BROKER__CA_FILE", str(pki.ca.cert))
    monkeypatch.setenv("MASKFL__BROKER__CERT_FILE", str(client.cert))
    monkeypatch.setenv("MASKFL__BROKER__KEY_FILE", str(client.key))
    return pki.ca.cert, client.cert, client.key


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


def test_check_and_run_refuse_broken_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config = str(fleet.device("dev-t", Mosquitto(tmp_path / "unused")))
    ca, _cert, key = _tls_env(monkeypatch, tmp_path)
    assert main(["check", "--config", config]) == 0
    capsys.readouterr()

    key.chmod(0o644)
    for command in ("check", "run"):  # run refuses before it connects
        assert main([command, "--config", config]) == 2
        err = _one_line(capsys)
        assert "broker.key_file: " in err
        assert f"chmod 600 {key}" in err
    key.chmod(0o600)

    monkeypatch.setenv("MASKFL__BROKER__CA_FILE", str(tmp_path / "nope.pem"))
    assert main(["check", "--config", config]) == 2
    err = _one_line(capsys)
    assert "error: broker.ca_file: " in err and "nope.pem does not exist" in err
    assert "set by environment variable MASKFL__BROKER__CA_FILE" in err
    monkeypatch.setenv("MASKFL__BROKER__CA_FILE", str(ca))

    other = TestPki(tmp_path / "other").client_cert("dev-t")
    monkeypatch.setenv("MASKFL__BROKER__CERT_FILE", str(other.cert))
    assert main(["check", "--config", config]) == 2
    assert "error: broker.cert_file: " in _one_line(capsys)


def test_check_names_the_data_source_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config = str(fleet.device("dev-d", Mosquitto(tmp_path / "unused")))
    monkeypatch.setenv("MASKFL__DATA__SOURCE", "digitz")
    assert main(["check", "--config", config]) == 2
    err = _one_line(capsys)
    assert "error: data.source: no data source called 'digitz'; installed: " in err
    monkeypatch.setenv("MASKFL__DATA__SOURCE", "digits")
    monkeypatch.setenv("MASKFL__DATA__OPTIONS", '{"shard": 0, "shardz": 2}')
    assert main(["check", "--config", config]) == 2
    err = _one_line(capsys)
    assert "error: data.options.shardz: " in err
    assert "(and shard, shards" in err


def test_check_loads_the_data_and_the_model_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet(tmp_path / "fleet")
    config = str(fleet.device("dev-m", Mosquitto(tmp_path / "unused")))
    monkeypatch.setenv("MASKFL__DATA__OPTIONS", '{"shard": 1, "shards": 2}')
    monkeypatch.setenv("MASKFL__TRAINING__MODEL_FILE", str(model_path("cnn")))
    assert main(["check", "--config", config]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"]["train_samples"] == 719  # half of the 1438 training digits
    assert [(m["model"], m["from"], m["fits_data"]) for m in summary["models"]] == [
        ("cnn", "model_file", True)
    ]
    # data that do not fit the configured model fail check, naming the field
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train.npz", x=np.zeros((20, 5), np.float32), y=np.zeros(20, np.int64))
    monkeypatch.setenv("MASKFL__DATA__SOURCE", "npz")
    monkeypatch.setenv("MASKFL__DATA__OPTIONS", json.dumps({"path": str(data)}))
    assert main(["check", "--config", config]) == 2
    err = _one_line(capsys)
    assert "error: training.model_file: train samples have shape [5]" in err
    # a model file that is not a model
    monkeypatch.delenv("MASKFL__DATA__SOURCE")
    monkeypatch.delenv("MASKFL__DATA__OPTIONS")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer")
    monkeypatch.setenv("MASKFL__TRAINING__MODEL_FILE", str(junk))
    assert main(["check", "--config", config]) == 2
    assert "error: training.model_file: " in _one_line(capsys)
