"""A model graph with a weight vector built in: a ``.tflite`` ready for inference.

The shipped graphs keep their weights in resource variables that the graph's
initialisation subgraph assigns from constant tensors; ``get_flat`` concatenates the
variables in a fixed order (the contract in models/build.py). :func:`graph_with_weights`
reads that order from the ``get_flat`` subgraph, cuts the flat vector into the
variables' shapes and writes each slice into the constant the initialiser assigns to
that variable. Loaded anywhere (LiteRT, tflite-runtime, a phone), the graph then starts
with these weights: ``infer`` needs no ``set_flat`` first. Needs LiteRT's flatbuffer
schema (the ``agent`` extra: ai-edge-litert).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import ConfigError

__all__ = ["graph_with_weights"]

_TFLITE_ID = b"TFL3"


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise ConfigError(
            "writing a .tflite needs LiteRT's schema: pip install 'maskfl[agent]' "
            "(ai-edge-litert) on this machine",
            field="--format",
        ) from exc
    return schema_py_generated


def graph_with_weights(graph: bytes, weights: npt.ArrayLike) -> bytes:
    """``graph`` (a .tflite following the model contract) with ``weights`` as its
    initial weights. Raises :class:`ConfigError` when the graph does not have the
    contract's shape or the vector's length does not match it."""
    s = _schema()
    import flatbuffers

    flat = np.ascontiguousarray(weights, dtype="<f4").ravel()
    model = _Model(s, s.ModelT.InitFromObj(s.Model.GetRootAsModel(graph, 0)))
    order = model.variable_order()
    constants = model.initial_values()
    sizes = []
    for name in order:
        if name not in constants:
            raise ConfigError(f"no initial value for variable {name.decode(errors='replace')}")
        tensor, _ = constants[name]
        sizes.append(int(np.prod(tensor.shape)) if tensor.shape is not None else 1)
    if sum(sizes) != flat.size:
        raise ConfigError(
            f"the weight vector has {flat.size} values, the graph's variables {sum(sizes)}"
        )
    start = 0
    for name, size in zip(order, sizes, strict=True):
        _, buffer = constants[name]
        buffer.data = np.frombuffer(flat[start : start + size].tobytes(), dtype=np.uint8)
        start += size
    builder = flatbuffers.Builder(len(graph) + flat.nbytes)
    builder.Finish(model.model.Pack(builder), file_identifier=_TFLITE_ID)
    return bytes(builder.Output())


class _Model:
    """A parsed .tflite (the flatbuffer's object API) and the questions asked of it."""

    def __init__(self, schema: Any, model: Any) -> None:
        self.model = model
        self._builtin = {
            v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")
        }

    def op_name(self, op: Any) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        return str(self._builtin.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"))

    def handles(self, subgraph: Any) -> dict[int, bytes]:
        """tensor index -> the shared name of the variable the VAR_HANDLE op gives."""
        return {
            op.outputs[0]: bytes(op.builtinOptions.sharedName or b"")
            for op in subgraph.operators
            if self.op_name(op) == "VAR_HANDLE"
        }

    def variable_order(self) -> list[bytes]:
        """The variables in the order ``get_flat`` concatenates them."""
        signatures = {bytes(sd.signatureKey): sd.subgraphIndex for sd in self.model.signatureDefs}
        if b"get_flat" not in signatures:
            raise ConfigError("the model graph has no get_flat signature (see models/build.py)")
        getter = self.model.subgraphs[signatures[b"get_flat"]]
        names = self.handles(getter)
        read = {
            op.outputs[0]: names[op.inputs[0]]
            for op in getter.operators
            if self.op_name(op) == "READ_VARIABLE" and op.inputs[0] in names
        }
        producer = {out: op for op in getter.operators for out in op.outputs}
        concat = [op for op in getter.operators if self.op_name(op) == "CONCATENATION"]
        if len(concat) != 1:
            raise ConfigError("the model graph's get_flat is not one concatenation of variables")
        order: list[bytes] = []
        for part in concat[0].inputs:
            source = part
            while source not in read and source in producer:  # RESHAPE(READ_VARIABLE(handle))
                source = producer[source].inputs[0]
            if source not in read:
                raise ConfigError("the model graph's get_flat reads something that is no variable")
            order.append(read[source])
        return order

    def initial_values(self) -> dict[bytes, tuple[Any, Any]]:
        """variable -> (tensor, buffer) of the constant an ASSIGN_VARIABLE gives it first."""
        constants: dict[bytes, tuple[Any, Any]] = {}
        for subgraph in self.model.subgraphs:
            names = self.handles(subgraph)
            for op in subgraph.operators:
                if self.op_name(op) != "ASSIGN_VARIABLE" or op.inputs[0] not in names:
                    continue
                tensor = subgraph.tensors[op.inputs[1]]
                buffer = self.model.buffers[tensor.buffer]
                if tensor.buffer and buffer.data is not None and len(buffer.data):
                    constants.setdefault(names[op.inputs[0]], (tensor, buffer))
        return constants
