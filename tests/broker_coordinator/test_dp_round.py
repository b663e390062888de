"""Rounds with distributed DP (through the in-memory harness): the noise really is in
the published model with the mechanism's variance, every model carries (epsilon,
delta), /status shows it, and the budget stops training."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from maskfl.broker_coordinator.cli import main
from maskfl.broker_coordinator.config import load_config
from maskfl.broker_coordinator.fleetview import round_history
from maskfl.broker_coordinator.privacy import Accountant
from maskfl.broker_coordinator.service import DB_NAME
from maskfl.broker_coordinator.store import Store
from maskfl.protocol.dp import clip_l2
from maskfl.protocol.phases import Phase
from maskfl.testing.participants import Sent, expected_mean
from tests.broker_coordinator.support import trained
from tests.support.harness import harness

pytestmark = pytest.mark.timeout(120)

DP = {"dp": "distributed", "noise_multiplier": 0.5, "clip_norm": 2.0, "delta": 1e-5}


async def test_a_dp_round_adds_the_mechanisms_noise_and_publishes_epsilon(tmp_path) -> None:
    async with harness(tmp_path, summers=3, updaters=5, extra={"privacy": DP}) as h:
        setup = h.setup
        summers, updaters = h.fleet()
        parts = summers + updaters
        await h.start(parts)
        coordinator = await h.start_coordinator()
        await h.until(lambda: all(trained(p) for p in parts), "the global model")
        await h.finished()  # max_rounds = 1
        s = coordinator.services
        assert s is not None and s.dp is not None
        status = coordinator.status()["privacy"]
        # What the status page draws (its privacy panel plots epsilon when present).
        config = load_config(setup.config_path)
        async with Store.open(config.storage.dir / DB_NAME) as store:
            page = await round_history(store, config.model.id, now=time.time())
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        sent = [p.sent[1] for p in parts[3:]]
        # With DP every updater sends weight 1 (docs/protocol.md §7.9): an unweighted mean.
        clipped = [Sent(clip_l2(x.delta, 2.0)[0], 1.0, x.digest) for x in sent]
        residual = model.weights - (setup.initial + expected_mean(clipped, 1.0))
        # Five updaters each add N_Z(0, (z C S)^2 / 3): the mean's noise has standard
        # deviation z C sqrt(5 / 3) / 5 (the weights are all 1), per element.
        assert metrics["weight_sum"] == pytest.approx(5.0)
        want = 0.5 * 2.0 * math.sqrt(5 / 3) / 5
        got = float(np.std(residual))
        assert abs(got / want - 1) < 0.15, (got, want)
        assert abs(float(np.mean(residual))) < 5 * want / math.sqrt(residual.size)
        # Without noise the residual would be below the error bound; it is far above.
        assert got > 100 * metrics["error_bound"]
        one = Accountant(delta=1e-5).spend(s.dp.rho)[0]
        assert metrics["epsilon"] == pytest.approx(one)
        assert metrics["epsilon_round"] == pytest.approx(one)
        assert metrics["delta"] == 1e-5 and metrics["dp_rounds"] == 1
        assert status["dp"] == "distributed" and status["epsilon"] == pytest.approx(one)
        assert status["rounds"] == 1 and not status["budget_spent"]
        shown = next(r for r in page if r["model_version"] == 1)["privacy"]
        assert shown["epsilon"] == pytest.approx(one) and shown["delta"] == 1e-5


async def test_the_budget_stops_training_and_says_so(
    tmp_path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    acc = Accountant(delta=1e-5)
    # noise_multiplier 2: one round costs about 2.2, two 3.2: a budget of 2.5 allows one.
    privacy = {**DP, "noise_multiplier": 2.0, "budget": 2.5}
    async with harness(
        tmp_path, summers=3, updaters=5, pet={"max_rounds": 5}, extra={"privacy": privacy}
    ) as h:
        setup = h.setup
        summers, updaters = h.fleet()
        parts = summers + updaters
        await h.start(parts)
        coordinator = await h.start_coordinator()
        await h.finished()  # before max_rounds: the budget
        assert coordinator.runner is not None and coordinator.runner.phase is Phase.SHUTDOWN
        s = coordinator.services
        assert s is not None and s.dp is not None and s.accountant is not None
        status = coordinator.status()["privacy"]
        models = trained(parts[0])
        assert [m.version for m in models] == [1]
        eps = dict(models[0].metrics)["epsilon"]
        assert eps == pytest.approx(acc.spend(s.dp.rho)[0]) and eps <= 2.5
        assert acc.epsilon(2 * s.dp.rho, 2) > 2.5
        assert status["budget_spent"] and status["rounds"] == 1
        assert any("privacy budget spent" in r.getMessage() for r in caplog.records)
        # maskfl-coordinator status reads the store: it says so after the coordinator stopped.
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["status", "--config", str(setup.config_path)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "privacy" in x)
        assert line.startswith(f"differential privacy: epsilon {eps:.4g} at delta 1e-05 after 1")
        assert line.endswith("(budget 2.5, spent: training stopped)"), line
