"""Local training of one TFLite model: set the global weights, train, return the delta."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.agent.training import _runtime
from maskfl.agent.training._contract import ModelSpec, check_contract
from maskfl.agent.training._errors import ModelContractError, TrainingError
from maskfl.models import shipped_model

__all__ = ["Evaluation", "LocalTrainer", "LocalUpdate", "TrainStats"]

_log = logging.getLogger("maskfl.agent.training")

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainStats:
    """What :meth:`LocalTrainer.train` did."""

    epochs: int
    steps: int
    samples: int
    """Training samples per epoch."""
    epoch_losses: tuple[float, ...]
    """Mean training loss of each epoch (weighted by batch size)."""
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy and accuracy of the current weights on a data set."""

    loss: float
    accuracy: float
    samples: int


@dataclass(frozen=True)
class LocalUpdate:
    """The result of one local round: what the agent masks and sends."""

    delta: Floats
    """local weights - global weights, float32, length ``spec.num_params``."""
    num_samples: int
    """How many training samples produced it (the FedAvg weight)."""
    stats: TrainStats


class LocalTrainer:
    """One model in one TFLite interpreter; its weights and optimiser state live there.

    The interpreter is created once and kept: every call reuses it. Calls are serialised
    by a lock (an interpreter must not run two signatures at once), so the agent may
    call from a worker thread (``asyncio.to_thread``); a whole :meth:`local_update` is
    one critical section. Errors are :class:`ModelContractError` (the model does
    not load, follow the contract or run) and :class:`TrainingError` (the data do not
    fit the model, bad hyperparameters, non-finite weights).
    """

    def __init__(
        self, model_content: bytes, *, name: str = "model", num_threads: int | None = None
    ) -> None:
        sha256 = hashlib.sha256(model_content).hexdigest()
        try:
            self._interpreter = _runtime.make_interpreter(model_content, num_threads=num_threads)
        except (ValueError, RuntimeError, SystemError) as exc:
            raise ModelContractError(
                f"model {name!r} cannot be loaded by {_runtime.RUNTIME}: {exc}", field="model"
            ) from exc
        self._spec, self._runners = check_contract(self._interpreter, name=name, sha256=sha256)
        self._lock = threading.RLock()
        self._probe()
        _log.debug("loaded model %s (%d parameters)", name, self._spec.num_params)

    @classmethod
    def from_file(cls, path: str | Path, *, num_threads: int | None = None) -> LocalTrainer:
        """Load a ``.tflite`` file; the model is named after the file."""
        path = Path(path)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ModelContractError(
                f"cannot read model file {path}: {exc.strerror}", field="model"
            ) from exc
        return cls(content, name=path.stem, num_threads=num_threads)

    @classmethod
    def shipped(cls, name: str, *, num_threads: int | None = None) -> LocalTrainer:
        """Load a model that ships with maskfl (``"mlp"``, ``"cnn"``)."""
        return cls(shipped_model(name).read_bytes(), name=name, num_threads=num_threads)

    @classmethod
    def load(cls, model: str | Path, *, num_threads: int | None = None) -> LocalTrainer:
        """A shipped model by name, or a path to a ``.tflite`` file (as in agent.toml)."""
        if isinstance(model, Path) or model.endswith(".tflite") or "/" in model:
            return cls.from_file(model, num_threads=num_threads)
        return cls.shipped(model, num_threads=num_threads)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    # --- weights

    def get_weights(self) -> Floats:
        """A copy of the current flat weight vector."""
        with self._lock:
            return self._get_flat()

    def set_weights(self, flat: npt.ArrayLike, *, reset_optimizer: bool = True) -> None:
        """Load a flat weight vector (e.g. the global model); by default also zero the
        optimiser state, so every round starts the same way."""
        weights = self._check_weights(flat)
        with self._lock:
            self._invoke("set_flat", flat=weights)
            if reset_optimizer and self._spec.has_reset_opt:
                self._invoke("reset_opt")

    def reset_optimizer(self) -> None:
        """Zero the optimiser state (no-op for models without ``reset_opt``)."""
        if self._spec.has_reset_opt:
            with self._lock:
                self._invoke("reset_opt")

    def set_learning_rate(self, lr: float) -> None:
        """Change the learning rate; needs the optional ``set_lr`` signature."""
        if not self._spec.has_set_lr:
            raise ModelContractError(
                f"model {self._spec.name!r} has no set_lr signature; its learning rate is fixed",
                field="learning_rate",
            )
        if not (math.isfinite(lr) and lr > 0):
            raise TrainingError(f"learning rate must be a positive number, not {lr}", field="lr")
        with self._lock:
            self._invoke("set_lr", lr=np.float32(lr))

    # --- training and evaluation

    def train(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
    ) -> TrainStats:
        """Train ``epochs`` passes over (x, y) in mini-batches of ``batch_size``.

        Each epoch visits the samples in a fresh order drawn from ``seed``, so the same
        seed, data and starting weights give the same result. The last batch of an epoch
        may be short. If the weights become non-finite, :class:`TrainingError` is raised
        and the weights are left as they are (set new ones before training again).
        """
        xs, ys = self._check_data(x, y)
        if len(ys) == 0:
            raise TrainingError("no training samples", field="data")
        if epochs < 1 or batch_size < 1:
            raise TrainingError(
                f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1",
                field="epochs" if epochs < 1 else "batch_size",
            )
        rng = np.random.default_rng(seed)
        losses: list[float] = []
        steps = 0
        start = time.perf_counter()
        with self._lock:
            for _ in range(epochs):
                order = rng.permutation(len(ys))
                xe, ye = xs[order], ys[order]
                total = 0.0
                for lo in range(0, len(ye), batch_size):
                    out = self._invoke(
                        "train", x=xe[lo : lo + batch_size], y=ye[lo : lo + batch_size]
                    )
                    total += float(out["loss"]) * len(ye[lo : lo + batch_size])
                    steps += 1
                losses.append(total / len(ye))
            if not np.isfinite(self._get_flat()).all():
                raise TrainingError(
                    f"model {self._spec.name!r}: weights became non-finite while training "
                    f"(epoch losses {losses}); lower the learning rate",
                    field="learning_rate",
                )
        return TrainStats(
            epochs=epochs,
            steps=steps,
            samples=len(ys),
            epoch_losses=tuple(losses),
            seconds=time.perf_counter() - start,
        )

    def predict(self, x: npt.ArrayLike, *, batch_size: int = 256) -> Floats:
        """Logits ``[n, num_classes]`` for the samples in ``x``."""
        xs = self._check_x(x)
        with self._lock:
            parts = [
                self._invoke("infer", x=xs[lo : lo + batch_size])["logits"]
                for lo in range(0, len(xs), batch_size)
            ]
        if not parts:
            return np.zeros((0, self._spec.num_classes), np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike, *, batch_size: int = 256) -> Evaluation:
        """Mean softmax cross-entropy and accuracy of the current weights."""
        _, ys = self._check_data(x, y)
        if len(ys) == 0:
            raise TrainingError("no evaluation samples", field="data")
        logits = self.predict(x, batch_size=batch_size).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(ys)), ys].mean())
        accuracy = float((logits.argmax(axis=1) == ys).mean())
        return Evaluation(loss=loss, accuracy=accuracy, samples=len(ys))

    def counts(
        self, weights: npt.ArrayLike, x: npt.ArrayLike, y: npt.ArrayLike, *, loss_cap: float
    ) -> tuple[int, int, float]:
        """``(examples, correct, summed loss)`` of ``weights`` on ``(x, y)``, each example's
        softmax cross-entropy clipped to ``[0, loss_cap]``: what federated evaluation
        sends (masked). Loads ``weights``; atomic for other threads."""
        _, ys = self._check_data(x, y)
        if len(ys) == 0:
            return 0, 0, 0.0
        with self._lock:
            self.set_weights(weights)
            logits = self.predict(x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        losses = np.clip(-log_probs[np.arange(len(ys)), ys], 0.0, loss_cap)
        correct = int((logits.argmax(axis=1) == ys).sum())
        return len(ys), correct, float(losses.sum())

    def local_update(
        self,
        global_weights: npt.ArrayLike,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
    ) -> LocalUpdate:
        """One federated round on this device: start from ``global_weights`` (with a fresh
        optimiser), train, and return ``local - global`` with the sample count."""
        start = self._check_weights(global_weights)
        with self._lock:  # one round is atomic for other threads
            self.set_weights(start)
            stats = self.train(x, y, epochs=epochs, batch_size=batch_size, seed=seed)
            delta = self.get_weights() - start
        return LocalUpdate(delta=delta, num_samples=stats.samples, stats=stats)

    # --- internals (call with the lock held)

    def _invoke(self, key: str, **inputs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self._runners[key](**inputs)
        except (ValueError, RuntimeError, SystemError) as exc:
            text = " ".join(str(exc).split())
            hint = (
                "; the model uses TensorFlow (Flex) ops, which no agent runtime has: rebuild it "
                "with builtin ops only (see models/build.py)"
                if "Flex" in text
                else ""
            )
            raise ModelContractError(
                f"model {self._spec.name!r}: signature {key} failed in {_runtime.RUNTIME}: "
                f"{text}{hint}",
                field="model",
            ) from exc
        return result

    def _get_flat(self) -> Floats:
        flat = np.array(self._invoke("get_flat")["flat"], dtype=np.float32)
        if flat.shape != (self._spec.num_params,):
            raise ModelContractError(
                f"model {self._spec.name!r}: get_flat returned shape {list(flat.shape)}, "
                f"not [{self._spec.num_params}]",
                field="model",
            )
        return flat

    def _probe(self) -> None:
        """Run every signature once, so a model that cannot run (Flex ops, a bad graph)
        is refused at load, not in the middle of a round. Weights and optimiser state
        are restored afterwards."""
        with self._lock:
            initial = self._get_flat()
            self._invoke("set_flat", flat=initial)
            x = np.zeros((1, *self._spec.input_shape), np.float32)
            self._invoke("infer", x=x)
            if self._spec.has_reset_opt:
                self._invoke("train", x=x, y=np.zeros(1, np.int32))
                self._invoke("set_flat", flat=initial)
                self._invoke("reset_opt")

    def _check_weights(self, flat: npt.ArrayLike) -> Floats:
        weights = np.ascontiguousarray(flat, dtype=np.float32)
        if weights.shape != (self._spec.num_params,):
            raise ModelContractError(
                f"a weight vector of shape {list(weights.shape)} does not fit model "
                f"{self._spec.name!r}, which has {self._spec.num_params} parameters",
                field="model",
            )
        if not np.isfinite(weights).all():
            raise TrainingError("the weight vector holds NaN or infinity", field="weights")
        return weights

    def _check_x(self, x: npt.ArrayLike) -> Floats:
        xs = np.asarray(x, dtype=np.float32)
        shape = self._spec.input_shape
        if xs.ndim == 0:
            raise TrainingError("x must hold one row per sample", field="data")
        if xs.shape[1:] != shape:
            if int(np.prod(xs.shape[1:])) != int(np.prod(shape)):
                raise TrainingError(
                    f"samples of shape {list(xs.shape[1:])} do not fit model "
                    f"{self._spec.name!r}, which takes {list(shape)}",
                    field="data",
                )
            xs = xs.reshape(len(xs), *shape)
        return np.ascontiguousarray(xs)

    def _check_data(
        self, x: npt.ArrayLike, y: npt.ArrayLike
    ) -> tuple[Floats, npt.NDArray[np.int32]]:
        xs = self._check_x(x)
        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != len(xs):
            raise TrainingError(
                f"y must hold one label per sample: {len(xs)} samples, y of shape "
                f"{list(labels.shape)}",
                field="data",
            )
        if labels.size and labels.dtype.kind not in "iu":
            raise TrainingError(f"labels must be integers, not {labels.dtype}", field="data")
        classes = self._spec.num_classes
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise TrainingError(
                f"labels range over {int(labels.min())}..{int(labels.max())}; model "
                f"{self._spec.name!r} has classes 0..{classes - 1}",
                field="data",
            )
        return xs, labels.astype(np.int32)
