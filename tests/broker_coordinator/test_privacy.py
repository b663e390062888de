"""The accountant: per-round and cumulative (epsilon, delta) of the distributed mechanism."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from maskfl.broker_coordinator.privacy import (
    Accountant,
    DpPlan,
    noise_multiplier_for,
    plan,
    round_rho,
)
from maskfl.protocol.dp import updater_variance
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.masking import MaskConfig

SCALE = 2**20  # encoded units per 1.0, as a 32-bit round of a few hundred devices has


def _gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("z", [0.7, 1.0, 2.0])
def test_a_round_costs_what_the_continuous_gaussian_with_that_multiplier_costs(z: float) -> None:
    """With a fine encoding the discrete mechanism's rho is 1 / (2 z^2), the Gaussian's."""
    v = updater_variance(z, 1.0, SCALE, 3)
    rho = round_rho(v, 1.0, SCALE, 3, 1_000)
    assert rho == pytest.approx(1 / (2 * z * z), rel=1e-3)
    acc = Accountant(delta=1e-5)
    per_round, cumulative = acc.spend(rho)
    assert per_round == cumulative == pytest.approx(_gaussian_epsilon(z, 1, 1e-5), rel=1e-2)
    for _ in range(9):
        per_round_again, cumulative = acc.spend(rho)
        assert per_round_again == pytest.approx(per_round)
    assert cumulative == pytest.approx(_gaussian_epsilon(z, 10, 1e-5), rel=1e-2)
    # The textbook zCDP conversion is an upper bound.
    assert cumulative <= 10 * rho + 2 * math.sqrt(10 * rho * math.log(1e5))


def test_fewer_honest_updaters_or_coarser_encoding_cost_more() -> None:
    v = updater_variance(1.0, 1.0, SCALE, 3)
    # The same per-updater share summed over fewer honest updaters is less noise.
    assert round_rho(v, 1.0, SCALE, 2, 100) > round_rho(v, 1.0, SCALE, 3, 100)
    # Rounding adds sqrt(d)/2 to the sensitivity: it shows at a coarse scale.
    coarse = updater_variance(1.0, 1.0, 16, 3)
    assert round_rho(coarse, 1.0, 16, 3, 10_000) > 1.5 * round_rho(coarse, 1.0, 16, 3, 1)


def test_epsilon_target_gives_the_noise_that_spends_it() -> None:
    z = noise_multiplier_for(1.0, 1e-5)
    v = updater_variance(z, 1.0, SCALE, 3)
    eps = Accountant(delta=1e-5).spend(round_rho(v, 1.0, SCALE, 3, 100))[0]
    assert 0.98 <= eps <= 1.001  # the rounding term (sqrt(d) / 2) adds a little
    assert noise_multiplier_for(0.5, 1e-5) > z


def test_the_budget_stops_the_round_that_would_overspend() -> None:
    acc = Accountant(delta=1e-5)
    rho = 1 / (2 * 1.0**2)
    rounds = 0
    while not acc.would_exceed(rho, 8.0):
        acc.spend(rho)
        rounds += 1
    assert rounds >= 1 and acc.epsilon() <= 8.0 < acc.epsilon(acc.rho + rho, acc.rounds + 1)


def _plan(bits: int, **kw: object) -> tuple[MaskConfig, DpPlan]:
    args: dict[str, object] = {
        "noise_multiplier": 1.0,
        "epsilon_target": None,
        "delta": 1e-5,
        "clip_norm": 1.0,
        "budget": None,
        "n_min": 3,
        "elements": 4810,
        "make_mask": lambda t: MaskConfig(1.0, 1000, bits, t),  # type: ignore[arg-type]
    }
    args.update(kw)
    return plan(**args)  # type: ignore[arg-type]


def test_the_plan_widens_the_encoding_and_meets_an_epsilon_target() -> None:
    mask, dp = _plan(32)
    assert mask.noise > 0 and mask.scale < MaskConfig(1.0, 1000, 32).scale
    assert dp.variance == updater_variance(1.0, 1.0, mask.scale, 3)
    mask, dp = _plan(32, noise_multiplier=None, epsilon_target=2.0)
    assert Accountant(delta=1e-5).spend(dp.rho)[0] <= 2.0


def test_a_variance_beyond_64_bits_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"masking\.word_bits = 32"):
        _plan(64)
