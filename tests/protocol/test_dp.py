"""The exact discrete Gaussian sampler: its law, the aggregate noise, the tail, clipping."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from maskfl.protocol.dp import (
    OsRandom,
    clip_l2,
    discrete_gaussian,
    discrete_gaussian_variance,
    noise_tail,
    sample_discrete_gaussian,
)
from maskfl.protocol.dp import _bernoulli_ratio_array as bernoulli_ratio


def _pmf(sigma2: float, reach: int) -> np.ndarray:
    y = np.arange(-reach, reach + 1, dtype=np.float64)
    w = np.exp(-(y**2) / (2 * sigma2))
    return w / w.sum()


def test_small_variance_matches_the_exact_law() -> None:
    """sigma^2 = 1/2: P(0) = 0.57..., the law a float sampler gets wrong in the tails."""
    n = 40_000
    draws = discrete_gaussian(Fraction(1, 2), n)
    assert draws.dtype == np.int64
    pmf = _pmf(0.5, 6)
    for k in range(-3, 4):
        p = pmf[k + 6]
        got = float(np.mean(draws == k))
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (k, got, p)


@pytest.mark.parametrize("sigma2", [Fraction(7, 3), Fraction(25), Fraction(401, 4)])
def test_histogram_passes_chi_square_against_the_exact_pmf(sigma2: Fraction) -> None:
    """The integer-only acceptance ratio (|y| q t - p)^2 / (2 p q t^2), with q > 1 and
    q = 1: the histogram out to 3 sigma (tails pooled) against the exact pmf. The
    99.99th percentile of chi-square with d degrees of freedom is below d + 8 sqrt(d) + 20,
    so a correct sampler fails about once in 10^4 runs; a wrong t, a dropped factor
    of q or a sign bias moves the statistic by hundreds."""
    n = 30_000
    draws = discrete_gaussian(sigma2, n)
    reach = int(3 * math.sqrt(float(sigma2))) + 1
    pmf = _pmf(float(sigma2), 60 * reach)
    centre = 60 * reach
    expected = [float(pmf[: centre - reach + 1].sum()) * n]  # y <= -reach
    observed = [int(np.sum(draws <= -reach))]
    for k in range(-reach + 1, reach):
        expected.append(float(pmf[centre + k]) * n)
        observed.append(int(np.sum(draws == k)))
    expected.append(float(pmf[centre + reach :].sum()) * n)  # y >= reach
    observed.append(int(np.sum(draws >= reach)))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    dof = len(expected) - 1
    assert chi2 <= dof + 8 * math.sqrt(dof) + 20, (chi2, dof)


def test_aggregate_noise_of_three_updaters_has_the_mechanisms_variance_and_tail() -> None:
    """Three updaters' shares summed, as the coordinator sees them: the empirical
    variance and tail match the exact law of the sum (convolution of the pmfs)."""
    share = Fraction(9, 2)
    n, updaters = 20_000, 3
    total = sum(discrete_gaussian(share, n) for _ in range(updaters))
    want_var = updaters * discrete_gaussian_variance(float(share))
    # Var of the sample variance of a near-Gaussian: 2 sigma^4 / n; 5 sigma tolerance.
    assert abs(float(total.var()) - want_var) <= 5 * want_var * math.sqrt(2 / n)
    reach = 40
    one = _pmf(float(share), reach)
    law = np.convolve(np.convolve(one, one), one)
    support = np.arange(-3 * reach, 3 * reach + 1)
    for k in (4, 7, 10):  # about 1.1, 1.9 and 2.7 standard deviations
        p = float(law[np.abs(support) >= k].sum())
        got = float(np.mean(np.abs(total) >= k))
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / n), (k, got, p)


def test_large_variance_is_exact_integers_with_the_right_scale() -> None:
    sigma2 = Fraction(10**12, 3)
    draws = discrete_gaussian(sigma2, 4_000)
    assert abs(float(draws.var()) / float(sigma2) - 1) <= 5 * math.sqrt(2 / 4_000)
    assert abs(float(draws.mean())) <= 5 * math.sqrt(float(sigma2) / 4_000)


def test_the_sampler_is_a_pure_function_of_its_uniform_integers() -> None:
    """Only rng.getrandbits feeds it (no float): a seeded generator repeats it exactly."""
    a = [sample_discrete_gaussian(Fraction(7, 3), random.Random(5)) for _ in range(3)]
    b = [sample_discrete_gaussian(Fraction(7, 3), random.Random(5)) for _ in range(3)]
    assert a == b


def test_the_default_source_is_the_os_and_cannot_be_replayed() -> None:
    rng = OsRandom()
    with pytest.raises(NotImplementedError):
        rng.getstate()
    a, b = OsRandom().getrandbits(128), OsRandom().getrandbits(128)
    assert a != b and 0 <= a < 2**128
    assert {rng.getrandbits(3) for _ in range(200)} == set(range(8))
    first, second = discrete_gaussian(Fraction(100), 64), discrete_gaussian(Fraction(100), 64)
    assert not np.array_equal(first, second)


def test_the_noise_tail_bounds_the_maximum_of_the_aggregate_noise() -> None:
    share, updaters, elements = Fraction(50), 3, 5_000
    total = sum(discrete_gaussian(share, elements) for _ in range(updaters))
    tail = noise_tail(float(share) * updaters, elements)
    assert float(np.abs(total).max()) <= tail
    # The bound is a subgaussian one: a few standard deviations, not a loose multiple.
    assert tail <= 9 * math.sqrt(float(share) * updaters)
    assert noise_tail(1.0, 10) < noise_tail(1.0, 10**6) and noise_tail(0.0, 10) == 0.0


def test_clipping_bounds_the_l2_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(1)
    big = rng.normal(size=10_000).astype(np.float32) * 3
    clipped, norm = clip_l2(big, 1.0)
    assert norm > 1.0 and float(np.linalg.norm(clipped.astype(np.float64))) <= 1.0
    assert float(np.linalg.norm(clipped.astype(np.float64))) > 1.0 - 1e-6
    small = big / (2 * norm)
    same, _ = clip_l2(small, 1.0)
    assert same is small


class _Scripted(random.Random):
    """A generator whose first getrandbits call returns a chosen word, then seeded bits."""

    def __init__(self, first: int) -> None:
        super().__init__(3)
        self.first: int | None = first

    def getrandbits(self, k: int) -> int:
        if self.first is not None:
            word, self.first = self.first, None
            return word
        return super().getrandbits(k)


def test_bernoulli_of_big_ratios_settles_a_64_bit_tie_exactly() -> None:
    """Bernoulli(a/b) compares U's first 64 bits with floor(a 2^64 / b); a prefix equal
    to it (probability 2^-64, forced here) is settled by drawing U's remaining bits:
    for a/b = 1/3, P(true | tie) = frac(2^64 / 3) = 1/3, not 0 or 1."""
    tie = (1 << 64) // 3
    wins = 0
    for seed in range(3_000):
        rng = _Scripted(tie)
        rng.seed(seed)
        rng.first = tie
        wins += int(bernoulli_ratio([1], [3], rng)[0])
    assert abs(wins / 3_000 - 1 / 3) <= 5 * math.sqrt(2 / 9 / 3_000)
    assert bool(bernoulli_ratio([1], [3], _Scripted(tie - 1))[0])
    assert not bool(bernoulli_ratio([1], [3], _Scripted(tie + 1))[0])
    assert bool(bernoulli_ratio([5], [5], _Scripted(2**64 - 1))[0])
    assert not bool(bernoulli_ratio([0], [5], _Scripted(0))[0])
