"""Real agents and the real coordinator through the in-memory harness (no broker).

Two summers and three updaters, each a real :class:`Agent` (SQLite journal, LiteRT
training on the digits data, PyNaCl) on the harness's memory broker and fake clock,
run a full round with the real coordinator. The same round over a real mosquitto,
with the model recomputed, is tests/agent/test_with_coordinator.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from maskfl.agent.state import TaskKind
from maskfl.agent.training import LocalTrainer
from maskfl.protocol.keys import public_key_to_pem
from maskfl.protocol.messages import GlobalModel, decode_message
from maskfl.protocol.topics import Topics
from tests.agent.fleet import write_bundle
from tests.support.harness import UNUSED_PORT, harness

pytestmark = pytest.mark.timeout(120)


async def test_real_agents_complete_a_round_with_the_coordinator(tmp_path: Path) -> None:
    initial = LocalTrainer.shipped("mlp").get_weights()
    pet = {"sum": {"time_max_s": 30.0}, "update": {"time_max_s": 60.0}}
    async with harness(
        tmp_path,
        summers=2,
        updaters=3,
        length=initial.size,
        initial=initial,
        pet=pet,
        extra={"model": {"id": "mlp"}},
    ) as h:
        fleet = h.setup.fleet
        ca_file = tmp_path / "ca.pub"
        ca_file.write_bytes(public_key_to_pem(fleet.ca_key.verify_key))
        nowhere = SimpleNamespace(host="127.0.0.1", port=UNUSED_PORT)
        configs = [
            write_bundle(
                tmp_path / ident.certificate.subject,
                ident,
                fleet=fleet.fleet,
                ca_public_key_file=ca_file,
                broker=nowhere,  # type: ignore[arg-type]
                shard=k,
            )
            for k, ident in enumerate([*h.setup.updaters, *h.setup.summers])
        ]
        async with contextlib.AsyncExitStack() as stack:
            agents = [await stack.enter_async_context(h.agent(c)) for c in configs]
            await h.start_coordinator()
            await h.finished()  # max_rounds = 1
            states = [await a.journal.load(1) for a in agents]
        retained = h.broker.retained[Topics(fleet.fleet).model_latest("mlp")].payload
        model = decode_message(retained, max_size=len(retained)).body
        assert isinstance(model, GlobalModel) and model.version == 1
        metrics = dict(model.metrics)
        assert metrics["updates"] == 3 and metrics["sum2"] == 2 and metrics["dropped"] == 0
        assert not np.allclose(model.weights, initial)  # three trained deltas moved it
        assert [s.task for s in states if s] == [TaskKind.UPDATE] * 3 + [TaskKind.SUM] * 2
