"""A shipped graph with a global weight vector built in, ready for inference.

The exported .tflite is loaded afresh with LiteRT: ``get_flat`` returns exactly the
weights, and ``infer`` gives the logits the agent's trainer gives after
``set_weights``; the coordinator's ``models export --format tflite`` writes it from a
real registry version.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.training import LocalTrainer
from maskfl.broker_coordinator.cli import main as coordinator
from maskfl.models import graph_with_weights, model_path, shipped_model
from maskfl.protocol.errors import ConfigError
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import coordinator_command
from tests.broker_coordinator.provision.conftest import provision

interpreter = pytest.importorskip("ai_edge_litert.interpreter")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_graph_starts_with_the_weights(name: str, tmp_path: Path) -> None:
    trainer = LocalTrainer.shipped(name, num_threads=1)
    weights = trainer.get_weights() + np.random.default_rng(7).normal(
        0, 0.05, trainer.get_weights().size
    ).astype(np.float32)
    exported = tmp_path / f"{name}.tflite"
    exported.write_bytes(graph_with_weights(model_path(name).read_bytes(), weights))

    fresh = interpreter.Interpreter(model_path=str(exported))
    np.testing.assert_array_equal(fresh.get_signature_runner("get_flat")()["flat"], weights)
    spec = shipped_model(name)
    x = np.random.default_rng(1).random((5, *trainer.spec.input_shape), dtype=np.float32)
    logits = fresh.get_signature_runner("infer")(x=x)["logits"]
    trainer.set_weights(weights)
    np.testing.assert_allclose(logits, trainer.predict(x), rtol=1e-5, atol=1e-6)
    assert logits.shape == (5, trainer.spec.num_classes)
    assert spec.num_params == weights.size


def test_a_vector_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="has 3 values"):
        graph_with_weights(model_path("mlp").read_bytes(), np.zeros(3, np.float32))


@pytest.mark.slow
def test_models_export_tflite_from_the_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet"
    provision(
        fleet,
        "init",
        "--fleet",
        "demo",
        "--coordinator-host",
        "localhost",
        "--port",
        str(free_port()),
        "--coordinator-state-dir",
        str(tmp_path / "state"),
    )
    config = fleet / "coordinator" / "coordinator.toml"
    env_port = {"MASKFL__HTTP__PORT": "0"}
    proc = subprocess.Popen(
        coordinator_command(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env_port},
    )
    listed = ""
    try:
        # Version 0 is in the registry before the broker is tried: read the
        # coordinator's log until it says the broker is unreachable (no polling).
        assert proc.stderr is not None
        for line in proc.stderr:
            if "unreachable" in line:
                break
        assert coordinator(["models", "list", "--config", str(config)]) == 0
        listed = capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert "mlp v0" in listed
    out = tmp_path / "global.tflite"
    args = ["models", "export", "--config", str(config), "--format", "tflite", "--out", str(out)]
    assert coordinator(args) == 0
    assert "graph with 4810 weights set" in capsys.readouterr().out
    fresh = interpreter.Interpreter(model_path=str(out))
    initial = np.load(fleet / "coordinator" / "mlp.init.npy")
    np.testing.assert_array_equal(fresh.get_signature_runner("get_flat")()["flat"], initial)
