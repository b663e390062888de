"""Errors of on-device training; all are configuration problems the operator fixes."""

from __future__ import annotations

from maskfl.protocol.errors import ConfigError

__all__ = ["ModelContractError", "RuntimeUnavailableError", "TrainingError"]


class RuntimeUnavailableError(ConfigError):
    """Neither LiteRT (``ai-edge-litert``) nor ``tflite-runtime`` can be imported."""


class ModelContractError(ConfigError):
    """The model cannot be loaded or does not follow the signature contract.

    The message names what is missing or wrong (a signature, an input, a shape) and
    points to ``models/build.py``, which documents the contract.
    """


class TrainingError(ConfigError):
    """Training cannot run or went wrong: data that do not fit the model, bad
    hyperparameters, or weights that became non-finite (lower the learning rate)."""
