"""Distributed differential privacy: the exact noise sampler, L2 clipping and the noise tail.

The mechanism is the *distributed discrete Gaussian* (Kairouz, Liu, Steinke,
ICML 2021): every updater adds to its encoded integer vector an independent
discrete Gaussian ``N_Z(0, sigma_i^2)`` per element, before masking, with
``sigma_i^2 = sigma^2 / n_min`` so that the noise in the sum of at least
``n_min`` honest updaters has variance at least ``sigma^2``. The coordinator
only ever sees the noisy sum. docs/protocol.md §7.9 is the normative text.

The sampler is exact: Canonne, Kamath, Steinke, "The Discrete Gaussian for
Differential Privacy" (NeurIPS 2020), Algorithms 1-3, in integer arithmetic
only (no float is ever rounded into a sample; rationals are kept as numerator
and denominator, without :class:`fractions.Fraction`'s gcd on every step), with
uniform integers by rejection on bits from the operating system's CSPRNG
(``os.urandom``, read in blocks by :class:`OsRandom`). A float sampler would leak
through its rounding pattern (Mironov, CCS 2012); this one has none to leak.
"""

from __future__ import annotations

import math
import os
import random
import secrets
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import ConfigError
from maskfl.protocol.masking import NO_EVALUATION, EvalCounts, Words, mask_update
from maskfl.protocol.messages import RoundParams

__all__ = [
    "TAIL_PROBABILITY",
    "OsRandom",
    "aggregate_noise_bound",
    "clip_l2",
    "discrete_gaussian",
    "discrete_gaussian_variance",
    "masked_update",
    "noise_tail",
    "sample_discrete_gaussian",
    "updater_variance",
]

TAIL_PROBABILITY: Final = 2.0**-40
"""The probability, per round, that the aggregate noise of some element exceeds
:func:`noise_tail` (and the sum could wrap). Stated in docs/protocol.md §7.9."""

_SYSTEM_RANDOM: Final = secrets.SystemRandom()
_URANDOM_BUFFER: Final = 1 << 16


class OsRandom(random.Random):
    """Uniform integers from ``os.urandom`` (the OS CSPRNG), read 64 KiB at a time.

    :class:`secrets.SystemRandom` makes one system call per draw, about two
    thirds of the sampler's time; this reads the same bytes in blocks. One
    instance per thread (no lock); never seeded, never stored.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer = b""
        self._at = 0

    def seed(self, *args: object, **kwargs: object) -> None:
        return None  # the OS seeds it; random.Random.__init__ calls this

    def getstate(self) -> tuple[Any, ...]:
        raise NotImplementedError("an OS-seeded generator has no state to save")

    def setstate(self, state: tuple[Any, ...]) -> None:
        raise NotImplementedError("an OS-seeded generator has no state to restore")

    def getrandbits(self, k: int) -> int:
        if k == 0:
            return 0
        need = (k + 7) // 8
        if self._at + need > len(self._buffer):
            self._buffer = os.urandom(max(_URANDOM_BUFFER, need))
            self._at = 0
        value = int.from_bytes(self._buffer[self._at : self._at + need], "little")
        self._at += need
        return value >> (need * 8 - k)

    def random(self) -> float:
        return (self.getrandbits(53)) * 2.0**-53


def _below(n: int, rng: random.Random) -> int:
    """A uniform integer in [0, n), n >= 1: ``n.bit_length()`` random bits, redrawn
    while >= n (exact; fewer than two draws on average)."""
    bits = n.bit_length()
    draw = rng.getrandbits(bits)
    while draw >= n:
        draw = rng.getrandbits(bits)
    return draw


def sample_discrete_gaussian(sigma2: Fraction, rng: random.Random = _SYSTEM_RANDOM) -> int:
    """One exact draw of N_Z(0, sigma2): P(y) proportional to exp(-y^2 / (2 sigma2))
    (:func:`discrete_gaussian` of size 1)."""
    return int(discrete_gaussian(sigma2, 1, rng)[0])


def discrete_gaussian(
    sigma2: Fraction, size: int, rng: random.Random | None = None
) -> npt.NDArray[np.int64]:
    """``size`` independent exact draws of N_Z(0, sigma2), as int64, from a fresh
    :class:`OsRandom` unless ``rng`` is given (tests pass a seeded one).

    ``sigma2`` must be at most 2^100 (any larger would not fit a 64-bit word's
    aggregate anyway); each draw is then far inside int64.
    """
    if sigma2 < 0 or sigma2 > 2**100:
        raise ConfigError(f"noise variance {float(sigma2):.3g} out of range", field="sigma2")
    source = OsRandom() if rng is None else rng
    if sigma2 == 0:
        return np.zeros(size, dtype=np.int64)
    out = np.empty(size, dtype=np.int64)
    done = 0
    while done < size:
        batch = _gaussian_batch(sigma2, size - done, source)
        out[done : done + batch.size] = batch[: size - done]
        done += batch.size
    return out


# The vectorised sampler: the same CKS Algorithms 1-3, run on arrays. Every step is
# the scalar one above (same Bernoulli trials, same order of decisions per element),
# with uniform integers below n drawn as uint64 words cut to n.bit_length() bits and
# redrawn while >= n, and Bernoulli(a/b) for big a, b decided on the first 64 bits of
# the uniform U (exactly: only U's 64-bit prefix equal to floor(a 2^64 / b) leaves it
# open, and then the remaining bits are drawn exactly). No float touches a sample.

_U64: Final = np.uint64


def _words(count: int, rng: random.Random) -> npt.NDArray[np.uint64]:
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    if isinstance(rng, OsRandom):  # the same OS bytes, without the round trip through an int
        raw = os.urandom(8 * count)
    else:
        raw = rng.getrandbits(64 * count).to_bytes(8 * count, "little")
    return np.frombuffer(raw, dtype=np.uint64).copy()


def _below_array(n: int, count: int, rng: random.Random) -> npt.NDArray[np.uint64]:
    """``count`` uniform integers in [0, n), 1 <= n < 2^63."""
    shift = _U64(64 - n.bit_length())
    draws = _words(count, rng) >> shift
    bad = np.flatnonzero(draws >= n)
    while bad.size:
        draws[bad] = _words(bad.size, rng) >> shift
        bad = bad[draws[bad] >= n]
    return draws


def _exp1_array(num: npt.NDArray[np.uint64], t: int, rng: random.Random) -> npt.NDArray[np.bool_]:
    """Bernoulli(exp(-num/t)) per element, 0 <= num <= t < 2^62 (CKS Algorithm 1)."""
    k = 1
    active = np.arange(num.size)
    result = np.zeros(num.size, dtype=np.bool_)
    while active.size:
        if t * k >= 2**63:  # reached with probability < 1/2^12!: finish element by element
            for i in active.tolist():
                kk = k
                while _below(t * kk, rng) < int(num[i]):
                    kk += 1
                result[i] = kk % 2 == 1
            break
        go_on = _below_array(t * k, active.size, rng) < num[active]
        stopped = active[~go_on]
        result[stopped] = k % 2 == 1
        active = active[go_on]
        k += 1
    return result


def _geometric_e_array(count: int, rng: random.Random) -> npt.NDArray[np.int64]:
    """Successes of Bernoulli(exp(-1)) before the first failure: P(G >= m) = exp(-m)."""
    g = np.zeros(count, dtype=np.int64)
    active = np.arange(count)
    ones = np.ones(count, dtype=np.uint64)
    while active.size:
        hit = _exp1_array(ones[: active.size], 1, rng)
        g[active[hit]] += 1
        active = active[hit]
    return g


def _laplace_array(t: int, count: int, rng: random.Random) -> npt.NDArray[np.int64]:
    """About ``count`` draws of P(y) proportional to exp(-|y|/t) (CKS Algorithm 2)."""
    u = _below_array(t, count, rng)
    u = u[_exp1_array(u, t, rng)]
    magnitude = _geometric_e_array(u.size, rng) * t + u.astype(np.int64)
    negative = _below_array(2, u.size, rng) == 1
    keep = ~(negative & (magnitude == 0))
    signed: npt.NDArray[np.int64] = np.where(negative, -magnitude, magnitude)
    kept: npt.NDArray[np.int64] = signed[keep]
    return kept


def _bernoulli_ratio_array(a: list[int], b: list[int], rng: random.Random) -> npt.NDArray[np.bool_]:
    """Bernoulli(a_i / b_i) per element, 0 <= a_i <= b_i, any size of integers."""
    prefix = [(x << 64) // y for x, y in zip(a, b, strict=True)]
    certain = np.array([c >= 2**64 for c in prefix], dtype=np.bool_)
    bounded = np.array([min(c, 2**64 - 1) for c in prefix], dtype=np.uint64)
    r = _words(len(a), rng)
    result = certain | (r < bounded)
    for i in np.flatnonzero(~certain & (r == bounded)).tolist():
        # U = (r + V) / 2^64 with V uniform in [0, 1): U < a/b iff V < (a 2^64 - r b) / b.
        rest = (a[i] << 64) - prefix[i] * b[i]
        result[i] = _below(b[i], rng) < rest
    return result


def _exp_ratio_array(a: list[int], b: list[int], rng: random.Random) -> npt.NDArray[np.bool_]:
    """Bernoulli(exp(-a_i/b_i)) per element: exp(-m) as P(G >= m) for m = floor(a/b),
    times Bernoulli(exp(-f)) for the fraction f by CKS Algorithm 1."""
    m = np.array([x // y for x, y in zip(a, b, strict=True)], dtype=np.int64)
    frac = [x - int(q) * y for x, y, q in zip(a, b, m.tolist(), strict=True)]
    result = _geometric_e_array(len(a), rng) >= m
    active = np.flatnonzero(result)
    k = 1
    parity = np.zeros(len(a), dtype=np.bool_)
    while active.size:
        go_on = _bernoulli_ratio_array(
            [frac[i] for i in active.tolist()], [b[i] * k for i in active.tolist()], rng
        )
        parity[active[~go_on]] = k % 2 == 1
        active = active[go_on]
        k += 1
    return result & parity


def _gaussian_batch(sigma2: Fraction, count: int, rng: random.Random) -> npt.NDArray[np.int64]:
    """Up to about ``count`` draws of N_Z(0, sigma2) (CKS Algorithm 3, on arrays): a
    discrete Laplace proposal with ``t = floor(sigma) + 1``, accepted with probability
    ``exp(-(|y| - sigma2/t)^2 / (2 sigma2))``; with ``sigma2 = p/q`` that exponent is
    the integer ratio ``(|y| q t - p)^2 / (2 p q t^2)``."""
    p, q = sigma2.numerator, sigma2.denominator
    t = math.isqrt(p // q) + 1
    den = 2 * p * q * t * t
    # About 0.44-0.48 of the uniform u's become accepted draws (measured for v from
    # 1/2 to 2^100): 9/4 per wanted draw is one pass nearly always, little waste.
    y = _laplace_array(t, count * 9 // 4 + 64, rng)
    ys = y.tolist()
    accept = _exp_ratio_array([(abs(v) * q * t - p) ** 2 for v in ys], [den] * len(ys), rng)
    return y[accept]


def discrete_gaussian_variance(sigma2: float) -> float:
    """The exact variance of N_Z(0, sigma2) (a little below sigma2 for small sigma2),
    summed over its support out to 40 standard deviations."""
    if sigma2 <= 0:
        return 0.0
    reach = int(40 * math.sqrt(sigma2)) + 2
    y = np.arange(-reach, reach + 1, dtype=np.float64)
    w = np.exp(-(y**2) / (2 * sigma2))
    return float((w * y**2).sum() / w.sum())


def noise_tail(sigma2_total: float, elements: int, probability: float = TAIL_PROBABILITY) -> float:
    """A bound ``T`` with P(max over ``elements`` of |aggregate noise| > T) <= ``probability``.

    The aggregate noise of one element is a sum of independent discrete Gaussians
    of total variance ``sigma2_total``; each is sigma_i^2-subgaussian (CKS
    Proposition 18), so the sum is ``sigma2_total``-subgaussian and
    ``P(|X| > T) <= 2 exp(-T^2 / (2 sigma2_total))``; a union bound over the
    elements gives ``T = sqrt(2 sigma2_total ln(2 elements / probability))``.
    """
    if sigma2_total <= 0:
        return 0.0
    return math.sqrt(2 * sigma2_total * math.log(2 * max(elements, 1) / probability))


def clip_l2(
    delta: npt.NDArray[np.float32], clip_norm: float
) -> tuple[npt.NDArray[np.float32], float]:
    """``delta`` scaled down to L2 norm at most ``clip_norm``, and its norm before.

    The norm is computed in float64; the scale ``clip_norm / norm`` is rounded
    down by one part in 2^40 so float32 rounding cannot push the result past the
    clip norm.
    """
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm <= clip_norm or norm == 0.0:
        return delta, norm
    scale = clip_norm / norm * (1.0 - 2.0**-40)
    clipped = (delta.astype(np.float64) * scale).astype(np.float32)
    # float32 rounding can add up to 2^-24 relative per element: shrink once more if needed.
    again = float(np.linalg.norm(clipped.astype(np.float64)))
    if again > clip_norm:
        clipped = (clipped.astype(np.float64) * (clip_norm / again * (1.0 - 2.0**-20))).astype(
            np.float32
        )
    return clipped, norm


def masked_update(
    params: RoundParams,
    delta: npt.NDArray[np.float32],
    weight: float,
    seed: bytes | Sequence[bytes],
    evaluation: EvalCounts = NO_EVALUATION,
) -> Words:
    """What an updater sends: :func:`~maskfl.protocol.masking.mask_update`, and with DP
    (``params.noise_variance > 0``) the delta first clipped to L2 norm
    ``params.clip_norm`` and this updater's exact ``N_Z(0, v)`` share added to each
    encoded model value before the mask (docs/protocol.md §7.9). With DP the weight
    is 1 whatever ``weight`` says: the mean is unweighted, so the noise is divided by
    the number of updates (not by a sum of sample fractions that may be far below it)
    and the weight word tells nothing about sample counts."""
    if not params.noise_variance:
        return mask_update(delta, weight, seed, params.mask, evaluation=evaluation)
    clipped, _ = clip_l2(delta, params.clip_norm)
    noise = discrete_gaussian(Fraction(params.noise_variance), delta.size)
    return mask_update(clipped, 1.0, seed, params.mask, evaluation=evaluation, noise=noise)


def updater_variance(noise_multiplier: float, clip_norm: float, scale: int, n_min: int) -> int:
    """The per-updater integer variance ``v = ceil((z C S)^2 / n_min)``: the sum of
    ``n_min`` honest shares has variance at least ``(z C S)^2``."""
    sigma = noise_multiplier * clip_norm * scale
    return max(1, math.ceil(sigma * sigma / n_min))


def aggregate_noise_bound(
    noise_multiplier: float, clip_norm: float, n_min: int, n_max: int, elements: int
) -> float:
    """``T`` for :class:`MaskConfig`: the aggregate noise of up to ``n_max`` updaters,
    each of variance ``(z C)^2 / n_min`` in delta units, bounded at :data:`TAIL_PROBABILITY`."""
    sigma = noise_multiplier * clip_norm
    # The per-updater variance is rounded up to an integer: at most 1 more encoded unit^2,
    # which the 1 % margin covers for any scale at which DP is meaningful.
    return 1.01 * noise_tail(sigma * sigma * n_max / n_min, elements, TAIL_PROBABILITY)
