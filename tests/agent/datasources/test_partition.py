"""Partitions are disjoint, cover the data, are deterministic, and Dirichlet skews labels."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.agent.datasources._partition import (
    dirichlet_partition,
    iid_partition,
    train_test_split,
)


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "parts overlap or miss samples"
    assert np.array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 500), test_fraction=st.floats(0, 0.9), seed=st.integers(0, 2**32))
def test_train_test_split(n: int, test_fraction: float, seed: int) -> None:
    train, test = train_test_split(n, test_fraction, seed)
    assert_partition([train, test], n)
    assert len(test) == round(n * test_fraction)
    again = train_test_split(n, test_fraction, seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), devices=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_iid_partition(n: int, devices: int, seed: int) -> None:
    parts = iid_partition(n, devices, seed)
    assert len(parts) == devices
    assert_partition(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(n, devices, seed), strict=True)
    )


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=40, max_size=400),
    devices=st.integers(1, 8),
    alpha=st.floats(0.05, 100),
    seed=st.integers(0, 2**32),
    min_size=st.integers(1, 5),
)
def test_dirichlet_partition(
    labels: list[int], devices: int, alpha: float, seed: int, min_size: int
) -> None:
    y = np.array(labels)
    parts = dirichlet_partition(y, devices, alpha, seed, min_size=min_size)
    assert len(parts) == devices
    assert_partition(parts, len(y))
    assert min(len(p) for p in parts) >= min_size  # 40 >= 8 * 5: always feasible
    again = dirichlet_partition(y, devices, alpha, seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def mean_label_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label mix and the whole's."""
    overall = np.bincount(y, minlength=10) / len(y)
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - overall).sum() for p in parts]
        )
    )


def test_dirichlet_skew_is_measurable_and_shrinks_with_alpha() -> None:
    y = np.random.default_rng(0).integers(0, 10, 2000)
    iid = mean_label_skew(y, iid_partition(len(y), 10, seed=3))
    skewed = mean_label_skew(y, dirichlet_partition(y, 10, 0.1, seed=3))
    mild = mean_label_skew(y, dirichlet_partition(y, 10, 100.0, seed=3))
    assert iid < 0.15
    assert skewed > 0.5
    assert mild < 0.2
    assert skewed > 3 * iid


def test_different_seeds_give_different_partitions() -> None:
    y = np.random.default_rng(0).integers(0, 10, 300)
    a = dirichlet_partition(y, 5, 0.5, seed=1)
    b = dirichlet_partition(y, 5, 0.5, seed=2)
    assert any(not np.array_equal(p, q) for p, q in zip(a, b, strict=True))
