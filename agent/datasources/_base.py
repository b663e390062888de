"""What a data source is: the protocol, the data set it returns, its error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import ConfigError

__all__ = ["DataSource", "DataSourceError", "Dataset"]


class DataSourceError(ConfigError):
    """The data cannot be loaded or do not fit the model; the message says what to fix."""


@dataclass(frozen=True)
class Dataset:
    """One device's training data and the evaluation data.

    ``x_*`` are float32 with one row per sample, ``y_*`` int32 class indices. The test
    split may be empty (a source without held-out data).
    """

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int32]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int32]

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def label_counts(self, num_classes: int) -> npt.NDArray[np.int64]:
        """How many training samples of each class (to see the non-IID skew)."""
        return np.bincount(self.y_train, minlength=num_classes).astype(np.int64)

    def check_fits(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Raise :class:`DataSourceError` unless a model with this input shape (one
        sample) and number of classes can train on these data. Samples with the same
        number of values (64 vs 8x8x1) fit: the trainer reshapes them."""
        want = int(np.prod(input_shape))
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if len(y) == 0:
                continue
            if int(np.prod(x.shape[1:])) != want:
                raise DataSourceError(
                    f"{split} samples have shape {list(x.shape[1:])}, the model takes "
                    f"{list(input_shape)}: use data made for this model",
                    field="data",
                )
            if int(y.max()) >= num_classes:
                raise DataSourceError(
                    f"{split} labels go up to {int(y.max())} but the model has "
                    f"{num_classes} classes (0..{num_classes - 1})",
                    field="data",
                )


@runtime_checkable
class DataSource(Protocol):
    """A data-source plugin (entry-point group ``maskfl.datasources``).

    The class is built with the options of ``[data] options`` in agent.toml as keyword
    arguments; :meth:`load` returns device ``device_index``'s share of the data when
    ``n_devices`` devices share one data set (sources with data of their own, such as
    ``npz``, may ignore both). Errors are :class:`DataSourceError`.
    """

    def load(self, device_index: int, n_devices: int) -> Dataset: ...


def check_device(device_index: int, n_devices: int) -> None:
    """Raise :class:`DataSourceError` unless ``0 <= device_index < n_devices``."""
    if n_devices < 1 or not 0 <= device_index < n_devices:
        raise DataSourceError(
            f"device index {device_index} of {n_devices} devices: need 0 <= index < devices",
            field="data.options.shard",
        )
