"""LocalTrainer on the real shipped models and on models it must refuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.datasources import Dataset
from maskfl.agent.datasources.digits import DigitsSource
from maskfl.agent.training import (
    RUNTIME,
    LocalTrainer,
    ModelContractError,
    TrainingError,
)
from maskfl.models import shipped_model
from maskfl.protocol.errors import ConfigError

FIXTURES = Path(__file__).parents[2] / "models" / "data"


@pytest.fixture(scope="module")
def share() -> Dataset:
    return DigitsSource(partition="dirichlet", alpha=0.5, seed=1).load(2, 8)


@pytest.fixture(scope="module")
def mlp() -> LocalTrainer:
    return LocalTrainer.shipped("mlp")


def test_runtime_is_litert() -> None:
    assert RUNTIME is not None
    assert RUNTIME.startswith("ai-edge-litert ")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_delta_is_local_minus_global(name: str, share: Dataset) -> None:
    trainer = LocalTrainer.shipped(name)
    global_w = np.random.default_rng(0).normal(0, 0.1, trainer.spec.num_params).astype(np.float32)
    update = trainer.local_update(
        global_w, share.x_train, share.y_train, epochs=2, batch_size=16, seed=4
    )
    local = trainer.get_weights()
    assert update.delta.dtype == np.float32
    assert update.delta.shape == (trainer.spec.num_params,)
    assert np.array_equal(update.delta, local - global_w)
    assert np.count_nonzero(update.delta) > 0.5 * update.delta.size  # blank pixels: no gradient
    assert update.num_samples == share.num_train
    assert update.stats.samples == share.num_train
    assert update.stats.epochs == 2


def test_same_seed_same_delta_and_optimizer_is_reset(mlp: LocalTrainer, share: Dataset) -> None:
    start = mlp.get_weights()
    kwargs = {"epochs": 2, "batch_size": 8, "seed": 11}
    first = mlp.local_update(start, share.x_train, share.y_train, **kwargs)
    second = mlp.local_update(start, share.x_train, share.y_train, **kwargs)
    other = mlp.local_update(start, share.x_train, share.y_train, **(kwargs | {"seed": 12}))
    assert first.delta.tobytes() == second.delta.tobytes()
    assert first.stats.epoch_losses == second.stats.epoch_losses
    assert first.delta.tobytes() != other.delta.tobytes()


def test_without_optimizer_reset_training_differs(mlp: LocalTrainer, share: Dataset) -> None:
    start = mlp.get_weights()
    mlp.set_weights(start)
    mlp.train(share.x_train, share.y_train, seed=1)
    reset_run = mlp.get_weights()
    mlp.set_weights(start, reset_optimizer=False)  # Adam moments carry over
    mlp.train(share.x_train, share.y_train, seed=1)
    assert not np.array_equal(mlp.get_weights(), reset_run)


def test_zero_learning_rate_leaves_weights_alone(share: Dataset) -> None:
    trainer = LocalTrainer.shipped("cnn")
    trainer.set_learning_rate(0.0 + 1e-30)
    update = trainer.local_update(
        trainer.get_weights(), share.x_train, share.y_train, epochs=1, batch_size=32, seed=0
    )
    assert np.abs(update.delta).max() < 1e-20
    with pytest.raises(TrainingError, match="positive"):
        trainer.set_learning_rate(-0.1)


def test_evaluate_reports_loss_and_accuracy(mlp: LocalTrainer, share: Dataset) -> None:
    mlp.set_weights(np.zeros(mlp.spec.num_params, np.float32))
    labels = np.array([0, 3, 0, 7])
    result = mlp.evaluate(share.x_test[:4], labels)
    assert result.samples == 4
    assert result.accuracy == 0.5
    assert result.loss == pytest.approx(np.log(10), rel=1e-6)


def test_cnn_takes_flat_or_image_shaped_samples(share: Dataset) -> None:
    cnn = LocalTrainer.shipped("cnn")
    flat = cnn.predict(share.x_test[:5])
    images = cnn.predict(share.x_test[:5].reshape(5, 8, 8, 1))
    assert np.array_equal(flat, images)


# --- models that are refused


def test_missing_signatures_are_named() -> None:
    with pytest.raises(ModelContractError) as info:
        LocalTrainer.from_file(FIXTURES / "missing_signatures.tflite")
    message = str(info.value)
    assert "lacks the signature(s) train, set_flat" in message
    assert "models/build.py" in message
    assert isinstance(info.value, ConfigError)
    assert info.value.field == "model"


def test_static_batch_is_refused() -> None:
    with pytest.raises(ModelContractError, match="batch dimension must be dynamic"):
        LocalTrainer.from_file(FIXTURES / "static_batch.tflite")


def test_flex_model_is_refused_at_load() -> None:
    with pytest.raises(ModelContractError, match=r"Flex.*builtin ops only"):
        LocalTrainer.from_file(FIXTURES / "flex_ops.tflite")


def test_garbage_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelContractError, match="cannot be loaded"):
        LocalTrainer(b"\x00" * 100, name="junk")
    with pytest.raises(ModelContractError, match="cannot read model file"):
        LocalTrainer.from_file(tmp_path / "absent.tflite")


def test_load_by_name_or_path(tmp_path: Path) -> None:
    assert LocalTrainer.load("mlp").spec.name == "mlp"
    copy = tmp_path / "mine.tflite"
    copy.write_bytes(shipped_model("cnn").read_bytes())
    assert LocalTrainer.load(str(copy)).spec.num_params == shipped_model("cnn").num_params
    with pytest.raises(ConfigError, match="no shipped model"):
        LocalTrainer.load("vgg")


# --- inputs that are refused


def test_weights_of_the_wrong_length_or_not_finite(mlp: LocalTrainer) -> None:
    with pytest.raises(ModelContractError, match="4810 parameters"):
        mlp.set_weights(np.zeros(10, np.float32))
    bad = np.zeros(mlp.spec.num_params, np.float32)
    bad[3] = np.nan
    with pytest.raises(TrainingError, match="NaN"):
        mlp.set_weights(bad)


def test_data_that_do_not_fit(mlp: LocalTrainer, share: Dataset) -> None:
    x, y = share.x_train, share.y_train
    with pytest.raises(TrainingError, match=r"shape \[63\]"):
        mlp.train(x[:, :63], y)
    with pytest.raises(TrainingError, match=r"classes 0\.\.9"):
        mlp.train(x, np.full(len(y), 10))
    with pytest.raises(TrainingError, match="integers"):
        mlp.train(x, y.astype(np.float32))
    with pytest.raises(TrainingError, match="one label per sample"):
        mlp.train(x, y[:-1])
    with pytest.raises(TrainingError, match="no training samples"):
        mlp.train(x[:0], y[:0])
    with pytest.raises(TrainingError, match="at least 1"):
        mlp.train(x, y, epochs=0)


def test_diverging_training_is_reported(mlp: LocalTrainer, share: Dataset) -> None:
    mlp.set_weights(np.full(mlp.spec.num_params, 1e30, np.float32))
    with pytest.raises(TrainingError, match="non-finite"):
        mlp.train(share.x_train, share.y_train)


def test_agent_training_imports_neither_tensorflow_nor_sklearn() -> None:
    code = (
        "import sys\n"
        "from maskfl.agent.training import LocalTrainer\n"
        "from maskfl.agent.datasources import load_dataset\n"
        "d = load_dataset('digits', {'shard': 0, 'shards': 4})\n"
        "t = LocalTrainer.shipped('mlp')\n"
        "t.local_update(t.get_weights(), d.x_train, d.y_train, epochs=1, batch_size=32, seed=0)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'sklearn', 'scipy')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_without_any_runtime_the_error_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['ai_edge_litert'] = None\n"
        "sys.modules['tflite_runtime'] = None\n"
        "from maskfl.agent.training import RUNTIME, LocalTrainer, RuntimeUnavailableError\n"
        "assert RUNTIME is None\n"
        "try:\n"
        "    LocalTrainer.shipped('mlp')\n"
        "except RuntimeUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "pip install ai-edge-litert" in out.stdout
    assert "no TFLite runtime" in out.stderr  # the one log line at import
