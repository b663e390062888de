"""The differential-privacy accountant: what each round and all rounds together spend.

Each round with ``[privacy] dp = "distributed"`` is one release of the
distributed discrete Gaussian mechanism (protocol/dp.py): at least ``n`` honest
updaters (``privacy.min_updates``) each add ``N_Z(0, v)`` per element, ``v`` the
integer per-updater variance the round parameters publish. Kairouz, Liu, Steinke
(ICML 2021, Theorem 1) bound such a sum as rho-zero-concentrated DP with

    rho = Delta2^2 / (2 n v) + tau d / 4,   tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 v k / (k + 1))

``Delta2 = C S + sqrt(d) / 2`` is the L2 sensitivity in encoded units: an update
clipped to L2 norm ``C``, scaled by ``S`` and rounded per element (at most 1/2
each) against the all-zero update, ``d`` the number of noised elements.

Rounds compose in Rényi DP (rho-zCDP is RDP ``alpha * rho`` at every order); the
conversion to (epsilon, delta) is dp-accounting's (``RdpAccountant`` with
``ZCDpEvent``). No amplification by sampling is claimed: sortition is public
(anyone, the coordinator first, computes from the round seed who updates), so the
sample is not secret from the adversary, which amplification requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from maskfl.protocol.errors import ConfigError

__all__ = ["MAX_NOISE_MULTIPLIER", "Accountant", "round_rho", "updater_variance"]

MAX_NOISE_MULTIPLIER: Final = 1e4


def updater_variance(noise_multiplier: float, clip_norm: float, scale: int, n_min: int) -> int:
    """The per-updater integer variance ``v = ceil((z C S)^2 / n_min)``: the sum of
    ``n_min`` honest shares has variance at least ``(z C S)^2``."""
    sigma = noise_multiplier * clip_norm * scale
    return max(1, math.ceil(sigma * sigma / n_min))


def round_rho(variance: int, clip_norm: float, scale: int, n_min: int, elements: int) -> float:
    """The zCDP rho of one round (see the module docstring)."""
    delta2 = clip_norm * scale + math.sqrt(elements) / 2
    tau = 10 * sum(math.exp(-2 * math.pi**2 * variance * k / (k + 1)) for k in range(1, n_min))
    return delta2 * delta2 / (2 * n_min * variance) + tau * elements / 4


def _epsilon(rho: float, rounds: int, delta: float) -> float:
    if rounds == 0 or rho == 0:
        return 0.0
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.ZCDpEvent(rho), rounds)
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier ``z`` whose one round costs at most ``epsilon``
    at ``delta`` (rho = 1 / (2 z^2), rounding terms aside), by bisection."""
    lo, hi = 1e-3, MAX_NOISE_MULTIPLIER
    if _epsilon(1 / (2 * hi * hi), 1, delta) > epsilon:
        raise ConfigError(
            f"epsilon_target {epsilon:g} needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}",
            field="epsilon_target",
        )
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if _epsilon(1 / (2 * mid * mid), 1, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(slots=True)
class Accountant:
    """Cumulative privacy spent: the sum of the rounds' rho (zCDP composes by addition)
    and their count, converted to (epsilon, delta) on demand."""

    delta: float
    rho: float = 0.0
    rounds: int = 0

    def epsilon(self, rho: float | None = None, rounds: int | None = None) -> float:
        """Epsilon at :attr:`delta` of ``rounds`` rounds totalling ``rho`` (default: all so far)."""
        total = self.rho if rho is None else rho
        count = self.rounds if rounds is None else rounds
        # zCDP composes additively: one event of the total rho is exact.
        return _epsilon(total, 1 if count else 0, self.delta)

    def spend(self, rho: float) -> tuple[float, float]:
        """Record one round; returns (this round's epsilon, cumulative epsilon)."""
        self.rho += rho
        self.rounds += 1
        return _epsilon(rho, 1, self.delta), self.epsilon()

    def would_exceed(self, rho: float, budget: float) -> bool:
        """Whether one more round of ``rho`` would take the cumulative epsilon past ``budget``."""
        return self.epsilon(self.rho + rho, self.rounds + 1) > budget
