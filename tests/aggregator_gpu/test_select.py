"""Backend selection: auto, forced, and a clear error when a forced GPU is missing."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from maskfl.aggregator_gpu import (
    BackendName,
    BackendUnavailableError,
    CupyBackend,
    NumpyBackend,
    select_backend,
)
from maskfl.protocol.errors import AggregationError, ConfigError


def gpu_reason() -> str | None:
    """None when this machine has a working CuPy GPU, else why not."""
    try:
        CupyBackend.open()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def test_forced_numpy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="maskfl.aggregator_gpu"):
        backend = select_backend("numpy")
    assert isinstance(backend, NumpyBackend)
    assert backend.name is BackendName.NUMPY
    lines = [r.getMessage() for r in caplog.records if r.name == "maskfl.aggregator_gpu"]
    assert len(lines) == 1
    assert "numpy" in lines[0]
    assert "forced" in lines[0]


def test_auto_picks_cupy_exactly_when_a_gpu_works(caplog: pytest.LogCaptureFixture) -> None:
    reason = gpu_reason()
    with caplog.at_level(logging.INFO, logger="maskfl.aggregator_gpu"):
        backend = select_backend(BackendName.AUTO)
    lines = [r.getMessage() for r in caplog.records if r.name == "maskfl.aggregator_gpu"]
    assert len(lines) == 1
    assert "auto" in lines[0]
    if reason is None:
        assert backend.name is BackendName.CUPY
    else:
        assert backend.name is BackendName.NUMPY
        assert reason in lines[0]  # the log says why the GPU was not used


def test_forced_cupy_without_a_gpu_is_a_clear_error() -> None:
    reason = gpu_reason()
    if reason is None:
        pytest.skip("this machine has a working GPU")
    with pytest.raises(BackendUnavailableError) as info:
        select_backend("cupy")
    assert isinstance(info.value, AggregationError)
    assert str(info.value) == reason


@pytest.mark.gpu
def test_forced_cupy_with_a_gpu() -> None:
    reason = gpu_reason()
    if reason is not None:
        pytest.skip(f"no usable GPU: {reason}")
    backend = select_backend("cupy")
    assert backend.name is BackendName.CUPY
    assert "device" in backend.description


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        select_backend("tpu")
    assert info.value.field == "backend"
    assert "auto" in str(info.value)


def test_importing_the_package_does_not_import_cupy() -> None:
    """CuPy is optional: only asking for the GPU backend imports it."""
    code = (
        "import sys, maskfl.aggregator_gpu as a; "
        "assert 'cupy' not in sys.modules, 'cupy imported eagerly'; "
        "a.select_backend('numpy'); "
        "assert 'cupy' not in sys.modules, 'numpy backend imported cupy'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
