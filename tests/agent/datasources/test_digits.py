"""The digits source and the plugin loader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_load_digits

from maskfl.agent.datasources import (
    DataSource,
    DataSourceError,
    available_datasources,
    get_datasource,
    load_dataset,
)
from maskfl.agent.datasources.digits import DigitsSource, load_digits
from maskfl.agent.datasources.npz import NpzSource


def test_packaged_digits_equal_sklearns() -> None:
    x, y = load_digits()
    reference = sklearn_load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(x, (reference.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, reference.target)
    assert x.min() >= 0 and x.max() == 1


def test_digits_load_where_scikit_learn_cannot_be_imported() -> None:
    """A device installed with maskfl[agent] has no scikit-learn: digits must not need it."""
    code = (
        "import sys\n"
        "for name in ('sklearn', 'scipy'): sys.modules[name] = None  # import raises\n"
        "from maskfl.agent.datasources import load_dataset\n"
        "d = load_dataset('digits', {'shard': 1, 'shards': 4})\n"
        "print(d.num_train, d.num_test)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    train, test = map(int, done.stdout.split())
    assert test == 359 and 300 < train < 420  # 20 % of 1797 held out, a quarter of the rest


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_devices_get_disjoint_shares_and_the_same_test_set(partition: str) -> None:
    source = DigitsSource(partition=partition, alpha=0.3, seed=7)
    n = 6
    sets = [source.load(i, n) for i in range(n)]
    x, _ = load_digits()
    rows = [{r.tobytes() for r in d.x_train} for d in sets]  # duplicates among digits are rare
    test_rows = {r.tobytes() for r in sets[0].x_test}
    assert sum(d.num_train for d in sets) + sets[0].num_test == len(x)
    for i, d in enumerate(sets):
        assert np.array_equal(d.x_test, sets[0].x_test)
        assert np.array_equal(d.y_test, sets[0].y_test)
        assert d.num_train >= 10
        assert len(rows[i] & test_rows) <= 1
    shares = source.shares(n)
    joined = np.concatenate(shares)
    assert len(np.unique(joined)) == len(joined)


def test_same_options_same_data_on_every_call() -> None:
    a = DigitsSource(partition="dirichlet", seed=3).load(1, 4)
    b = DigitsSource(partition="dirichlet", seed=3).load(1, 4)
    c = DigitsSource(partition="dirichlet", seed=4).load(1, 4)
    assert np.array_equal(a.y_train, b.y_train) and np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_test, c.x_test)


def test_non_iid_shares_are_skewed() -> None:
    iid = [DigitsSource(seed=0).load(i, 5).label_counts(10) for i in range(5)]
    skewed = [
        DigitsSource(partition="dirichlet", alpha=0.1).load(i, 5).label_counts(10) for i in range(5)
    ]
    top_iid = np.mean([c.max() / c.sum() for c in iid])
    top_skewed = np.mean([c.max() / c.sum() for c in skewed])
    assert top_iid < 0.2
    assert top_skewed > 0.4


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"partition": "zipf"}, "data.options.partition"),
        ({"alpha": 0}, "data.options.alpha"),
        ({"test_fraction": 1.0}, "data.options.test_fraction"),
        ({"min_samples": 0}, "data.options.min_samples"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(DataSourceError) as info:
        get_datasource("digits", options)
    assert info.value.field == field


def test_bad_device_index_or_too_many_devices() -> None:
    with pytest.raises(DataSourceError, match="device index 4 of 4"):
        DigitsSource().load(4, 4)
    with pytest.raises(DataSourceError, match="fewer devices"):
        DigitsSource(min_samples=10).load(0, 200)


def test_loader_finds_the_shipped_plugins() -> None:
    assert {"digits", "npz"} <= set(available_datasources())
    assert isinstance(get_datasource("digits"), DigitsSource)
    assert isinstance(get_datasource("npz", {"path": "/nonexistent"}), NpzSource)
    assert isinstance(get_datasource("digits"), DataSource)


def test_loader_errors_are_clear() -> None:
    with pytest.raises(
        DataSourceError, match=r"no data source called 'mnist'; installed: .*digits"
    ):
        get_datasource("mnist")
    with pytest.raises(DataSourceError, match=r"has no option.*colour.*its options: partition"):
        get_datasource("digits", {"colour": "red"})
    with pytest.raises(DataSourceError, match="path"):
        get_datasource("npz", {})


def test_load_dataset_reads_shard_and_shards_from_the_options() -> None:
    got = load_dataset("digits", {"shard": 2, "shards": 5, "seed": 1})
    want = DigitsSource(seed=1).load(2, 5)
    assert np.array_equal(got.y_train, want.y_train)
    whole = load_dataset("digits")
    assert whole.num_train + whole.num_test == 1797
    with pytest.raises(DataSourceError, match="integers"):
        load_dataset("digits", {"shard": "1"})


def test_check_fits() -> None:
    data = DigitsSource().load(0, 2)
    data.check_fits((64,), 10)
    data.check_fits((8, 8, 1), 10)
    with pytest.raises(DataSourceError, match=r"shape \[64\], the model takes \[28, 28\]"):
        data.check_fits((28, 28), 10)
    with pytest.raises(DataSourceError, match="labels go up to 9"):
        data.check_fits((64,), 5)
