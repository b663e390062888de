"""The broker restarts in the middle of a round; the coordinator reconnects and the
round completes with every update included.

With ``persistence true`` (what deploy/ ships) the broker keeps the
coordinator's session, its queued messages and the retained state. Without
persistence everything is gone after the restart: the coordinator then finds
no session, subscribes again and republishes the round's retained state; the
updates are sent after the restart, so none is lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskfl.testing.broker import Mosquitto
from maskfl.testing.participants import (
    Behaviour,
    expected_mean,
    start_all,
    stop_all,
    wait_for,
)
from tests.broker_coordinator.support import fixed_delta, make_setup, running_coordinator, trained

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.mark.parametrize("persistence", [True, False])
async def test_round_completes_across_a_broker_restart(tmp_path: Path, persistence: bool) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=persistence).start()
    try:
        setup = make_setup(tmp_path, broker.port, summers=3, updaters=5)
        first_delay = 0.3 if persistence else 3.0
        parts = setup.participants(
            broker,
            updater=lambda k: Behaviour(delta=fixed_delta(k), update_delay_s=first_delay + 0.4 * k),
        )
        await start_all(parts)
        try:
            async with running_coordinator(setup.config_path) as coordinator:
                await wait_for(
                    lambda: all(p.sum_dicts for p in parts[3:]), 30, "the sum dictionary"
                )
                if persistence:  # the first update counted, the others still to come
                    first = parts[3]
                    await wait_for(lambda: bool(first.receipts), 30, "the first update's receipt")
                broker.restart()
                await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
                assert coordinator.transport is not None
                assert coordinator.transport.stats.connects >= 2
        finally:
            await stop_all(parts)
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        assert metrics["updates"] == 5
        expected = setup.initial + expected_mean([p.sent[1] for p in parts[3:]], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
    finally:
        broker.stop()
