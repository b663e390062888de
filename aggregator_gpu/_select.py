"""Choosing the backend: once, at start-up, with one log line saying which and why."""

from __future__ import annotations

import logging

from maskfl.aggregator_gpu._base import Backend, BackendName, BackendUnavailableError
from maskfl.aggregator_gpu._cupy import CupyBackend
from maskfl.aggregator_gpu._numpy import NumpyBackend
from maskfl.protocol.errors import ConfigError

log = logging.getLogger("maskfl.aggregator_gpu")


def select_backend(name: str | BackendName = BackendName.AUTO) -> Backend:
    """The aggregation backend called ``name``.

    ``auto``: CuPy when it imports, finds a device and passes its self-test,
    else numpy. ``numpy``: always works. ``cupy``: raises
    :class:`BackendUnavailableError` (an ``AggregationError``) saying why when
    there is no usable GPU, rather than falling back behind the operator's back.
    An unknown name is a :class:`ConfigError`.
    """
    try:
        choice = BackendName(name)
    except ValueError as exc:
        valid = ", ".join(member.value for member in BackendName)
        raise ConfigError(
            f"unknown aggregation backend {name!r}: use one of {valid}", field="backend"
        ) from exc
    backend: Backend
    match choice:
        case BackendName.NUMPY:
            backend = NumpyBackend()
            why = "forced by configuration"
        case BackendName.CUPY:
            backend = CupyBackend.open()
            why = "forced by configuration"
        case BackendName.AUTO:
            try:
                backend = CupyBackend.open()
                why = "auto: a CUDA device is available"
            except BackendUnavailableError as exc:
                backend = NumpyBackend()
                why = f"auto: {exc}"
    log.info("aggregation backend: %s, %s (%s)", backend.name, backend.description, why)
    return backend
