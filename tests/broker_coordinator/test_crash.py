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
import functools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from maskfl.protocol.errors import Reason
from maskfl.protocol.messages import GlobalModel, MessageType, Receipt, decode_message
from maskfl.protocol.topics import TopicKind, parse_topic
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
from tests.support.proxy import HoldingProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]

UPDATERS = 10
SUMMERS = 3


def answered(p: SimParticipant, kind: MessageType) -> bool:
    """The participant got an ``accepted`` receipt for its message of this type."""
    return any(r.accepted and r.message_type is kind for r in p.receipts)


def all_answered(summers: list[SimParticipant], updaters: list[SimParticipant]) -> bool:
    """Every message the round used got its ``accepted`` receipt, crashes or not."""
    return all(
        answered(p, MessageType.SUM) and answered(p, MessageType.SUM2) for p in summers
    ) and all(
        any(r.accepted and r.message_digest == p.sent[1].digest for r in p.receipts)
        for p in updaters
    )


def assert_no_rejection(parts: list[SimParticipant], log: Path) -> None:
    """Each message here counted, so no receipt may reject it: ``duplicate`` (a
    redelivery after a kill, in whatever phase or round) is the only other answer."""
    for p in parts:
        bad = [r for r in p.receipts if not r.accepted and r.reason is not Reason.DUPLICATE]
        assert not bad, f"{p.device} got {bad}\n{log.read_text()[-3000:]}"


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
        await wait_for(lambda: all_answered(summers, updaters), 30, "every accepted receipt")
    finally:
        coordinator.stop()
        await stop_all(parts)
    assert_no_rejection(parts, coordinator.log)
    model = trained(parts[0])[0]
    metrics = dict(model.metrics)
    assert model.version == 1
    assert metrics["updates"] == UPDATERS, coordinator.log.read_text()[-3000:]
    assert metrics["weight_sum"] == pytest.approx(
        sum(p.sent[1].weight for p in updaters), abs=UPDATERS * 1e-5
    )
    expected = setup.initial + expected_mean([p.sent[1] for p in updaters], 1.0)
    np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Killer:
    """SIGKILLs the coordinator the instant an armed output reaches the broker.

    A paho client on its own thread, subscribed to the round's sum dictionary,
    seed dictionaries, global model and receipts: the kill is sent from the
    callback that receives the armed output, not by the test's event loop, so it
    lands within a millisecond or so of the broker having the message. Triggers:
    ``sums``, ``seeds`` (the first seed dictionary), ``model`` (version >= 1) and
    ``receipt:<type>`` (the first ``accepted`` receipt for a message of that type:
    the others of its group commit are then committed but perhaps not yet sent).
    """

    def __init__(self, host: str, port: int, fleet: str) -> None:
        self._lock = threading.Lock()
        self._armed: str | None = None
        self._action: Callable[[], None] | None = None
        self._count = 0
        self.fired = threading.Event()
        self.kills: list[str] = []
        self.last: dict[str, bytes] = {}
        """The last payload seen per topic (empty: a retained message cleared)."""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"killer-{fleet}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        prefix = f"maskfl/v1/{fleet}"
        for topic in ("round", "round/+/sums", "round/+/seeds/+", "model/+/latest", "receipts/+"):
            self.client.subscribe(f"{prefix}/{topic}", qos=1)
        self.client.loop_start()

    def arm(self, trigger: str, pid: int) -> None:
        """SIGKILL ``pid`` on the first ``trigger``."""
        self.on(trigger, lambda: kill9(pid))

    def on(self, trigger: str, action: Callable[[], None], count: int = 1) -> None:
        """Run ``action`` (on the paho thread) on the ``count``-th ``trigger``."""
        with self._lock:
            self._armed, self._action, self._count = trigger, action, count
            self.fired.clear()

    @staticmethod
    def _trigger(msg: mqtt.MQTTMessage) -> str | None:
        kind = parse_topic(msg.topic).kind
        if kind is TopicKind.ROUND:
            return "round"
        if kind is TopicKind.SUMS:
            return "sums"
        if kind is TopicKind.SEEDS:
            return "seeds"
        body = decode_message(msg.payload, max_size=1 << 24).body
        if isinstance(body, GlobalModel):
            return "model" if body.version >= 1 else None  # v0 goes out at every start
        if isinstance(body, Receipt) and body.accepted and body.message_type is not None:
            return f"receipt:{body.message_type.name.lower()}"
        return None

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.last[msg.topic] = msg.payload
        if not msg.payload or self._armed is None:
            return
        trigger = self._trigger(msg)
        with self._lock:
            if trigger != self._armed or self._action is None:
                return
            self._count -= 1
            if self._count > 0:
                return
            self._action()
            self.kills.append(trigger)
            self._armed = self._action = None
            self.fired.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_kill9_at_every_phase_boundary_the_round_completes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Kill the coordinator the moment each phase's output appears, restart at once.

    Ten rounds (each a fresh fleet and state), each killed three times: as the
    sum dictionary (sum -> update), the first seed dictionary (update -> sum2)
    and the global model (sum2 -> unmask -> idle) reach the broker. The
    participants send once and never resend, so a message turned away after a
    restart (``wrong_phase`` before the fix) would fail the round. Every round
    must publish the exact mean of all its updates, every message must get its
    ``accepted`` receipt, and no participant may get a rejection other than
    ``duplicate``.
    """
    for k in range(10):
        await _round_with_kills(tmp_path, mosquitto, f"boundary{k}", ("sums", "seeds", "model"))


async def test_kill9_with_receipts_unsent_every_counted_message_gets_accepted(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The worst instant for receipts: messages committed, nothing of it sent yet.

    The coordinator reaches the broker through a proxy that, from the moment a
    phase's input is out (round parameters, sum dictionary, all seed
    dictionaries), drops everything the coordinator sends: its acks and
    receipts never arrive. Once its database shows the phase closed (for sum2:
    the round completed), it is killed and restarted. Every message the round
    used must still get an ``accepted`` receipt (from the outbox table), and
    the broker's redeliveries — now in a later phase or round — must be
    answered ``duplicate``, never rejected.
    """
    for k in range(3):
        await _round_with_receipts_held(tmp_path, mosquitto, f"held{k}")


async def _round_with_receipts_held(tmp_path: Path, mosquitto: Mosquitto, fleet: str) -> None:
    summers, updaters = 3, 4
    proxy = await HoldingProxy(mosquitto.host, mosquitto.port).start()
    setup = make_setup(
        tmp_path / fleet,
        proxy.port,
        summers=summers,
        updaters=updaters,
        fleet_id=fleet,
        pet={"max_rounds": 2, "round_pause_s": 60.0},
        extra={"broker": {"client_id": f"coordinator-{fleet}"}, "storage": {"dir": "state"}},
    )
    db = setup.config_path.parent / "state" / "coordinator.db"
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
    killer = Killer(mosquitto.host, mosquitto.port, fleet)
    await start_all(parts)
    steps = (("round", 1, "phase = 'update'"), ("sums", 1, "phase = 'sum2'"))
    steps += (("seeds", summers, "outcome = 'completed'"),)
    try:
        for trigger, count, done in steps:
            killer.on(trigger, proxy.hold, count)
            coordinator.start()
            await wait_for(killer.fired.is_set, 60, f"{fleet}: {trigger}")
            await wait_for(functools.partial(round_row, db, done), 60, f"{fleet}: {done}")
            coordinator.kill9()
            await proxy.release()
        coordinator.start()
        await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
        await wait_for(
            lambda: all_answered(parts[:summers], parts[summers:]), 30, "every accepted receipt"
        )
        # The restarted coordinator answers the broker's redeliveries, too.
        await wait_for(
            lambda: sum(len(p.receipts) for p in parts) >= 2 * (2 * summers + updaters),
            30,
            "an answer to every redelivery",
        )
    finally:
        killer.close()
        coordinator.stop()
        await stop_all(parts)
        await proxy.stop()
    assert proxy.dropped > 0
    model = trained(parts[0])[0]
    assert dict(model.metrics)["updates"] == updaters
    assert_no_rejection(parts, coordinator.log)


def round_row(db: Path, where: str) -> bool:
    """Round 1's row in the coordinator's database matches ``where``."""
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute(f"SELECT 1 FROM rounds WHERE round_id = 1 AND {where}").fetchall()
        except sqlite3.OperationalError:
            return False
    return bool(rows)


async def _round_with_kills(
    tmp_path: Path,
    mosquitto: Mosquitto,
    fleet: str,
    triggers: tuple[str, ...],
    *,
    summers: int = 2,
    updaters: int = 3,
    commit_ms: float = 2.0,
) -> None:
    """One round 1 of a fresh fleet, the coordinator killed at each trigger in turn."""
    setup = make_setup(
        tmp_path / fleet,
        mosquitto.port,
        summers=summers,
        updaters=updaters,
        fleet_id=fleet,
        extra={
            "broker": {"client_id": f"coordinator-{fleet}"},
            "storage": {"dir": "state", "group_commit_ms": commit_ms},
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
    killer = Killer(mosquitto.host, mosquitto.port, fleet)
    await start_all(parts)
    try:
        for trigger in triggers:
            coordinator.start()
            assert coordinator.proc is not None
            killer.arm(trigger, coordinator.proc.pid)
            fired = await asyncio.to_thread(killer.fired.wait, 60)
            assert fired, f"{fleet}: no {trigger}\n{coordinator.log.read_text()[-3000:]}"
            await asyncio.to_thread(coordinator.proc.wait, 10)
        coordinator.start()  # resumes after the last kill
        await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
        await wait_for(
            lambda: all_answered(parts[:summers], parts[summers:]), 30, "every accepted receipt"
        )
        # The finished round's retained dictionaries are cleared, kill or not.
        dictionaries = [t for t in killer.last if "/sums" in t or "/seeds/" in t]
        await wait_for(
            lambda: all(not killer.last[t] for t in dictionaries), 30, "cleared dictionaries"
        )
    finally:
        killer.close()
        coordinator.stop()
        await stop_all(parts)
    assert killer.kills == list(triggers)
    assert len(dictionaries) == 1 + summers
    log = coordinator.log.read_text()
    model = trained(parts[0])[0]
    metrics = dict(model.metrics)
    assert model.version == 1, log[-3000:]
    assert metrics["updates"] == updaters, log[-3000:]
    sent = [p.sent[1] for p in parts[summers:]]
    expected = setup.initial + expected_mean(sent, 1.0)
    np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
    assert_no_rejection(parts, coordinator.log)
