"""Backends under test: numpy always, CuPy only where a GPU really works (skipped otherwise)."""

from __future__ import annotations

import pytest

from maskfl.aggregator_gpu import Backend, BackendUnavailableError, CupyBackend, NumpyBackend


def cupy_or_skip() -> CupyBackend:
    """The CuPy backend, or a skip that says why there is none (never a stand-in)."""
    try:
        return CupyBackend.open()
    except BackendUnavailableError as exc:
        pytest.skip(f"no usable GPU: {exc}")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn; every test that takes it runs on both."""
    if request.param == "numpy":
        return NumpyBackend()
    return cupy_or_skip()


@pytest.fixture
def gpu_backend() -> CupyBackend:
    return cupy_or_skip()
