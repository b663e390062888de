"""Splitting one data set between devices: IID, or non-IID by a Dirichlet draw per class.

Pure functions of the labels and a seed: every device computes the same partition and
keeps its own part, so no coordination is needed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["dirichlet_partition", "iid_partition", "train_test_split"]

Indices = npt.NDArray[np.int64]


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[Indices, Indices]:
    """Seeded split of ``range(n)`` into (train, test) index arrays, each sorted."""
    order = np.random.default_rng([seed, 0]).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def iid_partition(n: int, n_devices: int, seed: int) -> list[Indices]:
    """``range(n)`` shuffled and cut into ``n_devices`` parts of equal size (+-1)."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def dirichlet_partition(
    labels: npt.NDArray[np.integer], n_devices: int, alpha: float, seed: int, min_size: int = 1
) -> list[Indices]:
    """Non-IID parts: each class is spread over the devices in proportions drawn from
    Dirichlet(alpha); small alpha gives each device few classes, large alpha tends to
    IID. Devices left with fewer than ``min_size`` samples take random samples from the
    largest part, so every device can train (needs ``n >= n_devices * min_size``)."""
    rng = np.random.default_rng([seed, 2])
    parts: list[list[int]] = [[] for _ in range(n_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(chunk.tolist())
    for device in range(n_devices):
        while len(parts[device]) < min_size:
            donor = max(range(n_devices), key=lambda d: len(parts[d]))
            if len(parts[donor]) <= min_size:
                break
            parts[device].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
