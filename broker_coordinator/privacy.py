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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from maskfl.broker_coordinator.config import DpMode
from maskfl.protocol.dp import aggregate_noise_bound, updater_variance
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.masking import MaskConfig

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "Accountant",
    "DpPlan",
    "aggregate_noise_bound",
    "describe_status",
    "noise_multiplier_for",
    "plan",
    "privacy_status",
    "round_rho",
    "updater_variance",
]

MAX_NOISE_MULTIPLIER: Final = 1e4


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


@dataclass(frozen=True, slots=True)
class DpPlan:
    """What every round of a DP coordinator publishes and spends."""

    clip_norm: float
    noise_multiplier: float
    variance: int
    """Per-updater integer variance ``v`` (RoundParams.noise_variance)."""
    n_min: int
    elements: int
    rho: float
    """zCDP of one round."""
    delta: float
    budget: float | None

    def describe(self) -> str:
        return (
            f"distributed discrete Gaussian, noise multiplier {self.noise_multiplier:.4g}, "
            f"clip norm {self.clip_norm:g}, {self.n_min} honest updaters, per-updater "
            f"variance {self.variance}, epsilon {_epsilon(self.rho, 1, self.delta):.4g} per "
            f"round at delta {self.delta:g}"
            + (f", budget {self.budget:g}" if self.budget is not None else ", no budget")
        )


def plan(
    *,
    noise_multiplier: float | None,
    epsilon_target: float | None,
    delta: float,
    clip_norm: float,
    budget: float | None,
    n_min: int,
    elements: int,
    make_mask: Callable[[float], MaskConfig],
) -> tuple[MaskConfig, DpPlan]:
    """The mask config (its noise bound included) and the DP plan of a coordinator.

    ``make_mask(noise)`` builds the mask config for a noise bound (the word size
    choice, ``auto`` or fixed, is the caller's). With ``epsilon_target`` the noise
    multiplier is the smallest whose round costs at most that epsilon, the
    rounding term of the sensitivity included.
    """
    if noise_multiplier is None:
        if epsilon_target is None:
            noise_multiplier = 1.0
        else:
            noise_multiplier = noise_multiplier_for(epsilon_target, delta)
    n_max = make_mask(0.0).n_max
    for _ in range(3):
        bound = aggregate_noise_bound(noise_multiplier, clip_norm, n_min, n_max, elements)
        mask = make_mask(bound)
        variance = updater_variance(noise_multiplier, clip_norm, mask.scale, n_min)
        rho = round_rho(variance, clip_norm, mask.scale, n_min, elements)
        if epsilon_target is None or _epsilon(rho, 1, delta) <= epsilon_target:
            break
        # Rounding adds sqrt(d)/2 encoded units to the sensitivity: raise the noise by as much.
        noise_multiplier *= 1 + math.sqrt(elements) / (2 * clip_norm * mask.scale) + 1e-9
    if variance >= 2**64:
        raise ConfigError(
            f"privacy: the per-updater noise variance ({variance:.3g} encoded units^2 at "
            f"{mask.word_bits}-bit words) does not fit the round parameters' 64 bits; use "
            "masking.word_bits = 32 (the noise, std noise_multiplier * clip_norm, dwarfs "
            "the 32-bit resolution) or raise masking.tolerance",
            field="masking.word_bits",
        )
    return mask, DpPlan(clip_norm, noise_multiplier, variance, n_min, elements, rho, delta, budget)


def privacy_status(
    dp: DpMode, delta: float, budget: float | None, metrics: Mapping[str, float]
) -> dict[str, Any]:
    """The privacy block of /status and ``maskfl-coordinator status``, from the config
    and the latest model's metrics (which carry the cumulative spend)."""
    if dp == "off":
        return {"dp": "off"}
    acc = Accountant(
        delta=delta,
        rho=float(metrics.get("dp_rho_total", 0.0)),
        rounds=int(metrics.get("dp_rounds", 0)),
    )
    rho_round = metrics.get("dp_rho_round")
    return {
        "dp": dp,
        "epsilon": acc.epsilon(),
        "delta": delta,
        "epsilon_round": None if rho_round is None else acc.epsilon(float(rho_round), 1),
        "rounds": acc.rounds,
        "budget": budget,
        "budget_spent": budget is not None
        and rho_round is not None
        and acc.would_exceed(float(rho_round), budget),
    }


def describe_status(status: Mapping[str, Any]) -> str:
    """One line for ``maskfl-coordinator status``."""
    if status.get("dp") == "off":
        return "differential privacy: off"
    budget = status.get("budget")
    tail = "no budget" if budget is None else f"budget {budget:g}"
    if status.get("budget_spent"):
        tail += ", spent: training stopped"
    return (
        f"differential privacy: epsilon {status['epsilon']:.4g} at delta {status['delta']:g} "
        f"after {status['rounds']} rounds ({tail})"
    )
