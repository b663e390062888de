# mypy: ignore-errors
"""Build the shipped on-device-trainable models (development only: needs TensorFlow).

Agents never import TensorFlow: they run the ``.tflite`` files this script writes with
LiteRT (``ai-edge-litert``) or ``tflite-runtime``. Rebuild with the build-models extra::

    pip install -e '.[build-models]'          # tensorflow-cpu, scikit-learn
    python models/build.py                   # writes models/*.tflite, *.init.npy, manifest.json
    python models/build.py --fixtures tests/models/data   # also the refused test models

The model contract
==================

A model maskfl can train holds its weights in resource variables and exports these
signatures (the names of inputs and outputs are part of the contract)::

    train(x, y)     -> {"loss": float32[]}         one optimiser step on a batch
    infer(x)        -> {"logits": float32[B, C]}   forward pass
    get_flat()      -> {"flat": float32[M]}        all trainable weights, one vector
    set_flat(flat)  -> {"ok": int32[]}             inverse of get_flat
    reset_opt()     -> {"ok": int32[]}             optional: zero the optimiser state
    set_lr(lr)      -> {"ok": int32[]}             optional: set the learning rate

* ``x`` is float32 ``[B, *input_shape]`` and ``y`` is int32 ``[B]`` (class indices in
  ``0..C-1``). The batch dimension ``B`` must be dynamic (``None`` when exporting), so
  the runtime can resize it for the last, short batch and for evaluation.
* ``get_flat`` and ``set_flat`` use the same order (the order the variables were
  created in) and the same length ``M``; that vector is what federated rounds average
  and mask. Optimiser slots are *not* part of it.
* Only TFLite builtin ops: convert with ``supported_ops = [TFLITE_BUILTINS]`` so that a
  Flex op fails the build, not the device. No Save/Restore signatures (the agent keeps
  weights with ``get_flat``).

Exporting your own model
------------------------

Plain ``tf.GradientTape`` training graphs are not builtin-only: the gradient of
``tf.nn.relu`` is ``ReluGrad``, a dynamic batch adds ``BroadcastGradientArgs``, and
``conv2d``/``max_pool2d`` need ``Conv2DBackpropFilter``/``MaxPoolGrad``. Copy the
custom-gradient blocks below (:func:`c_relu`, :func:`c_dense`, :func:`c_xent`), build
convolutions as im2col (static slices + matmul) and pool with ``reduce_max`` on tensors
of rank <= 4 (rank 6 aborts tflite-runtime 2.14), subclass :class:`Trainable`, and pass
an instance to :func:`build_model`. The agent checks the contract when it loads a model
and refuses one that misses a signature, with a message naming what is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

CONTRACT_VERSION = 1
REQUIRED = ("train", "infer", "get_flat", "set_flat")
HERE = Path(__file__).resolve().parent


def glorot(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Glorot-uniform initial weights from a fixed seed (the build is reproducible)."""
    fan_in = int(np.prod(shape[:-1]))
    fan_out = shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return np.random.default_rng(seed).uniform(-limit, limit, size=shape).astype(np.float32)


# --- custom-gradient blocks: their backward passes use only MatMul, Mul, Sum, Softmax
# and Cast, so the converter emits builtins (no ReluGrad, no BroadcastGradientArgs).


@tf.custom_gradient
def c_relu(x):
    def grad(dy):
        return dy * tf.cast(x > 0, tf.float32)

    return tf.nn.relu(x), grad


@tf.custom_gradient
def c_dense(x, w, b):
    def grad(dy):
        return (
            tf.matmul(dy, w, transpose_b=True),
            tf.matmul(x, dy, transpose_a=True),
            tf.reduce_sum(dy, axis=0),
        )

    return tf.matmul(x, w) + b, grad


@tf.custom_gradient
def c_xent(logits, onehot):
    """Mean softmax cross-entropy; the gradient is (softmax - onehot) / n."""
    n = tf.cast(tf.shape(logits)[0], tf.float32)
    lse = tf.reduce_logsumexp(logits, axis=1)
    loss = tf.reduce_sum(lse - tf.reduce_sum(onehot * logits, axis=1)) / n

    def grad(dloss):
        return dloss * (tf.nn.softmax(logits) - onehot) / n, tf.zeros_like(onehot)

    return loss, grad


class Trainable(tf.Module):
    """A model with hand-written Adam that exports the maskfl signatures.

    Subclasses set ``input_shape`` (per sample), ``num_classes``, an ordered list of
    ``(name, tf.Variable)`` in ``params`` and implement ``forward(x) -> logits``.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    description: str

    def __init__(self, params: list[tuple[str, np.ndarray]], *, lr: float, batch: int | None):
        super().__init__()
        self.batch = batch
        self.names = [name for name, _ in params]
        self.vars = [tf.Variable(value, name=name) for name, value in params]
        self.m = [tf.Variable(tf.zeros_like(v), name=f"{n}_m") for n, v in zip(self.names, self.vars)]
        self.v = [tf.Variable(tf.zeros_like(v), name=f"{n}_v") for n, v in zip(self.names, self.vars)]
        self.t = tf.Variable(0.0, name="adam_t")
        self.lr = tf.Variable(lr, name="lr")

    def param(self, name: str) -> tf.Variable:
        return self.vars[self.names.index(name)]

    def forward(self, x):
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.vars))

    # --- signature bodies

    def _train(self, x, y):
        with tf.GradientTape() as tape:
            onehot = tf.one_hot(y, depth=self.num_classes, dtype=tf.float32)
            loss = c_xent(self.forward(x), onehot)
        grads = tape.gradient(loss, self.vars)
        b1, b2, eps = 0.9, 0.999, 1e-7
        self.t.assign_add(1.0)
        lr_t = self.lr * tf.sqrt(1.0 - tf.pow(b2, self.t)) / (1.0 - tf.pow(b1, self.t))
        for var, g, m, s in zip(self.vars, grads, self.m, self.v):
            m.assign(b1 * m + (1.0 - b1) * g)
            s.assign(b2 * s + (1.0 - b2) * tf.square(g))
            var.assign_sub(lr_t * m / (tf.sqrt(s) + eps))
        return {"loss": loss}

    def _set_flat(self, flat):
        offset = 0
        for var in self.vars:
            size = int(np.prod(var.shape))
            var.assign(tf.reshape(flat[offset : offset + size], var.shape))
            offset += size
        return {"ok": tf.constant(1, tf.int32)}

    def _reset_opt(self):
        for m, s in zip(self.m, self.v):
            m.assign(tf.zeros_like(m))
            s.assign(tf.zeros_like(s))
        self.t.assign(0.0)
        return {"ok": tf.constant(1, tf.int32)}

    def _set_lr(self, lr):
        self.lr.assign(lr)
        return {"ok": tf.constant(1, tf.int32)}

    def signatures(self, include: tuple[str, ...] | None = None) -> dict[str, Any]:
        x = tf.TensorSpec([self.batch, *self.input_shape], tf.float32, name="x")
        y = tf.TensorSpec([self.batch], tf.int32, name="y")
        flat = tf.TensorSpec([self.num_params], tf.float32, name="flat")
        lr = tf.TensorSpec([], tf.float32, name="lr")
        fns = {
            "train": tf.function(self._train, input_signature=[x, y]),
            "infer": tf.function(lambda x: {"logits": self.forward(x)}, input_signature=[x]),
            "get_flat": tf.function(
                lambda: {"flat": tf.concat([tf.reshape(v, [-1]) for v in self.vars], axis=0)},
                input_signature=[],
            ),
            "set_flat": tf.function(self._set_flat, input_signature=[flat]),
            "reset_opt": tf.function(self._reset_opt, input_signature=[]),
            "set_lr": tf.function(self._set_lr, input_signature=[lr]),
        }
        keys = include if include is not None else tuple(fns)
        return {k: fns[k].get_concrete_function() for k in keys}


class MLP(Trainable):
    """64 -> hidden -> 10 with ReLU (8x8 digits as a flat vector)."""

    input_shape = (64,)
    num_classes = 10

    def __init__(self, hidden: int = 64, lr: float = 0.01, batch: int | None = None):
        self.description = f"MLP 64-{hidden}-10, ReLU, Adam (lr {lr}), softmax cross-entropy"
        super().__init__(
            [
                ("w1", glorot((64, hidden), 1)),
                ("b1", np.zeros(hidden, np.float32)),
                ("w2", glorot((hidden, 10), 2)),
                ("b2", np.zeros(10, np.float32)),
            ],
            lr=lr,
            batch=batch,
        )

    def forward(self, x):
        h = c_relu(c_dense(x, self.param("w1"), self.param("b1")))
        return c_dense(h, self.param("w2"), self.param("b2"))


class CNN(Trainable):
    """8x8x1 -> conv 3x3 (SAME, ``channels``) -> ReLU -> 2x2 max-pool -> dense 10.

    The convolution is im2col by static slices plus one matmul and the pooling is two
    rank-4 ``reduce_max``: every gradient is a builtin op.
    """

    input_shape = (8, 8, 1)
    num_classes = 10

    def __init__(self, channels: int = 16, lr: float = 0.01, batch: int | None = None):
        self.channels = channels
        self.description = (
            f"CNN 8x8x1, conv3x3x{channels} (im2col) + ReLU + maxpool2 + dense 10, Adam (lr {lr})"
        )
        super().__init__(
            [
                ("k", glorot((9, channels), 3)),
                ("bk", np.zeros(channels, np.float32)),
                ("w", glorot((16 * channels, 10), 4)),
                ("b", np.zeros(10, np.float32)),
            ],
            lr=lr,
            batch=batch,
        )

    def forward(self, x):
        c = self.channels
        xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # [B, 10, 10, 1]
        patches = tf.concat([xp[:, i : i + 8, j : j + 8, :] for i in range(3) for j in range(3)], 3)
        h = c_relu(c_dense(tf.reshape(patches, [-1, 9]), self.param("k"), self.param("bk")))
        # h rows are (b, i, j); pool i pairs then j pairs, never above rank 4
        h = tf.reduce_max(tf.reshape(h, [-1, 2, 4, 2 * c]), axis=1)  # [B*4, 4, 2c]
        h = tf.reduce_max(tf.reshape(h, [-1, 4, 2, c]), axis=2)  # [B*4, 4, c]
        return c_dense(tf.reshape(h, [-1, 16 * c]), self.param("w"), self.param("b"))


# --- conversion


def convert(module: Trainable, include: tuple[str, ...] | None = None, allow_flex: bool = False) -> bytes:
    """SavedModel -> .tflite with builtins only (a Flex op raises here unless allowed)."""
    sigs = module.signatures(include)
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=sigs)
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(sigs))
        conv.experimental_enable_resource_variables = True
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if allow_flex:  # only for the test fixture that must be refused
            conv.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        return bytes(conv.convert())


_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def op_names(blob: bytes) -> list[str]:
    """Sorted operator names in a .tflite (custom ops by their custom code, e.g. Flex*)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    names = set()
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.add(code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode))
        else:
            names.add(_BUILTIN_NAMES[builtin])
    return sorted(names)


def build_model(name: str, module: Trainable, out_dir: Path) -> dict[str, Any]:
    """Convert ``module``, write ``<name>.tflite`` into ``out_dir``; return its manifest entry."""
    blob = convert(module)
    ops = op_names(blob)
    flex = [op for op in ops if op.startswith("Flex")]
    if flex:
        raise SystemExit(f"{name}: Flex ops {flex}; the agent runtimes cannot run them")
    path = out_dir / f"{name}.tflite"
    path.write_bytes(blob)
    # The coordinator has no TFLite runtime: ship the graph's own get_flat next to it.
    initial = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("get_flat")()["flat"]
    init_path = out_dir / f"{name}.init.npy"
    np.save(init_path, np.asarray(initial, dtype=np.float32), allow_pickle=False)
    return {
        "name": name,
        "file": path.name,
        "description": module.description,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
        "num_params": module.num_params,
        "input_shape": list(module.input_shape),
        "num_classes": module.num_classes,
        "learning_rate": round(float(module.lr.numpy()), 6),
        "signatures": sorted(module.signatures()),
        "ops": ops,
        "initial_weights": init_path.name,
        "initial_weights_sha256": hashlib.sha256(init_path.read_bytes()).hexdigest(),
    }


def quick_check(path: Path, input_shape: tuple[int, ...]) -> float:
    """Train 100 steps on digits with TF's own interpreter; return held-out accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, *input_shape)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    interp = tf.lite.Interpreter(model_path=str(path))
    train = interp.get_signature_runner("train")
    for step in range(100):
        lo = (step * 32) % 1400
        train(x=x[lo : lo + 32], y=y[lo : lo + 32])
    logits = interp.get_signature_runner("infer")(x=x[1400:])["logits"]
    return float((logits.argmax(1) == y[1400:]).mean())


class PlainMLP(MLP):
    """The same MLP with plain ``tf.nn.relu`` and autodiff: needs Flex (ReluGrad, ...)."""

    def forward(self, x):
        h = tf.nn.relu(tf.matmul(x, self.param("w1")) + self.param("b1"))
        return tf.matmul(h, self.param("w2")) + self.param("b2")


def build_fixtures(out_dir: Path) -> None:
    """Models the agent must refuse: one misses signatures, one has a static batch,
    one needs Flex ops (it loads, but its train signature cannot run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "missing_signatures.tflite").write_bytes(convert(MLP(hidden=4), ("infer", "get_flat")))
    (out_dir / "static_batch.tflite").write_bytes(convert(MLP(hidden=4, batch=8)))
    flex = convert(PlainMLP(hidden=4), allow_flex=True)
    assert any(op.startswith("Flex") for op in op_names(flex)), "the Flex fixture has no Flex op"
    (out_dir / "flex_ops.tflite").write_bytes(flex)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where the .tflite files go")
    parser.add_argument("--fixtures", type=Path, help="also write the refused test models here")
    parser.add_argument("--no-check", action="store_true", help="skip the digits training check")
    args = parser.parse_args(argv)
    tf.random.set_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, module in (("mlp", MLP()), ("cnn", CNN())):
        entry = build_model(name, module, args.out)
        if not args.no_check:
            entry["build_check_accuracy"] = round(quick_check(args.out / entry["file"], module.input_shape), 4)
        print(json.dumps({k: entry[k] for k in ("name", "size", "num_params")} | {"ops": len(entry["ops"])}))
        entries.append(entry)
    manifest = {
        "contract_version": CONTRACT_VERSION,
        "tensorflow": tf.__version__,
        "models": entries,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if args.fixtures is not None:
        build_fixtures(args.fixtures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
