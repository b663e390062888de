"""The signature contract a trainable model must follow, checked when it is loaded.

The contract itself is documented in ``models/build.py``: ``train(x, y) -> loss``,
``infer(x) -> logits``, ``get_flat() -> flat``, ``set_flat(flat) -> ok``, optionally
``reset_opt() -> ok`` and ``set_lr(lr) -> ok``; float32 ``x`` with a dynamic batch,
int32 ``y``, one float32 weight vector of the same length out of ``get_flat`` and into
``set_flat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from maskfl.agent.training._errors import ModelContractError

__all__ = ["OPTIONAL", "REQUIRED", "ModelSpec", "check_contract"]

REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (("x", "y"), ("loss",)),
    "infer": (("x",), ("logits",)),
    "get_flat": ((), ("flat",)),
    "set_flat": (("flat",), ("ok",)),
}
"""Signature name -> (input names, output names) every model must export."""

OPTIONAL: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "reset_opt": ((), ("ok",)),
    "set_lr": (("lr",), ("ok",)),
}
"""Signatures used when present: zero the optimiser state, set the learning rate."""

_SEE = "see models/build.py for the model contract"


@dataclass(frozen=True)
class ModelSpec:
    """What the agent learned about a model when it loaded it."""

    name: str
    sha256: str
    input_shape: tuple[int, ...]
    """Shape of one sample (without the batch dimension)."""
    num_classes: int
    num_params: int
    """Length of the flat weight vector (what a round averages and masks)."""
    signatures: tuple[str, ...]

    @property
    def has_reset_opt(self) -> bool:
        return "reset_opt" in self.signatures

    @property
    def has_set_lr(self) -> bool:
        return "set_lr" in self.signatures


def _details(runner: Any, which: str) -> dict[str, dict[str, Any]]:
    getter = runner.get_input_details if which == "inputs" else runner.get_output_details
    return dict(getter())


def _shape(detail: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))


def check_contract(interpreter: Any, *, name: str, sha256: str) -> tuple[ModelSpec, dict[str, Any]]:
    """Check ``interpreter``'s model against the contract.

    Returns its :class:`ModelSpec` and one signature runner per contract signature it
    has. Raises :class:`ModelContractError` naming everything missing or wrong.
    """
    wanted = _check_signatures(interpreter.get_signature_list(), name)
    runners = {key: interpreter.get_signature_runner(key) for key in wanted}
    x_shape, num_classes = _check_samples(runners, name)
    spec = ModelSpec(
        name=name,
        sha256=sha256,
        input_shape=x_shape[1:],
        num_classes=num_classes,
        num_params=_check_flat(runners, name),
        signatures=tuple(sorted(wanted)),
    )
    return spec, runners


def _fail(name: str, what: str) -> ModelContractError:
    return ModelContractError(f"model {name!r}: {what}; {_SEE}", field="model")


def _check_signatures(
    found: dict[str, Any], name: str
) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The contract signatures the model has, each with the contract's inputs and outputs."""
    missing = [key for key in REQUIRED if key not in found]
    if missing:
        raise ModelContractError(
            f"model {name!r} lacks the signature(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(found)) or 'none'}); {_SEE}",
            field="model",
        )
    wanted = REQUIRED | {key: io for key, io in OPTIONAL.items() if key in found}
    for key, (inputs, outputs) in wanted.items():
        has_in, has_out = sorted(found[key]["inputs"]), sorted(found[key]["outputs"])
        if has_in != sorted(inputs) or has_out != sorted(outputs):
            raise ModelContractError(
                f"model {name!r}: signature {key} has inputs {has_in} and outputs {has_out}; "
                f"the contract says inputs {sorted(inputs)} and outputs {sorted(outputs)}; {_SEE}",
                field="model",
            )
    return wanted


def _check_samples(runners: dict[str, Any], name: str) -> tuple[tuple[int, ...], int]:
    """train's and infer's x (float32, dynamic batch), y and logits: x's shape and the
    number of classes."""
    train_in = _details(runners["train"], "inputs")
    x, y = train_in["x"], train_in["y"]
    x_shape = _shape(x)
    if np.dtype(x["dtype"]) != np.float32 or np.dtype(y["dtype"]) != np.int32:
        raise _fail(
            name,
            f"train wants x {np.dtype(x['dtype'])} and y {np.dtype(y['dtype'])}; "
            "the contract says float32 and int32",
        )
    if len(x_shape) < 2 or x_shape[0] != -1 or _shape(y) != (-1,):
        raise _fail(
            name,
            f"train input x has shape {list(x_shape)} and y {list(_shape(y))}; the batch "
            "dimension must be dynamic (export with batch None) and y one label per sample",
        )
    if any(d <= 0 for d in x_shape[1:]):
        raise _fail(name, f"train input x has shape {list(x_shape)}; only the batch may be dynamic")
    infer_x = _details(runners["infer"], "inputs")["x"]
    if _shape(infer_x) != x_shape or np.dtype(infer_x["dtype"]) != np.float32:
        raise _fail(
            name, f"infer input x has shape {list(_shape(infer_x))}, train's {list(x_shape)}"
        )
    logits = _shape(_details(runners["infer"], "outputs")["logits"])
    if len(logits) != 2 or logits[1] < 2:
        raise _fail(
            name, f"infer output logits has shape {list(logits)}; expected [batch, classes]"
        )
    return x_shape, logits[1]


def _check_flat(runners: dict[str, Any], name: str) -> int:
    """get_flat's output and set_flat's input: one float32 vector of the same length."""
    flat_out = _details(runners["get_flat"], "outputs")["flat"]
    flat_in = _details(runners["set_flat"], "inputs")["flat"]
    n_out, n_in = _shape(flat_out), _shape(flat_in)
    if len(n_out) != 1 or n_out != n_in or n_out[0] <= 0:
        raise _fail(name, f"get_flat returns shape {list(n_out)} but set_flat takes {list(n_in)}")
    if np.dtype(flat_out["dtype"]) != np.float32 or np.dtype(flat_in["dtype"]) != np.float32:
        raise _fail(name, "the flat weight vector must be float32")
    return n_out[0]
