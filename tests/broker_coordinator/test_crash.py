"""kill -9 of the coordinator process during update and sum2, then restart.

The coordinator runs as a subprocess (``python -m maskfl.broker_coordinator.cli
run``) against a real mosquitto; simulated participants stay up in the test.
After each kill and restart the round must complete and the published model
must be exactly the weighted mean of every updater's update, each included
once: the weight sum and the update count in the model's metrics prove no
update was lost or added twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

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
from tests.broker_coordinator.support import fixed_delta, make_setup, trained
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

UPDATERS = 10
SUMMERS = 3


class Proc:
    """The coordinator as a child process, with its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "maskfl.broker_coordinator.cli",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.mark.parametrize(
    ("phase", "run", "length"),
    [
        ("update", 0, 1000),
        ("update", 1, 1000),
        ("update", 2, 40_000),
        ("update", 3, 40_000),
        ("sum2", 0, 1000),
        ("sum2", 1, 40_000),
    ],
)
async def test_kill9_then_restart_includes_every_update_once(
    tmp_path: Path, mosquitto: Mosquitto, phase: str, run: int, length: int
) -> None:
    """Runs with 40,000 parameters send every update and mask as ~10 chunk frames."""
    rng = random.Random(f"{phase}-{run}")
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=SUMMERS,
        updaters=UPDATERS,
        length=length,
        pet={"max_rounds": 2, "round_pause_s": 60.0, "chunk_size": 16384},
        extra={"storage": {"dir": "state", "group_commit_max": 2, "group_commit_ms": 5.0}},
    )
    ca = setup.fleet.ca_public_key
    sum2_delay = 1.0 if phase == "sum2" else 0.0
    parts = [
        SimParticipant(
            i,
            ca_public_key=ca,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(sum2_delay_s=sum2_delay * k),
        )
        for k, i in enumerate(setup.summers)
    ] + [
        SimParticipant(
            i,
            ca_public_key=ca,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(delta=fixed_delta(k), update_delay_s=0.25 * k),
        )
        for k, i in enumerate(setup.updaters)
    ]
    summers, updaters = parts[:SUMMERS], parts[SUMMERS:]
    coordinator = Proc(setup.config_path, tmp_path / "coordinator.log")
    await start_all(parts)
    try:
        coordinator.start()
        if phase == "update":
            await wait_for(lambda: any(p._sums for p in updaters), 30, "the sum dictionary")
            kills = sorted(rng.uniform(0.0, 2.5) for _ in range(2))
        else:
            await wait_for(lambda: any(p._seeds for p in summers), 60, "the seed dictionaries")
            kills = [rng.uniform(0.1, 2.0)]
        elapsed = 0.0
        for at in kills:
            await asyncio.sleep(at - elapsed)
            elapsed = at
            coordinator.kill9()
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            coordinator.start()
        await wait_for(lambda: all(trained(p) for p in parts), 90, "the global model")
    finally:
        coordinator.stop()
        await stop_all(parts)
    model = trained(parts[0])[0]
    metrics = dict(model.metrics)
    assert model.version == 1
    assert metrics["updates"] == UPDATERS, coordinator.log.read_text()[-3000:]
    assert metrics["weight_sum"] == pytest.approx(
        sum(p.sent[1].weight for p in updaters), abs=UPDATERS * 1e-5
    )
    expected = setup.initial + expected_mean([p.sent[1] for p in updaters], 1.0)
    np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
