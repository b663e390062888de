"""``npz``: the device's own data, a directory of ``.npz`` files holding ``x`` and ``y``.

Every ``*.npz`` file in the directory holds two arrays: ``x`` (one row per sample,
numbers) and ``y`` (one integer label per sample). Files whose name starts with
``test`` form the evaluation set; the others are concatenated into the training set.
Without test files, ``test_fraction`` of the training rows are held out (seeded).
Files are opened with ``allow_pickle=False``; every problem is a
:class:`DataSourceError` that names the file and the fix.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from maskfl.agent.datasources._base import Dataset, DataSourceError, check_device
from maskfl.agent.datasources._partition import train_test_split

__all__ = ["NpzSource"]

_FIELD = "data.options.path"


def _read(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    try:
        # our own handle: np.load leaks the one it opens when the zip is corrupt
        with path.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataSourceError(
                    f"{path} holds a single array, not an .npz archive of x and y "
                    "(write it with numpy.savez(path, x=..., y=...))",
                    field=_FIELD,
                )
            with loaded as archive:
                keys = sorted(archive.files)
                if "x" not in keys or "y" not in keys:
                    raise DataSourceError(
                        f"{path} holds the arrays {keys}; it needs one called 'x' (samples) "
                        "and one called 'y' (labels)",
                        field=_FIELD,
                    )
                x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataSourceError(f"{path} is not a readable .npz file: {exc}", field=_FIELD) from exc
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise DataSourceError(
            f"{path}: x must be numbers with one row per sample, not {x.dtype} of shape "
            f"{list(x.shape)}",
            field=_FIELD,
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataSourceError(
            f"{path}: y must be one integer label per sample, not {y.dtype} of shape "
            f"{list(y.shape)}",
            field=_FIELD,
        )
    if len(x) != len(y):
        raise DataSourceError(f"{path}: x has {len(x)} samples but y {len(y)}", field=_FIELD)
    if len(y) and int(y.min()) < 0:
        raise DataSourceError(f"{path}: labels must be >= 0", field=_FIELD)
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise DataSourceError(f"{path}: x holds NaN or infinity", field=_FIELD)
    return xf, y.astype(np.int32)


def _concat(
    parts: list[tuple[Path, npt.NDArray[np.float32], npt.NDArray[np.int32]]],
    sample_shape: tuple[int, ...],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    if not parts:
        return np.zeros((0, *sample_shape), np.float32), np.zeros(0, np.int32)
    return np.concatenate([x for _, x, _ in parts]), np.concatenate([y for _, _, y in parts])


class NpzSource:
    """Data that already live on the device.

    Options: ``path`` (the directory; required), ``test_fraction`` held out when there
    are no ``test*.npz`` files (default 0.2), ``seed`` of that split, and ``shard``
    (default false): when true, keep only rows ``device_index::n_devices`` of the
    training set, for simulations where devices share one directory.
    """

    def __init__(
        self, *, path: str | Path, test_fraction: float = 0.2, seed: int = 0, shard: bool = False
    ) -> None:
        if not 0 <= test_fraction < 1:
            raise DataSourceError(
                f"test_fraction must be in [0, 1), not {test_fraction}",
                field="data.options.test_fraction",
            )
        self.path = Path(path)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.shard = bool(shard)

    def __repr__(self) -> str:
        return f"NpzSource(path={str(self.path)!r}, test_fraction={self.test_fraction})"

    def load(self, device_index: int, n_devices: int) -> Dataset:
        check_device(device_index, n_devices)
        if not self.path.exists():
            raise DataSourceError(
                f"the data directory {self.path} does not exist: create it and put .npz "
                "files with arrays x and y in it",
                field=_FIELD,
            )
        if not self.path.is_dir():
            raise DataSourceError(f"{self.path} is not a directory of .npz files", field=_FIELD)
        files = sorted(self.path.glob("*.npz"))
        if not files:
            raise DataSourceError(
                f"no .npz files in {self.path}: add files with arrays x and y", field=_FIELD
            )
        loaded = [(f, *_read(f)) for f in files]
        shapes = {x.shape[1:] for _, x, _ in loaded}
        if len(shapes) > 1:
            detail = ", ".join(f"{f.name}: {list(x.shape[1:])}" for f, x, _ in loaded)
            raise DataSourceError(
                f"the files in {self.path} hold samples of different shapes ({detail})",
                field=_FIELD,
            )
        (sample_shape,) = shapes
        train_parts = [p for p in loaded if not p[0].name.startswith("test")]
        test_parts = [p for p in loaded if p[0].name.startswith("test")]
        x_train, y_train = _concat(train_parts, sample_shape)
        x_test, y_test = _concat(test_parts, sample_shape)
        if not test_parts and self.test_fraction > 0:
            keep, held = train_test_split(len(y_train), self.test_fraction, self.seed)
            x_test, y_test = x_train[held], y_train[held]
            x_train, y_train = x_train[keep], y_train[keep]
        if self.shard:
            x_train = x_train[device_index::n_devices]
            y_train = y_train[device_index::n_devices]
        if len(y_train) == 0:
            raise DataSourceError(
                f"no training samples in {self.path} (only test files, or empty arrays)",
                field=_FIELD,
            )
        return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
