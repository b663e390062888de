"""The shipped on-device-trainable models (package data) and their manifest.

``manifest.json`` lists each ``.tflite`` with its digest, size, parameter count, input
shape, classes and operator list, and the file of its initial flat weights
(``<name>.init.npy``, float32[M], exactly what the graph's ``get_flat`` returns before
any training: the coordinator has no TFLite runtime to read them out of the graph);
``models/build.py`` writes all of them (it needs TensorFlow, agents never do). The
model contract, and how to export your own model to it, is in the docstring of
``models/build.py`` and in ``models/README.md``.

>>> from maskfl.models import shipped_model
>>> shipped_model("mlp").num_params
4810
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from maskfl.models._export import graph_with_weights
from maskfl.protocol.errors import ConfigError

__all__ = [
    "CONTRACT_VERSION",
    "ShippedModel",
    "graph_with_weights",
    "model_path",
    "shipped_model",
    "shipped_models",
]

CONTRACT_VERSION = 1
"""Version of the signature contract the shipped models follow (see models/build.py)."""

_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShippedModel:
    """One manifest entry: a ``.tflite`` that ships inside this package."""

    name: str
    file: str
    description: str
    sha256: str
    size: int
    num_params: int
    input_shape: tuple[int, ...]
    num_classes: int
    learning_rate: float
    signatures: tuple[str, ...]
    ops: tuple[str, ...]
    initial_weights_file: str
    initial_weights_sha256: str

    @property
    def path(self) -> Path:
        """The file on disk (the package is installed as plain files, never zipped)."""
        return model_path(self.name)

    def read_bytes(self) -> bytes:
        """The model's flatbuffer."""
        return (resources.files(__name__) / self.file).read_bytes()

    @property
    def initial_weights_path(self) -> Path:
        """The ``.npy`` of the initial flat weights on disk."""
        return _package_file(self.initial_weights_file)

    def initial_weights(self) -> npt.NDArray[np.float32]:
        """The graph's flat weights before any training (float32[num_params]).

        Read from ``<name>.init.npy`` and checked against the manifest's SHA-256 and
        length, so the coordinator can start from them without a TFLite runtime.
        """
        data = (resources.files(__name__) / self.initial_weights_file).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.initial_weights_sha256:
            raise ConfigError(
                f"shipped file {self.initial_weights_file} does not match manifest.json; "
                "reinstall maskfl"
            )
        weights = np.load(io.BytesIO(data), allow_pickle=False)
        if weights.dtype != np.float32 or weights.shape != (self.num_params,):
            raise ConfigError(
                f"shipped file {self.initial_weights_file} holds {weights.dtype}{weights.shape}, "
                f"not float32[{self.num_params}]; reinstall maskfl"
            )
        flat: npt.NDArray[np.float32] = weights
        return flat


@cache
def shipped_models() -> tuple[ShippedModel, ...]:
    """Every model of the manifest, in manifest order."""
    raw = json.loads((resources.files(__name__) / _MANIFEST).read_text(encoding="utf-8"))
    return tuple(
        ShippedModel(
            name=entry["name"],
            file=entry["file"],
            description=entry["description"],
            sha256=entry["sha256"],
            size=int(entry["size"]),
            num_params=int(entry["num_params"]),
            input_shape=tuple(int(d) for d in entry["input_shape"]),
            num_classes=int(entry["num_classes"]),
            learning_rate=float(entry["learning_rate"]),
            signatures=tuple(entry["signatures"]),
            ops=tuple(entry["ops"]),
            initial_weights_file=entry["initial_weights"],
            initial_weights_sha256=entry["initial_weights_sha256"],
        )
        for entry in raw["models"]
    )


def shipped_model(name: str) -> ShippedModel:
    """The manifest entry called ``name``; :class:`ConfigError` names the choices if none."""
    for model in shipped_models():
        if model.name == name:
            return model
    names = ", ".join(m.name for m in shipped_models())
    raise ConfigError(
        f"no shipped model called {name!r}; choose one of: {names} (or give a .tflite path)",
        field="model",
    )


def model_path(name: str) -> Path:
    """Path of the shipped model ``name`` on disk."""
    return _package_file(shipped_model(name).file)


def _package_file(name: str) -> Path:
    with resources.as_file(resources.files(__name__) / name) as path:
        if not path.is_file():  # pragma: no cover - only a broken install gets here
            raise ConfigError(f"shipped model file {name} is missing; reinstall maskfl")
        return path
