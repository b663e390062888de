"""Which graph the LiteRT learner trains: local files only under a matching signed digest.

Real LiteRT on the shipped models; the "received" graphs are the shipped files' bytes
handed in as the daemon does after its digest check.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from maskfl.agent.config import DataSection, TrainingSection
from maskfl.agent.learning import GraphPendingError, LiteRTLearner
from maskfl.models import model_path, shipped_model
from maskfl.protocol.crypto import digest
from maskfl.protocol.errors import ConfigError
from tests.support.harness import LogWatch

MLP = shipped_model("mlp")
CNN = shipped_model("cnn")
DATA = DataSection(source="digits", options={"shard": 0, "shards": 8})


def learner(**training: object) -> LiteRTLearner:
    return LiteRTLearner(TrainingSection(epochs=1, **training), DATA)  # type: ignore[arg-type]


def test_local_files_are_used_without_a_statement_or_when_their_digest_matches() -> None:
    for lrn in (learner(model_file=model_path("mlp")), learner()):
        weights = lrn.local_weights("mlp")
        assert weights is not None and weights.size == MLP.num_params
        lrn.set_graph_digest("mlp", digest(MLP.read_bytes()))
        weights = lrn.local_weights("mlp")
        assert weights is not None and weights.size == MLP.num_params


def test_a_local_file_with_another_digest_gives_way_to_the_verified_graph(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="maskfl.agent.learning")
    lrn = learner(model_file=model_path("mlp"))
    assert lrn.local_weights("mlp") is not None  # an interpreter of the mlp is cached
    lrn.set_graph_digest("mlp", digest(CNN.read_bytes()))
    assert lrn.local_weights("mlp") is None  # the cached mlp is dropped; the cnn not here
    with pytest.raises(GraphPendingError, match="has not arrived"):
        lrn._trainer("mlp")
    lrn.add_graph("mlp", CNN.read_bytes())
    weights = lrn.local_weights("mlp")
    assert weights is not None and weights.size == CNN.num_params
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not the graph digest" in warnings[0]


def test_no_model_at_all_is_a_config_error_not_a_wait() -> None:
    with pytest.raises(ConfigError, match="no model for id 'net'") as info:
        learner()._trainer("net")
    assert not isinstance(info.value, GraphPendingError)


async def test_training_waits_for_the_named_graph(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maskfl.agent.learning")
    lrn = learner()
    genuine = MLP.read_bytes()
    lrn.set_graph_digest("net", digest(genuine))
    weights = learner().local_weights("mlp")
    assert weights is not None
    with LogWatch() as logs:
        training = asyncio.create_task(lrn.train("net", weights, round_id=1))
        await logs.until("waiting for it")
    assert not training.done()
    lrn.add_graph("net", genuine)
    async with asyncio.timeout(60):
        result = await training
    assert result.delta.size == MLP.num_params and result.num_samples > 0
