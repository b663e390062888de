"""``digits``: the 8x8 handwritten digits, split between devices. Needs nothing but numpy.

1797 samples, 64 features scaled to [0, 1], 10 classes, offline. The data ship inside
this package (``digits.npz``, 45 KB: pixel counts 0..16 as uint8 and the labels), so a
device installed with ``maskfl[agent]`` can train on them without scikit-learn or SciPy.
They are the copy of the test set of the UCI "Optical Recognition of Handwritten
Digits" data set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0) that scikit-learn's
``load_digits`` returns, value for value (a test compares them).

Every device computes the same seeded split: a held-out test set shared by all (for
evaluation and the fleet's global accuracy), and the rest partitioned IID or non-IID
(Dirichlet(alpha) per class) by device index.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import numpy as np
import numpy.typing as npt

from maskfl.agent.datasources._base import Dataset, DataSourceError, check_device
from maskfl.agent.datasources._partition import (
    dirichlet_partition,
    iid_partition,
    train_test_split,
)

__all__ = ["PARTITIONS", "DigitsSource", "load_digits"]

PARTITIONS = ("iid", "dirichlet")

_DATA_FILE = "digits.npz"
_SAMPLES, _FEATURES = 1797, 64


@cache
def load_digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """All 1797 digits: x float32 [1797, 64] in [0, 1], y int32 [1797]."""
    data = resources.files(__package__).joinpath(_DATA_FILE)
    try:
        with data.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
            raw_x, raw_y = archive["x"], archive["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataSourceError(
            f"cannot read the digits data that ship with maskfl ({data}): {exc}; reinstall maskfl",
            field="data.source",
        ) from exc
    if raw_x.shape != (_SAMPLES, _FEATURES) or raw_y.shape != (_SAMPLES,):
        raise DataSourceError(
            f"the digits data that ship with maskfl ({data}) have shapes {list(raw_x.shape)} "
            f"and {list(raw_y.shape)}, not [{_SAMPLES}, {_FEATURES}] and [{_SAMPLES}]; "
            "reinstall maskfl",
            field="data.source",
        )
    x = (raw_x / np.float64(16.0)).astype(np.float32)
    y = raw_y.astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


class DigitsSource:
    """The digits data set split between ``n_devices`` devices.

    Options (``[data] options`` in agent.toml): ``partition`` "iid" (default) or
    "dirichlet", ``alpha`` (Dirichlet concentration, default 0.5: smaller is more
    skewed), ``seed`` (the whole fleet must use the same one), ``test_fraction`` of the
    data held out for evaluation (default 0.2), ``min_samples`` per device (default 10).
    """

    def __init__(
        self,
        *,
        partition: str = "iid",
        alpha: float = 0.5,
        seed: int = 0,
        test_fraction: float = 0.2,
        min_samples: int = 10,
    ) -> None:
        if partition not in PARTITIONS:
            raise DataSourceError(
                f"partition {partition!r} is unknown; use one of {', '.join(PARTITIONS)}",
                field="data.options.partition",
            )
        if not alpha > 0:
            raise DataSourceError(f"alpha must be > 0, not {alpha}", field="data.options.alpha")
        if not 0 <= test_fraction < 1:
            raise DataSourceError(
                f"test_fraction must be in [0, 1), not {test_fraction}",
                field="data.options.test_fraction",
            )
        if min_samples < 1:
            raise DataSourceError(
                f"min_samples must be >= 1, not {min_samples}", field="data.options.min_samples"
            )
        self.partition = partition
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.min_samples = int(min_samples)

    def __repr__(self) -> str:
        return (
            f"DigitsSource(partition={self.partition!r}, alpha={self.alpha}, seed={self.seed}, "
            f"test_fraction={self.test_fraction}, min_samples={self.min_samples})"
        )

    def shares(self, n_devices: int) -> list[npt.NDArray[np.int64]]:
        """Indices (into :func:`load_digits`) of every device's training share."""
        _, y = load_digits()
        train, _ = train_test_split(len(y), self.test_fraction, self.seed)
        if n_devices * self.min_samples > len(train):
            raise DataSourceError(
                f"{len(train)} training digits cannot give {n_devices} devices "
                f"{self.min_samples} samples each; lower min_samples or use fewer devices",
                field="data.options.shards",
            )
        if self.partition == "iid":
            parts = iid_partition(len(train), n_devices, self.seed)
        else:
            parts = dirichlet_partition(
                y[train], n_devices, self.alpha, self.seed, min_size=self.min_samples
            )
        return [train[part] for part in parts]

    def load(self, device_index: int, n_devices: int) -> Dataset:
        check_device(device_index, n_devices)
        x, y = load_digits()
        mine = self.shares(n_devices)[device_index]
        _, test = train_test_split(len(y), self.test_fraction, self.seed)
        return Dataset(x_train=x[mine], y_train=y[mine], x_test=x[test], y_test=y[test])
