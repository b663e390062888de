"""On-device training of TFLite models, with no TensorFlow at run time.

LiteRT (``ai-edge-litert``) runs the models, ``tflite-runtime`` when LiteRT is not
installed; the choice is made once at import and logged (:data:`RUNTIME`). A model is
checked against the signature contract (``train``, ``infer``, ``get_flat``,
``set_flat``; see ``models/build.py``) when it is loaded::

    trainer = LocalTrainer.load("mlp")                 # or a path to a .tflite
    update = trainer.local_update(global_w, x, y, epochs=2, batch_size=32, seed=7)
    update.delta, update.num_samples                   # local - global, FedAvg weight
    trainer.evaluate(x_test, y_test)                   # Evaluation(loss, accuracy, samples)
"""

from __future__ import annotations

from maskfl.agent.training._contract import OPTIONAL, REQUIRED, ModelSpec
from maskfl.agent.training._errors import (
    ModelContractError,
    RuntimeUnavailableError,
    TrainingError,
)
from maskfl.agent.training._runtime import RUNTIME
from maskfl.agent.training._trainer import Evaluation, LocalTrainer, LocalUpdate, TrainStats

__all__ = [
    "OPTIONAL",
    "REQUIRED",
    "RUNTIME",
    "Evaluation",
    "LocalTrainer",
    "LocalUpdate",
    "ModelContractError",
    "ModelSpec",
    "RuntimeUnavailableError",
    "TrainStats",
    "TrainingError",
]
