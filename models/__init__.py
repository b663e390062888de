"""The shipped on-device-trainable models (package data) and their manifest.

``manifest.json`` lists each ``.tflite`` with its digest, size, parameter count, input
shape, classes and operator list; ``models/build.py`` writes both (it needs TensorFlow,
agents never do). The model contract, and how to export your own model to it, is in the
docstring of ``models/build.py`` and in ``models/README.md``.

>>> from maskfl.models import shipped_model
>>> shipped_model("mlp").num_params
4810
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from maskfl.protocol.errors import ConfigError

__all__ = [
    "CONTRACT_VERSION",
    "ShippedModel",
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

    @property
    def path(self) -> Path:
        """The file on disk (the package is installed as plain files, never zipped)."""
        return model_path(self.name)

    def read_bytes(self) -> bytes:
        """The model's flatbuffer."""
        return (resources.files(__name__) / self.file).read_bytes()


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
    entry = shipped_model(name)
    with resources.as_file(resources.files(__name__) / entry.file) as path:
        if not path.is_file():  # pragma: no cover - only a broken install gets here
            raise ConfigError(f"shipped model file {entry.file} is missing; reinstall maskfl")
        return path
