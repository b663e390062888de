"""The coordinator does not read heartbeats in a round's update and sum2 phases
(``runner.NO_HEARTBEATS_IN``): it unsubscribes from ``status/+`` as update opens and
subscribes again, without retained messages, when the round leaves sum2 (unmask,
failure, a restart), and the alive window does not run while it is not listening."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from maskfl.broker_coordinator.context import Services
from maskfl.broker_coordinator.service import Coordinator
from maskfl.protocol.phases import Phase
from maskfl.protocol.topics import Topics
from maskfl.testing.participants import Behaviour
from maskfl.transport import MemoryTransport
from tests.broker_coordinator.support import trained
from tests.support.harness import Harness, harness

pytestmark = pytest.mark.timeout(60)

# A second round waits in idle (round_pause_s) so the test sees the coordinator there.
TWO_ROUNDS = {"max_rounds": 2, "round_pause_s": 3600.0}


def parts(c: Coordinator) -> tuple[Services, MemoryTransport]:
    assert c.services is not None and isinstance(c.transport, MemoryTransport)
    return c.services, c.transport


async def listening(h: Harness, c: Coordinator, on: bool) -> None:
    """Wait until the coordinator's subscription to the status topics is ``on``."""
    s, transport = parts(c)
    status = s.topics.status_filter()
    await h.spin_until(
        lambda: s.liveness.listening is on and (status in transport.subscriptions) is on,
        f"status topics {'subscribed' if on else 'unsubscribed'}",
    )


def phase(c: Coordinator) -> Phase:
    assert c.runner is not None
    return c.runner.phase


async def test_heartbeats_reach_liveness_in_sum_and_idle_not_in_update_and_sum2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "maskfl.coordinator.liveness")
    pet = {**TWO_ROUNDS, "sum2": {"time_max_s": 30.0}}
    async with harness(tmp_path, summers=2, updaters=3, pet=pet) as h:
        topics = Topics(h.setup.fleet.fleet)
        gate = asyncio.Event()
        summers, updaters = h.fleet(
            {
                h.setup.updaters[2].device_id: Behaviour(update_gate=gate),
                h.setup.summers[1].device_id: Behaviour(skip_sum2=True),
            }
        )
        fleet = await h.client("fleet")
        c = await h.start_coordinator()
        s, _ = parts(c)
        heard = s.liveness.last_heard

        async def beat(device: str, *, retain: bool = False) -> None:
            await fleet.publish(topics.status(device), b"hb", qos=0, retain=retain)

        await h.until(lambda: phase(c) is Phase.SUM, "the sum phase")  # no summer yet
        await listening(h, c, True)
        await beat("hb-sum")
        assert "hb-sum" in heard and c.status()["liveness_listening"] is True

        await h.start(summers + updaters)
        await h.until(lambda: phase(c) is Phase.UPDATE, "the update phase")
        await listening(h, c, False)
        await beat("hb-update")
        await beat("hb-retained", retain=True)  # a device may retain on its own topic
        assert "hb-update" not in heard and "hb-retained" not in heard
        assert c.status()["liveness_listening"] is False
        assert s.metrics.liveness_listening._value.get() == 0

        gate.set()
        await h.until(lambda: phase(c) is Phase.SUM2, "the sum2 phase")
        assert not s.liveness.listening
        await beat("hb-sum2")
        assert "hb-sum2" not in heard

        await h.fire_timer(30.0, "the sum2 window")  # one sum2 of two: the round fails
        await h.until(lambda: phase(c) is Phase.IDLE, "idle")
        await beat("hb-idle")
        assert "hb-idle" in heard
        # Resubscribing pulled no retained status message; one pause, logged once.
        assert "hb-retained" not in heard
        assert c.status()["liveness_listening"] is True
        assert s.metrics.liveness_listening._value.get() == 1
        lines = [r.getMessage() for r in caplog.records if r.name.endswith("liveness")]
        assert sum("heartbeats not read" in m for m in lines) == 1, lines
        assert sum("reading heartbeats again" in m for m in lines) == 1, lines
        # The round that failed is named on the line of the resume after it.
        assert any("reading heartbeats again (round 1 in failure)" in m for m in lines), lines


async def test_a_device_heard_before_a_pause_longer_than_the_window_stays_alive(
    tmp_path: Path,
) -> None:
    window = {"time_max_s": 600.0}
    pet = {**TWO_ROUNDS, "alive_window_s": 60.0, "sum": window, "update": window}
    async with harness(tmp_path, summers=2, updaters=3, pet=pet) as h:
        topics = Topics(h.setup.fleet.fleet)
        gate = asyncio.Event()
        summers, updaters = h.fleet({h.setup.updaters[2].device_id: Behaviour(update_gate=gate)})
        fleet = await h.client("fleet")
        c = await h.start_coordinator()
        s, _ = parts(c)
        await h.until(lambda: phase(c) is Phase.SUM, "the sum phase")
        await listening(h, c, True)
        await fleet.publish(topics.status("hb-old"), b"hb", qos=0)
        h.advance(30.0)  # half the window gone before the round
        await h.start(summers + updaters)
        await h.until(lambda: phase(c) is Phase.UPDATE, "the update phase")
        await listening(h, c, False)
        h.advance(120.0)  # paused twice the window
        await h.settle()
        s.alive_count()
        assert "hb-old" in s.liveness
        gate.set()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        await h.until(lambda: phase(c) is Phase.IDLE, "idle")
        await listening(h, c, True)
        assert "hb-old" in s.liveness and s.alive_count() == 1 + 2 + 3
        # The window runs again: the other half of it, and hb-old is gone.
        h.advance(29.0)
        s.alive_count()
        assert "hb-old" in s.liveness
        h.advance(2.0)
        s.alive_count()
        assert "hb-old" not in s.liveness


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "stop"])
async def test_a_coordinator_restarted_in_the_update_phase_listens_only_after_it(
    tmp_path: Path, crash: bool
) -> None:
    async with harness(tmp_path, summers=2, updaters=3, pet=TWO_ROUNDS) as h:
        topics = Topics(h.setup.fleet.fleet)
        gate = asyncio.Event()
        summers, updaters = h.fleet({h.setup.updaters[2].device_id: Behaviour(update_gate=gate)})
        fleet = await h.client("fleet")
        await h.start(summers + updaters)
        first = await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[:2]), "two updates' receipts")
        assert phase(first) is Phase.UPDATE
        second = await h.restart_coordinator(crash=crash)
        s, transport = parts(second)
        assert phase(second) is Phase.UPDATE
        # Not subscribed once it serves (the start waits for the resumed phase's choice).
        assert s.topics.status_filter() not in transport.subscriptions
        assert not s.liveness.listening and second.status()["liveness_listening"] is False
        await fleet.publish(topics.status("hb-update"), b"hb", qos=0)
        assert "hb-update" not in s.liveness
        gate.set()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        await h.until(lambda: phase(second) is Phase.IDLE, "idle")
        await listening(h, second, True)
        await fleet.publish(topics.status("hb-idle"), b"hb", qos=0)
        assert "hb-idle" in s.liveness
