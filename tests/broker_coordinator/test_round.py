"""Full rounds against a real mosquitto with protocol-level simulated participants."""

from __future__ import annotations

import numpy as np
import pytest

from maskfl.tools.fleet_sim import (
    Behaviour,
    SimParticipant,
    expected_mean,
    start_all,
    stop_all,
    wait_for,
)
from tests.broker_coordinator.support import fixed_delta, make_setup, running_coordinator
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_round_publishes_the_weighted_mean(tmp_path, mosquitto: Mosquitto) -> None:
    setup = make_setup(tmp_path, mosquitto.port, summers=3, updaters=5)
    ca = setup.fleet.ca_public_key
    parts = [
        SimParticipant(i, ca_public_key=ca, host=mosquitto.host, port=mosquitto.port)
        for i in setup.summers
    ] + [
        SimParticipant(
            i,
            ca_public_key=ca,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(delta=fixed_delta(k)),
        )
        for k, i in enumerate(setup.updaters)
    ]
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(p.models for p in parts), 60, "the global model")
            assert coordinator.runner is not None
        model = parts[0].models[-1]
        updaters = parts[3:]
        expected = setup.initial + expected_mean([p.sent[1] for p in updaters], 1.0)
        metrics = dict(model.metrics)
        assert metrics["updates"] == 5
        assert metrics["dropped"] == 0
        assert model.version == 1
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
        for p in parts:
            assert all(r.accepted for r in p.receipts), [r for r in p.receipts if not r.accepted]
            assert not p.errors
        assert sum(len(p.receipts) for p in parts) == 3 + 5 + 3
    finally:
        await stop_all(parts)
