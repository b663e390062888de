"""Which TFLite interpreter runs the models: LiteRT first, ``tflite-runtime`` second.

Chosen once, at import, with one log line. TensorFlow itself is never imported.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Any

from maskfl.agent.training._errors import RuntimeUnavailableError

__all__ = ["RUNTIME", "make_interpreter"]

_log = logging.getLogger("maskfl.agent.training")

_CANDIDATES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
)


def _pick() -> tuple[Any, str | None]:
    for module, distribution in _CANDIDATES:
        try:
            interpreter = importlib.import_module(module).Interpreter
        except ImportError:
            continue
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            version = "(unknown version)"
        return interpreter, f"{distribution} {version}"
    return None, None


_Interpreter, RUNTIME = _pick()
"""``RUNTIME`` is ``"ai-edge-litert <version>"``, ``"tflite-runtime <version>"`` or None."""

if RUNTIME is None:
    _log.warning("no TFLite runtime: install ai-edge-litert (or tflite-runtime) to train")
else:
    _log.info("TFLite runtime: %s", RUNTIME)


def make_interpreter(model_content: bytes, *, num_threads: int | None) -> Any:
    """A new interpreter for ``model_content`` (its variables are its own)."""
    if _Interpreter is None:
        raise RuntimeUnavailableError(
            "no TFLite runtime is installed: pip install ai-edge-litert "
            "(or tflite-runtime with numpy<2 on Python 3.11)",
            field="runtime",
        )
    return _Interpreter(model_content=model_content, num_threads=num_threads)
