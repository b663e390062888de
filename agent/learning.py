"""What the round logic needs from training: ``train(global weights) -> (delta, samples)``.

:class:`Learner` is that small protocol; :class:`LiteRTLearner` implements it with the
TFLite trainer of :mod:`maskfl.agent.training` and the data-source plugin of ``[data]``.
The model is chosen per round by its id: ``[training] model_file`` if set, else the
shipped model of that name, else the graph the coordinator retains on
``model/<id>/graph`` (handed in with :meth:`LiteRTLearner.add_graph` once the daemon
has checked it against a signed digest, see :mod:`maskfl.agent.graphs`). When the
newest verified global model states a graph digest (:meth:`LiteRTLearner.set_graph_digest`),
a local file is used only if its SHA-256 is that digest; otherwise the learner takes the
received graph, waiting for it if it has not arrived yet. Without a stated digest the
local files are used as they are (they are the operator's). Interpreters and the data
set are loaded once and kept. Training runs in a worker thread, so the event loop (and
with it the watchdog and the heartbeats) keeps running.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from maskfl.agent.config import DataSection, TrainingSection
from maskfl.agent.datasources import Dataset, load_dataset
from maskfl.agent.training import LocalTrainer, LocalUpdate
from maskfl.models import shipped_model, shipped_models
from maskfl.protocol.crypto import digest
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.masking import LOSS_CAP, NO_EVALUATION, EvalCounts

__all__ = [
    "GraphPendingError",
    "Learner",
    "LiteRTLearner",
    "Split",
    "TrainResult",
    "holdout_split",
    "local_round",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    delta: npt.NDArray[np.float32]
    num_samples: int
    seconds: float = 0.0
    loss: float | None = None
    evaluation: EvalCounts = NO_EVALUATION
    """The *global* model on this device's held-out split, measured before training."""

    @classmethod
    def from_update(
        cls, update: LocalUpdate, evaluation: EvalCounts = NO_EVALUATION
    ) -> TrainResult:
        """The result of one :meth:`LocalTrainer.local_update` (loss: the last epoch's)."""
        losses = update.stats.epoch_losses
        return cls(
            delta=np.ascontiguousarray(update.delta, dtype=np.float32),
            num_samples=update.num_samples,
            seconds=update.stats.seconds,
            loss=losses[-1] if losses else None,
            evaluation=evaluation,
        )


@dataclass(frozen=True)
class Split:
    """A device's samples for training and its held-out samples for evaluation."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int32]
    x_eval: npt.NDArray[np.float32]
    y_eval: npt.NDArray[np.int32]


def holdout_split(data: Dataset, fraction: float) -> Split:
    """Keep ``fraction`` of the training samples out for evaluation, the same every run.

    The order comes from a shuffle seeded by the SHA-256 of the device's own samples,
    so a device always holds out the same samples (and devices with other data other
    ones), without any identity or state. At least one sample stays for training.
    """
    n = data.num_train
    k = min(round(n * fraction), max(0, n - 1))
    if k == 0:
        empty = data.x_train[:0]
        return Split(data.x_train, data.y_train, empty, data.y_train[:0])
    key = digest(np.ascontiguousarray(data.x_train).tobytes() + data.y_train.tobytes())
    order = np.random.default_rng(int.from_bytes(key[:8], "little")).permutation(n)
    held, kept = np.sort(order[:k]), np.sort(order[k:])
    return Split(data.x_train[kept], data.y_train[kept], data.x_train[held], data.y_train[held])


def local_round(
    trainer: LocalTrainer,
    split: Split,
    global_weights: npt.NDArray[np.float32],
    training: TrainingSection,
    *,
    round_id: int,
    max_eval_examples: int,
) -> TrainResult:
    """Evaluate the global model on the held-out split (at most ``max_eval_examples``,
    the first in the split's fixed order), then train on the rest."""
    evaluation = NO_EVALUATION
    limit = min(max_eval_examples, len(split.y_eval))
    if limit > 0:
        n, correct, loss = trainer.counts(
            global_weights, split.x_eval[:limit], split.y_eval[:limit], loss_cap=LOSS_CAP
        )
        evaluation = EvalCounts(n, correct, min(loss, n * LOSS_CAP))
    update = trainer.local_update(
        global_weights,
        split.x_train,
        split.y_train,
        epochs=training.epochs,
        batch_size=training.batch_size,
        seed=round_id,
    )
    return TrainResult.from_update(update, evaluation)


class GraphPendingError(ConfigError):
    """A signed digest names a graph that no local file matches and that has not arrived."""


class Learner(Protocol):
    """Local training as the daemon and the round logic see it. Errors: any
    :class:`MaskflError`. A learner without local model files or received graphs
    answers ``local_weights`` with None and ignores the two graph calls."""

    def local_weights(self, model_id: str) -> npt.NDArray[np.float32] | None:
        """The weights the local model ``model_id`` starts with (None: no local model)."""
        ...

    def add_graph(self, model_id: str, tflite: bytes) -> None:
        """A model graph the daemon verified against a signed graph digest."""
        ...

    def set_graph_digest(self, model_id: str, graph_digest: bytes | None) -> None:
        """The graph digest the newest verified global model states (None: none)."""
        ...

    async def train(
        self,
        model_id: str,
        global_weights: npt.NDArray[np.float32],
        *,
        round_id: int,
        max_eval_examples: int = 0,
    ) -> TrainResult:
        """Evaluate ``global_weights`` on held-out data (at most ``max_eval_examples``;
        0: do not), then train from them."""
        ...


class LiteRTLearner:
    """Trains with LiteRT on the configured data source."""

    def __init__(self, training: TrainingSection, data: DataSection) -> None:
        self._training = training
        self._data = data
        self._trainers: dict[str, tuple[LocalTrainer, bytes]] = {}
        self._graphs: dict[str, bytes] = {}
        self._stated: dict[str, bytes] = {}
        self._warned: set[tuple[str, bytes]] = set()
        self._changed: asyncio.Event | None = None
        self._dataset: Split | None = None
        self._initial: dict[str, npt.NDArray[np.float32]] = {}

    def add_graph(self, model_id: str, tflite: bytes) -> None:
        """A model graph received from the coordinator and *verified by the daemon*
        against the signed graph digest (used when no local file matches)."""
        if self._graphs.get(model_id) != tflite:
            self._graphs[model_id] = tflite
            self._drop_unless(model_id, self._stated.get(model_id))
            self._wake()

    def set_graph_digest(self, model_id: str, graph_digest: bytes | None) -> None:
        """The SHA-256 of the graph the newest verified global model names (None: none).

        A cached interpreter built from another graph is dropped, and so is a received
        graph with another digest; the next round loads what matches.
        """
        if graph_digest is None:
            self._stated.pop(model_id, None)
            self._graphs.pop(model_id, None)
        elif self._stated.get(model_id) != graph_digest:
            self._stated[model_id] = graph_digest
            graph = self._graphs.get(model_id)
            if graph is not None and digest(graph) != graph_digest:
                del self._graphs[model_id]
            self._drop_unless(model_id, graph_digest)
        self._wake()

    def _drop_unless(self, model_id: str, graph_digest: bytes | None) -> None:
        have = self._trainers.get(model_id)
        if have is not None and graph_digest is not None and have[1] != graph_digest:
            del self._trainers[model_id]

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _source(self, model_id: str) -> tuple[str, bytes, bytes]:
        """(name, .tflite bytes, SHA-256) of the graph to use for ``model_id``.

        Raises :class:`GraphPendingError` when a digest is stated and only a graph yet to
        arrive can match it, :class:`ConfigError` when there is no model at all.
        """
        stated = self._stated.get(model_id)
        local: list[tuple[str, str, bytes]] = []
        if self._training.model_file is not None:
            path = self._training.model_file
            try:
                local.append((path.stem, f"model_file {path}", path.read_bytes()))
            except OSError as exc:
                raise ConfigError(
                    f"training.model_file: cannot read {path}: {exc.strerror}",
                    field="training.model_file",
                ) from exc
        elif model_id in {m.name for m in shipped_models()}:
            local.append(
                (model_id, f"shipped model {model_id}", shipped_model(model_id).read_bytes())
            )
        for name, what, content in local:
            content_digest = digest(content)
            if stated is None or content_digest == stated:
                return name, content, content_digest
            if (model_id, stated) not in self._warned:
                self._warned.add((model_id, stated))
                log.warning(
                    "%s has SHA-256 %s..., not the graph digest %s... of the signed global "
                    "model %s; using the coordinator's graph instead",
                    what,
                    content_digest.hex()[:16],
                    stated.hex()[:16],
                    model_id,
                )
        graph = self._graphs.get(model_id)
        if graph is not None and stated is not None:
            graph_digest = digest(graph)
            if graph_digest == stated:
                return model_id, graph, graph_digest
        if stated is not None:
            raise GraphPendingError(
                f"model {model_id!r}: the signed global model names graph "
                f"{stated.hex()[:16]}..., which has not arrived on model/{model_id}/graph",
                field="training.model_file",
            )
        raise ConfigError(
            f"no model for id {model_id!r}: set [training] model_file, or let the "
            "coordinator publish its graph (and its digest in the signed global model)",
            field="training.model_file",
        )

    def _trainer(self, model_id: str) -> LocalTrainer:
        have = self._trainers.get(model_id)
        if have is not None:
            return have[0]
        name, content, content_digest = self._source(model_id)
        trainer = LocalTrainer(content, name=name, num_threads=self._training.threads)
        self._trainers[model_id] = (trainer, content_digest)
        self._initial[model_id] = trainer.get_weights()
        return trainer

    async def _wait_for_graph(self, model_id: str) -> None:
        """Return once a model for ``model_id`` can be loaded; a pending graph is awaited
        (the round task is cancelled when its round ends, which ends this wait too)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        said = False
        while True:
            self._changed.clear()
            try:
                await asyncio.to_thread(self._trainer, model_id)
                return
            except GraphPendingError as exc:
                if not said:
                    log.info("%s; waiting for it", exc)
                    said = True
            await self._changed.wait()

    def local_weights(self, model_id: str) -> npt.NDArray[np.float32] | None:
        """The weights the local model file starts with (``None`` when there is no model).

        A fleet's first round may use them as the global model: the round parameters
        name the model by its digest, so the agent uses them only if they match.
        """
        try:
            self._trainer(model_id)
        except ConfigError:
            return None
        return self._initial[model_id].copy()

    def _load(self, model_id: str) -> tuple[LocalTrainer, Split]:
        trainer = self._trainer(model_id)
        if self._dataset is None:
            data = load_dataset(self._data.source, self._data.options)
            data.check_fits(trainer.spec.input_shape, trainer.spec.num_classes)
            self._dataset = holdout_split(data, self._data.holdout)
            log.info(
                "data source %s: %d training samples, %d held out for evaluation",
                self._data.source,
                len(self._dataset.y_train),
                len(self._dataset.y_eval),
            )
        return trainer, self._dataset

    def _train_sync(
        self,
        model_id: str,
        global_weights: npt.NDArray[np.float32],
        round_id: int,
        max_eval_examples: int,
    ) -> TrainResult:
        trainer, split = self._load(model_id)
        return local_round(
            trainer,
            split,
            global_weights,
            self._training,
            round_id=round_id,
            max_eval_examples=max_eval_examples,
        )

    async def train(
        self,
        model_id: str,
        global_weights: npt.NDArray[np.float32],
        *,
        round_id: int,
        max_eval_examples: int = 0,
    ) -> TrainResult:
        await self._wait_for_graph(model_id)
        return await asyncio.to_thread(
            self._train_sync, model_id, global_weights, round_id, max_eval_examples
        )
