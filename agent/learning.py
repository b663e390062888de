"""What the round logic needs from training: ``train(global weights) -> (delta, samples)``.

:class:`Learner` is that small protocol; :class:`LiteRTLearner` implements it with the
TFLite trainer of :mod:`maskfl.agent.training` and the data-source plugin of ``[data]``.
The model is chosen per round by its id: ``[training] model_file`` if set, else the
shipped model of that name, else the graph the coordinator retains on
``model/<id>/graph`` (handed in with :meth:`LiteRTLearner.add_graph`). Interpreters and
the data set are loaded once and kept. Training runs in a worker thread, so the event
loop (and with it the watchdog and the heartbeats) keeps running.
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
from maskfl.models import shipped_models
from maskfl.protocol.errors import ConfigError

__all__ = ["Learner", "LiteRTLearner", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    delta: npt.NDArray[np.float32]
    num_samples: int
    seconds: float = 0.0
    loss: float | None = None

    @classmethod
    def from_update(cls, update: LocalUpdate) -> TrainResult:
        """The result of one :meth:`LocalTrainer.local_update` (loss: the last epoch's)."""
        losses = update.stats.epoch_losses
        return cls(
            delta=np.ascontiguousarray(update.delta, dtype=np.float32),
            num_samples=update.num_samples,
            seconds=update.stats.seconds,
            loss=losses[-1] if losses else None,
        )


class Learner(Protocol):
    """Local training as the round logic sees it. Errors: any :class:`MaskflError`."""

    async def train(
        self, model_id: str, global_weights: npt.NDArray[np.float32], *, round_id: int
    ) -> TrainResult: ...


class LiteRTLearner:
    """Trains with LiteRT on the configured data source."""

    def __init__(self, training: TrainingSection, data: DataSection) -> None:
        self._training = training
        self._data = data
        self._trainers: dict[str, LocalTrainer] = {}
        self._graphs: dict[str, bytes] = {}
        self._dataset: Dataset | None = None
        self._initial: dict[str, npt.NDArray[np.float32]] = {}

    def add_graph(self, model_id: str, tflite: bytes) -> None:
        """A model graph received from the coordinator (used when nothing local names it)."""
        if self._graphs.get(model_id) != tflite:
            self._graphs[model_id] = tflite
            self._trainers.pop(model_id, None)

    def _trainer(self, model_id: str) -> LocalTrainer:
        trainer = self._trainers.get(model_id)
        if trainer is not None:
            return trainer
        threads = self._training.threads
        if self._training.model_file is not None:
            trainer = LocalTrainer.from_file(self._training.model_file, num_threads=threads)
        elif model_id in {m.name for m in shipped_models()}:
            trainer = LocalTrainer.shipped(model_id, num_threads=threads)
        elif model_id in self._graphs:
            trainer = LocalTrainer(self._graphs[model_id], name=model_id, num_threads=threads)
        else:
            raise ConfigError(
                f"no model for id {model_id!r}: set [training] model_file, or let the "
                "coordinator publish its graph",
                field="training.model_file",
            )
        self._trainers[model_id] = trainer
        self._initial[model_id] = trainer.get_weights()
        return trainer

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

    def _load(self, model_id: str) -> tuple[LocalTrainer, Dataset]:
        trainer = self._trainer(model_id)
        if self._dataset is None:
            self._dataset = load_dataset(self._data.source, self._data.options)
            self._dataset.check_fits(trainer.spec.input_shape, trainer.spec.num_classes)
            log.info(
                "data source %s: %d training samples", self._data.source, self._dataset.num_train
            )
        return trainer, self._dataset

    def _train_sync(
        self, model_id: str, global_weights: npt.NDArray[np.float32], round_id: int
    ) -> TrainResult:
        trainer, data = self._load(model_id)
        update = trainer.local_update(
            global_weights,
            data.x_train,
            data.y_train,
            epochs=self._training.epochs,
            batch_size=self._training.batch_size,
            seed=round_id,
        )
        return TrainResult.from_update(update)

    async def train(
        self, model_id: str, global_weights: npt.NDArray[np.float32], *, round_id: int
    ) -> TrainResult:
        return await asyncio.to_thread(self._train_sync, model_id, global_weights, round_id)
