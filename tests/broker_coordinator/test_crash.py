"""kill -9 of the coordinator process during update and sum2, and at every phase
boundary the moment its output reaches the broker, then restart.

The coordinator runs as a subprocess (``python -m maskfl.broker_coordinator.cli
run``) against a real mosquitto; simulated participants stay up in the test.
After each kill and restart the round must complete and the published model
must be exactly the weighted mean of every updater's update, each included
once: the weight sum and the update count in the model's metrics prove no
update was lost or added twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from maskfl.protocol.errors import Reason
from maskfl.protocol.messages import GlobalModel, decode_message
from maskfl.protocol.topics import TopicKind, Topics, parse_topic
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


class BoundaryKiller:
    """SIGKILLs the coordinator the instant a phase boundary's output reaches the broker.

    A paho client on its own thread, subscribed to the round's sum dictionary,
    the seed dictionaries and the global model: the kill is sent from the
    callback that receives the armed output, not by the test's event loop, so it
    lands within a millisecond or so of the broker having the message.
    """

    def __init__(self, host: str, port: int, fleet: str) -> None:
        self.topics = Topics(fleet)
        self._lock = threading.Lock()
        self._armed: str | None = None
        self._pid: int | None = None
        self.fired = threading.Event()
        self.kills: list[str] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"killer-{fleet}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        prefix = f"maskfl/v1/{fleet}"
        for topic in (
            f"{prefix}/round/+/sums",
            f"{prefix}/round/+/seeds/+",
            f"{prefix}/model/+/latest",
        ):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def arm(self, boundary: str, pid: int) -> None:
        with self._lock:
            self._armed, self._pid = boundary, pid
            self.fired.clear()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        kind = parse_topic(msg.topic).kind
        if kind is TopicKind.MODEL_LATEST:
            body = decode_message(msg.payload, max_size=1 << 24).body
            assert isinstance(body, GlobalModel)
            if body.version < 1:  # version 0 is published at every start
                return
        boundary = {TopicKind.SUMS: "sums", TopicKind.SEEDS: "seeds"}.get(kind, "model")
        with self._lock:
            if boundary != self._armed or self._pid is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self.kills.append(boundary)
            self._armed = self._pid = None
            self.fired.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


BOUNDARY_KILL_ROUNDS = 10
BOUNDARIES = ("sums", "seeds", "model")


async def test_kill9_at_every_phase_boundary_the_round_completes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Kill the coordinator the moment each phase's output appears, restart at once.

    Ten rounds (each a fresh fleet and state), each killed three times: as the
    sum dictionary (sum -> update), the first seed dictionary (update -> sum2)
    and the global model (sum2 -> unmask -> idle) reach the broker. The
    participants send once and never resend, so a message turned away after a
    restart (``wrong_phase`` before the fix) would fail the round. Every round
    must publish the exact mean of all its updates, and no participant may get
    a rejection other than ``duplicate``.
    """
    for k in range(BOUNDARY_KILL_ROUNDS):
        await _round_killed_at_boundaries(tmp_path, mosquitto, k)


async def _round_killed_at_boundaries(tmp_path: Path, mosquitto: Mosquitto, k: int) -> None:
    summers, updaters = 2, 3
    fleet = f"boundary{k}"
    setup = make_setup(
        tmp_path / fleet,
        mosquitto.port,
        summers=summers,
        updaters=updaters,
        fleet_id=fleet,
        extra={
            "broker": {"client_id": f"coordinator-{k}"},
            "storage": {"dir": "state", "group_commit_ms": 2.0},
        },
    )
    parts = [
        SimParticipant(
            i,
            ca_public_key=setup.fleet.ca_public_key,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(delta=fixed_delta(n)),
        )
        for n, i in enumerate(setup.summers + setup.updaters)
    ]
    coordinator = Proc(setup.config_path, tmp_path / f"{fleet}.log")
    killer = BoundaryKiller(mosquitto.host, mosquitto.port, fleet)
    await start_all(parts)
    try:
        for boundary in BOUNDARIES:
            coordinator.start()
            assert coordinator.proc is not None
            killer.arm(boundary, coordinator.proc.pid)
            fired = await asyncio.to_thread(killer.fired.wait, 60)
            assert fired, f"round {k}: no {boundary} output\n{coordinator.log.read_text()[-3000:]}"
            await asyncio.to_thread(coordinator.proc.wait, 10)
        coordinator.start()  # resumes after the last kill
        await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
    finally:
        killer.close()
        coordinator.stop()
        await stop_all(parts)
    assert killer.kills == list(BOUNDARIES)
    log = coordinator.log.read_text()
    model = trained(parts[0])[0]
    metrics = dict(model.metrics)
    assert model.version == 1, log[-3000:]
    assert metrics["updates"] == updaters, log[-3000:]
    sent = [p.sent[1] for p in parts[summers:]]
    expected = setup.initial + expected_mean(sent, 1.0)
    np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
    for p in parts:
        bad = [r for r in p.receipts if not r.accepted and r.reason is not Reason.DUPLICATE]
        assert not bad, f"round {k}: {p.device} got {bad}\n{log[-3000:]}"
