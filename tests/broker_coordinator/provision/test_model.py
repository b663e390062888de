"""``maskfl-provision init --model``: the coordinator bundle starts from the graph's weights."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.config import check_files
from maskfl.broker_coordinator.config import load_config as load_coordinator_config
from maskfl.broker_coordinator.provision.cli import main
from maskfl.broker_coordinator.service import initial_weights, model_graph
from maskfl.models import shipped_model
from tests.broker_coordinator.provision.conftest import provision


def model_section(root: Path) -> dict[str, object]:
    data = tomllib.loads((root / "coordinator" / "coordinator.toml").read_text())
    section: dict[str, object] = data["model"]
    return section


@pytest.mark.parametrize("name", [None, "mlp", "cnn"])
def test_init_puts_the_shipped_graph_and_its_initial_weights_in_the_bundle(
    tmp_path: Path, name: str | None
) -> None:
    root = tmp_path / "fleet"
    provision(root, "init", "--fleet", "demo", *(["--model", name] if name else []))
    model = shipped_model(name or "mlp")
    assert model_section(root) == {
        "id": model.name,
        "length": model.num_params,
        "initial_weights": model.initial_weights_file,
        "graph_file": model.file,
    }
    config = load_coordinator_config(root / "coordinator" / "coordinator.toml", env={})
    check_files(config)
    weights = initial_weights(config)  # what the coordinator registers as version 0
    assert weights.tobytes() == model.initial_weights().tobytes()
    assert np.any(weights != 0)
    assert model_graph(config) == model.read_bytes()


def test_rotating_the_coordinator_keeps_the_model_files(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    provision(root, "init", "--fleet", "demo", "--model", "cnn")
    (root / "coordinator" / "cnn.init.npy").unlink()
    provision(root, "rotate", "coordinator")
    config = load_coordinator_config(root / "coordinator" / "coordinator.toml", env={})
    assert initial_weights(config).tobytes() == shipped_model("cnn").initial_weights().tobytes()


def test_a_model_of_your_own_names_no_files(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    provision(root, "init", "--fleet", "demo", "--model-id", "mine", "--model-length", "12")
    assert model_section(root) == {"id": "mine", "length": 12}
    assert not list((root / "coordinator").glob("*.npy"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], "mlp"),
        (["--model", "mlp", "--model-id", "x", "--model-length", "3"], "one or the other"),
        (["--model-id", "x"], "--model-length"),
        (["--model-length", "3"], "--model-id"),
    ],
)
def test_bad_model_options_are_one_line_errors(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["--dir", str(tmp_path / "fleet"), "init", "--fleet", "demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "fleet" / "fleet.toml").exists()
