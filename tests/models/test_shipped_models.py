"""Each shipped model really trains on-device with LiteRT, and its weights round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from maskfl.agent.datasources import Dataset
from maskfl.agent.datasources.digits import DigitsSource
from maskfl.agent.training import LocalTrainer
from maskfl.models import shipped_models

NAMES = [m.name for m in shipped_models()]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return DigitsSource(seed=0).load(0, 1)


@pytest.mark.parametrize("name", NAMES)
def test_learns_digits_well_above_chance(name: str, digits: Dataset) -> None:
    trainer = LocalTrainer.shipped(name)
    before = trainer.evaluate(digits.x_test, digits.y_test)
    stats = trainer.train(digits.x_train, digits.y_train, epochs=4, batch_size=32, seed=1)
    after = trainer.evaluate(digits.x_test, digits.y_test)
    assert before.accuracy < 0.3
    assert after.accuracy > 0.85
    assert after.loss < before.loss
    assert stats.epoch_losses[-1] < stats.epoch_losses[0]
    assert stats.steps == 4 * -(-digits.num_train // 32)


@pytest.mark.parametrize("name", NAMES)
def test_flat_weights_round_trip_bit_exactly(name: str) -> None:
    trainer = LocalTrainer.shipped(name)
    weights = np.random.default_rng(3).standard_normal(trainer.spec.num_params).astype(np.float32)
    weights[:5] = [0.0, -0.0, 1e-38, np.float32(3.4e38), -1e-45]
    trainer.set_weights(weights)
    got = trainer.get_weights()
    assert got.dtype == np.float32
    assert got.tobytes() == weights.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_interpreters_do_not_share_weights(name: str, digits: Dataset) -> None:
    one, two = LocalTrainer.shipped(name), LocalTrainer.shipped(name)
    start = one.get_weights()
    assert np.array_equal(start, two.get_weights())
    two.train(digits.x_train[:64], digits.y_train[:64], epochs=1, batch_size=16)
    assert np.array_equal(one.get_weights(), start)
    assert not np.array_equal(two.get_weights(), start)


@pytest.mark.parametrize("name", NAMES)
def test_any_batch_size_trains(name: str, digits: Dataset) -> None:
    trainer = LocalTrainer.shipped(name)
    for batch in (1, 7, 64, 500):
        stats = trainer.train(digits.x_train[:100], digits.y_train[:100], batch_size=batch)
        assert np.isfinite(stats.epoch_losses).all()
    assert trainer.predict(digits.x_test[:3]).shape == (3, 10)


def test_mlp_weight_layout_matches_a_numpy_forward_pass(digits: Dataset) -> None:
    """get_flat order is w1 [64, h], b1 [h], w2 [h, 10], b2 [10] (creation order)."""
    trainer = LocalTrainer.shipped("mlp")
    flat = np.random.default_rng(5).standard_normal(trainer.spec.num_params).astype(np.float32)
    hidden = (trainer.spec.num_params - 10) // (64 + 1 + 10)
    trainer.set_weights(flat)
    sizes = np.cumsum([64 * hidden, hidden, hidden * 10])
    w1, b1, w2, b2 = np.split(flat, sizes)
    h = np.maximum(digits.x_test @ w1.reshape(64, hidden) + b1, 0)
    expected = h @ w2.reshape(hidden, 10) + b2
    np.testing.assert_allclose(trainer.predict(digits.x_test), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_zero_weights_give_uniform_predictions(name: str, digits: Dataset) -> None:
    trainer = LocalTrainer.shipped(name)
    trainer.set_weights(np.zeros(trainer.spec.num_params, np.float32))
    result = trainer.evaluate(digits.x_test, digits.y_test)
    assert result.loss == pytest.approx(np.log(10), rel=1e-6)
    assert result.accuracy == pytest.approx(float(np.mean(digits.y_test == 0)))
