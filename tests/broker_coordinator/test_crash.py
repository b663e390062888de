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
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from maskfl.protocol.errors import Reason
from maskfl.protocol.messages import MessageType
from maskfl.testing.broker import Mosquitto
from maskfl.testing.participants import (
    Behaviour,
    SimParticipant,
    expected_mean,
    start_all,
    stop_all,
    wait_for,
)
from tests.broker_coordinator.crashing import Killer, Proc, kill_with_output_held
from tests.broker_coordinator.support import Setup, fixed_delta, make_setup, trained
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


@dataclass
class CrashBed:
    """Round 1 of a fleet's simulated participants (summers first), the coordinator as a
    process that is started and killed, and a :class:`Killer` on the broker."""

    parts: list[SimParticipant]
    summers: int
    coordinator: Proc
    killer: Killer

    async def resume(self) -> None:
        """Start the coordinator once more: the round must publish its model and every
        message it used get its ``accepted`` receipt."""
        self.coordinator.start()
        await wait_for(lambda: all(trained(p) for p in self.parts), 60, "the global model")
        summers, updaters = self.parts[: self.summers], self.parts[self.summers :]
        await wait_for(lambda: all_answered(summers, updaters), 30, "every accepted receipt")


@contextlib.asynccontextmanager
async def crash_bed(
    tmp_path: Path, mosquitto: Mosquitto, setup: Setup, fleet: str
) -> AsyncIterator[CrashBed]:
    """The participants of ``setup`` started on ``mosquitto``; everything stopped after."""
    parts = setup.participants(mosquitto)
    coordinator = Proc(setup.config_path, tmp_path / f"{fleet}.log")
    killer = Killer(mosquitto.host, mosquitto.port, fleet)
    try:
        await start_all(parts)
        yield CrashBed(parts, len(setup.summers), coordinator, killer)
    finally:
        killer.close()
        coordinator.stop()
        await stop_all(parts)


def assert_no_rejection(parts: list[SimParticipant], log: Path) -> None:
    """Each message here counted, so no receipt may reject it: ``duplicate`` (a
    redelivery after a kill, in whatever phase or round) is the only other answer."""
    for p in parts:
        bad = [r for r in p.receipts if not r.accepted and r.reason is not Reason.DUPLICATE]
        assert not bad, f"{p.device} got {bad}\n{log.read_text()[-3000:]}"


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
    sum2_delay = 1.0 if phase == "sum2" else 0.0
    parts = setup.participants(
        mosquitto,
        summer=lambda k: Behaviour(sum2_delay_s=sum2_delay * k),
        updater=lambda k: Behaviour(delta=fixed_delta(k), update_delay_s=0.25 * k),
    )
    summers, updaters = parts[:SUMMERS], parts[SUMMERS:]
    coordinator = Proc(setup.config_path, tmp_path / "coordinator.log")
    await start_all(parts)
    try:
        coordinator.start()
        if phase == "update":
            await wait_for(lambda: any(p.sum_dicts for p in updaters), 30, "the sum dictionary")
            kills = sorted(rng.uniform(0.0, 2.5) for _ in range(2))
        else:
            await wait_for(lambda: any(p.seed_dicts for p in summers), 60, "the seed dictionaries")
            kills = [rng.uniform(0.1, 2.0)]
        elapsed = 0.0
        for at in kills:
            # Inherent: the kill -9 lands at a random instant of the phase on purpose.
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
    used must still get an ``accepted`` receipt (one of its stored receipts), and
    the broker's redeliveries — now in a later phase or round — must be
    answered ``duplicate``, never rejected.
    """
    for k in range(2):  # every phase twice; each round costs three process starts
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
    try:
        async with crash_bed(tmp_path, mosquitto, setup, fleet) as bed:
            await kill_with_output_held(
                bed.coordinator, bed.killer, proxy, summers=summers, what=fleet
            )
            await bed.resume()
            # The restarted coordinator answers the broker's redeliveries, too.
            await wait_for(
                lambda: sum(len(p.receipts) for p in bed.parts) >= 2 * (2 * summers + updaters),
                30,
                "an answer to every redelivery",
            )
    finally:
        await proxy.stop()
    assert proxy.dropped > 0
    model = trained(bed.parts[0])[0]
    assert dict(model.metrics)["updates"] == updaters
    assert_no_rejection(bed.parts, bed.coordinator.log)


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
    async with crash_bed(tmp_path, mosquitto, setup, fleet) as bed:
        coordinator, killer, parts = bed.coordinator, bed.killer, bed.parts
        for trigger in triggers:
            coordinator.start()
            assert coordinator.proc is not None
            killer.arm(trigger, coordinator.proc.pid)
            fired = await asyncio.to_thread(killer.fired.wait, 60)
            assert fired, f"{fleet}: no {trigger}\n{coordinator.log.read_text()[-3000:]}"
            await asyncio.to_thread(coordinator.proc.wait, 10)
        await bed.resume()  # after the last kill
        # The finished round's retained dictionaries are cleared, kill or not.
        dictionaries = [t for t in killer.last if "/sums" in t or "/seeds/" in t]
        await wait_for(
            lambda: all(not killer.last[t] for t in dictionaries), 30, "cleared dictionaries"
        )
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
