"""The npz source: the device's own files, validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.datasources import DataSourceError, load_dataset
from maskfl.agent.datasources.npz import NpzSource


def write(path: Path, n: int, *, features: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, features)), y=rng.integers(0, 10, n))


def test_train_files_are_joined_and_test_files_kept_apart(tmp_path: Path) -> None:
    write(tmp_path / "a.npz", 30, seed=1)
    write(tmp_path / "b.npz", 20, seed=2)
    write(tmp_path / "test.npz", 15, seed=3)
    data = NpzSource(path=tmp_path).load(0, 1)
    assert data.num_train == 50 and data.num_test == 15
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    with np.load(tmp_path / "test.npz") as f:
        np.testing.assert_array_equal(data.x_test, f["x"].astype(np.float32))


def test_without_test_files_a_fraction_is_held_out(tmp_path: Path) -> None:
    write(tmp_path / "data.npz", 100)
    data = load_dataset("npz", {"path": str(tmp_path), "test_fraction": 0.25, "seed": 4})
    assert data.num_train == 75 and data.num_test == 25
    both = np.concatenate([data.x_train, data.x_test])
    assert len(np.unique(both, axis=0)) == 100
    assert NpzSource(path=tmp_path, test_fraction=0).load(0, 1).num_test == 0


def test_shard_option_splits_rows_between_devices(tmp_path: Path) -> None:
    write(tmp_path / "data.npz", 40)
    parts = [NpzSource(path=tmp_path, test_fraction=0, shard=True).load(i, 3) for i in range(3)]
    assert [p.num_train for p in parts] == [14, 13, 13]
    assert NpzSource(path=tmp_path, test_fraction=0).load(2, 3).num_train == 40


def test_missing_directory_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist: create it") as info:
        NpzSource(path=tmp_path / "nope").load(0, 1)
    assert info.value.field == "data.options.path"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataSourceError, match="not a directory"):
        NpzSource(path=tmp_path / "file").load(0, 1)
    with pytest.raises(DataSourceError, match=r"no \.npz files"):
        NpzSource(path=tmp_path).load(0, 1)


def test_wrong_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", data=np.zeros((3, 4)), target=np.zeros(3, int))
    with pytest.raises(DataSourceError, match=r"a\.npz holds the arrays \['data', 'target'\]"):
        NpzSource(path=tmp_path).load(0, 1)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((5, 4)), np.zeros(4, int), "x has 5 samples but y 4"),
        (np.zeros((5, 4)), np.zeros(5), "integer label"),
        (np.zeros(5), np.zeros(5, int), "one row per sample"),
        (np.array([["a"] * 4] * 5), np.zeros(5, int), "must be numbers"),
        (np.full((5, 4), np.nan), np.zeros(5, int), "NaN"),
        (np.zeros((5, 4)), -np.ones(5, int), ">= 0"),
    ],
)
def test_bad_arrays(tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "a.npz", x=x, y=y)
    with pytest.raises(DataSourceError, match=message):
        NpzSource(path=tmp_path).load(0, 1)


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.array([{"evil": 1}] * 3, dtype=object), y=np.zeros(3, int))
    with pytest.raises(DataSourceError, match="not a readable"):
        NpzSource(path=tmp_path).load(0, 1)


def test_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "a.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataSourceError, match=r"a\.npz is not a readable \.npz file"):
        NpzSource(path=tmp_path).load(0, 1)


def test_files_with_different_sample_shapes(tmp_path: Path) -> None:
    write(tmp_path / "a.npz", 5, features=64)
    write(tmp_path / "b.npz", 5, features=63)
    with pytest.raises(
        DataSourceError, match=r"different shapes \(a\.npz: \[64\], b\.npz: \[63\]\)"
    ):
        NpzSource(path=tmp_path).load(0, 1)


def test_only_test_files(tmp_path: Path) -> None:
    write(tmp_path / "test.npz", 5)
    with pytest.raises(DataSourceError, match="no training samples"):
        NpzSource(path=tmp_path).load(0, 1)


def test_shape_mismatch_with_the_model(tmp_path: Path) -> None:
    write(tmp_path / "a.npz", 10, features=784)
    data = NpzSource(path=tmp_path).load(0, 1)
    with pytest.raises(DataSourceError, match=r"shape \[784\], the model takes \[64\]"):
        data.check_fits((64,), 10)


def test_a_single_array_is_not_an_archive(tmp_path: Path) -> None:
    with (tmp_path / "a.npz").open("wb") as f:
        np.save(f, np.zeros((3, 4)))
    with pytest.raises(DataSourceError, match="single array"):
        NpzSource(path=tmp_path).load(0, 1)
