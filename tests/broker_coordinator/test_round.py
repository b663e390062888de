"""Full rounds with protocol-level simulated participants and the real coordinator.

Round logic (windows, dropouts, late and failed messages, mask groups, the privacy
floor, storage failure) runs through the in-memory harness (tests/support/harness.py):
a fake clock closes the windows, nothing sleeps. Two rounds stay on a real mosquitto
as the truth for the transport: an honest round end to end, and chunked messages
over a real socket.
"""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from maskfl.broker_coordinator.store import Store
from maskfl.protocol.chunking import ChunkFrame
from maskfl.protocol.phases import Phase
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto
from maskfl.testing.participants import (
    Behaviour,
    SimParticipant,
    expected_mean,
    start_all,
    stop_all,
    wait_for,
)
from tests.broker_coordinator.support import fixed_delta, make_setup, running_coordinator, trained
from tests.broker_coordinator.test_round_harness import check_mean, phase, reasons
from tests.support.harness import Harness, harness

pytestmark = pytest.mark.timeout(120)


def db(h: Harness) -> Store:
    """The coordinator's store, opened anew (use after the coordinator ended)."""
    return Store.open(h.setup.config_path.parent / "state" / "coordinator.db")


@pytest.mark.broker
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
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            assert coordinator.runner is not None
        model = trained(parts[0])[0]
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


def _participants(setup, host, port, behaviours):  # type: ignore[no-untyped-def]
    ca = setup.fleet.ca_public_key
    out = [
        SimParticipant(
            i, ca_public_key=ca, host=host, port=port, behaviour=behaviours.get(i.device_id)
        )
        for i in setup.summers
    ]
    for k, i in enumerate(setup.updaters):
        b = behaviours.get(i.device_id) or Behaviour()
        if b.delta is None:
            b.delta = fixed_delta(k)
        out.append(SimParticipant(i, ca_public_key=ca, host=host, port=port, behaviour=b))
    return out


@pytest.mark.broker
async def test_chunked_updates_and_masks(tmp_path, mosquitto: Mosquitto) -> None:
    m = 50_000
    setup = make_setup(
        tmp_path, mosquitto.port, summers=2, updaters=4, length=m, pet={"chunk_size": 16384}
    )
    parts = _participants(setup, mosquitto.host, mosquitto.port, {})
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            assert coordinator.ingest is not None
            assert coordinator.ingest.chunks.held == 0
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        assert metrics["updates"] == 4
        expected = setup.initial + expected_mean([p.sent[1] for p in parts[2:]], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
        assert all(r.accepted for p in parts for r in p.receipts)
    finally:
        await stop_all(parts)


async def test_summer_dropout_and_late_updaters(tmp_path) -> None:
    """One summer never sends its SUM2; one updater comes after count_min but before
    time_min (counted), one after the update phase closed (``phase_closed``, left out);
    the sum2 phase, count_min in, still waits for its time_min."""
    pet = {
        "update": {"count_min": 3, "count_max": 5, "time_min_s": 1.5, "time_max_s": 30.0},
        "sum2": {"count_min": 2, "count_max": 3, "time_min_s": 1.0},
        "max_rounds": 2,
        "round_pause_s": 30.0,  # round 2 waits (idle): the late update finds a coordinator
    }
    async with harness(tmp_path, summers=3, updaters=5, pet=pet) as h:
        s, u = h.setup.summers, h.setup.updaters
        held = [asyncio.Event(), asyncio.Event()]
        summers, updaters = h.fleet(
            {
                s[0].device_id: Behaviour(skip_sum2=True),
                u[3].device_id: Behaviour(update_gate=held[0]),
                u[4].device_id: Behaviour(update_gate=held[1]),
            }
        )
        late = updaters[4]
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[:3]), "three updates' receipts")
        h.advance(0.5)
        held[0].set()
        await h.until(lambda: bool(updaters[3].receipts), "the fourth update's receipt")
        assert reasons(updaters[3]) == [None] and phase(h) is Phase.UPDATE
        h.advance(1.0)  # time_min: the update phase closes with four
        await h.until(lambda: all(len(p.receipts) == 2 for p in summers[1:]), "two SUM2s")
        await h.settle()
        assert phase(h) is Phase.SUM2  # count_min is in, time_min is not
        h.advance(1.0)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        held[1].set()
        await h.until(lambda: bool(late.receipts), "the late updater's receipt")
        assert reasons(late) == ["phase_closed"]
        model = trained(summers[0])[0]
        metrics = dict(model.metrics)
        assert metrics["updates"] == 4 and metrics["sum2"] == 2
        check_mean(h, updaters[:4], model)


@pytest.mark.parametrize("words", ["memory", "file"])
async def test_update_whose_seed_does_not_open_is_dropped(tmp_path, words: str) -> None:
    extra = {"storage": {"dir": "state", "update_words": words}}
    async with harness(tmp_path, summers=2, updaters=4, extra=extra) as h:
        bad = h.setup.updaters[1].device_id
        summers, updaters = h.fleet({bad: Behaviour(corrupt_seed_for_all_summers=True)})
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = trained(summers[0])[0]
        metrics = dict(model.metrics)
        assert metrics["dropped"] == 1 and metrics["updates"] == 3
        check_mean(h, [p for p in updaters if p.device != bad], model)


#: (count_min, time_min_s, time_max_s) of each message phase in the chained rounds.
CHAIN_WINDOWS = {Phase.SUM: (1, 0.5, 30.0), Phase.UPDATE: (3, 0.5, 5.0), Phase.SUM2: (1, 0.2, 30.0)}


async def close_when_all_in(h: Harness) -> None:
    """In a message phase: wait until every participant with a part in it has been
    counted, then move the clock to the instant the window closes (time_min with
    count_min in, time_max without) and wait for the phase to end."""
    assert h.coordinator is not None and h.coordinator.runner is not None
    runner = h.coordinator.runner
    state, now = runner.state, runner.phase
    assert state is not None and now in CHAIN_WINDOWS
    rid = state.round_id
    counted = {Phase.SUM: state.summers, Phase.UPDATE: state.updates, Phase.SUM2: state.sum2}[now]

    def expected() -> int:
        if now is Phase.SUM2:
            return len(state.summers)
        task = Task.SUM if now is Phase.SUM else Task.UPDATE
        return sum(p.roles.get(rid) is task for p in h.participants)

    def moved_on() -> bool:
        return runner.phase is not now or runner.state is not state

    await h.until(
        lambda: (
            moved_on()
            or (all(rid in p.roles for p in h.participants) and len(counted) >= expected())
        ),
        f"every {now} message of round {rid}",
    )
    if not moved_on():
        count_min, time_min, time_max = CHAIN_WINDOWS[now]
        h.advance(time_min if len(counted) >= count_min else time_max)
        await h.until(moved_on, f"the end of round {rid}'s {now} phase")


async def test_several_rounds_chain_models(tmp_path) -> None:
    windows = {
        str(p): {"count_min": c, "count_max": 10, "time_min_s": t, "time_max_s": m}
        for p, (c, t, m) in CHAIN_WINDOWS.items()
    }
    # Later rounds draw roles at p_sum = 0.5 among eight devices: about one in seven
    # leaves fewer updaters than the privacy floor (3) and must fail.
    pet = {"max_rounds": 5, **windows}
    async with harness(tmp_path, summers=3, updaters=5, pet=pet) as h:
        summers, updaters = h.fleet()
        await h.start(summers + updaters)
        await h.start_coordinator()
        assert h.coordinator is not None
        runner = h.coordinator.runner
        assert runner is not None
        while max((m.version for m in summers[0].models), default=0) < 2:
            await h.until(
                lambda: runner.phase in CHAIN_WINDOWS or runner.phase is Phase.SHUTDOWN,
                "a message phase",
            )
            assert runner.phase is not Phase.SHUTDOWN, "five rounds without two models"
            await close_when_all_in(h)
        first, second = trained(summers[0])[:2]
        assert [first.version, second.version] == [1, 2]
        assert second.previous_digest == first.digest


async def test_storage_failure_fails_the_round_and_rejects_the_batch(tmp_path) -> None:
    async with harness(tmp_path, summers=1, updaters=2) as h:
        gate = asyncio.Event()
        summers, updaters = h.fleet(
            {i.device_id: Behaviour(update_gate=gate) for i in h.setup.updaters}
        )
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        await h.until(lambda: phase(h) is Phase.UPDATE, "the update phase")
        checkpoints = h.setup.config_path.parent / "state" / "checkpoints"
        shutil.rmtree(checkpoints)
        checkpoints.write_text("not a directory")  # every checkpoint write now fails
        gate.set()
        await h.finished()  # failure -> idle -> max_rounds reached
        assert coordinator.runner is not None and coordinator.runner.rounds_failed == 1
        async with db(h) as store:
            record = await store.get_round(1)
        assert record is not None and record.outcome == "failed"
        assert "StorageError" in (record.detail or "")
        for p in updaters:
            assert reasons(p) == ["phase_closed"]
        assert not any(trained(p) for p in h.participants)


@pytest.mark.parametrize(("floor", "bad"), [(3, 1), (2, 2)])
async def test_an_aggregate_below_the_privacy_floor_is_never_unmasked(
    tmp_path, floor: int, bad: int
) -> None:
    """Three updates accepted, but ``bad`` of them seal a seed no summer can open: the
    summers report them, they are dropped, and what is left is below
    ``privacy.min_updates``. The coordinator fails the round before unmasking and
    publishes no model (the config cannot let the update phase close that low; this
    is the floor where it is enforced, at the point of unmasking)."""
    extra = {"privacy": {"min_updates": floor}, "storage": {"dir": "state"}}
    async with harness(tmp_path, summers=2, updaters=3, extra=extra) as h:
        corrupt = {
            i.device_id: Behaviour(corrupt_seed_for_all_summers=True)
            for i in h.setup.updaters[:bad]
        }
        summers, updaters = h.fleet(corrupt)
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        await h.finished()  # failure -> idle -> max_rounds reached
        assert coordinator.runner is not None and coordinator.runner.rounds_failed == 1
        async with db(h) as store:
            record = await store.get_round(1)
            models = await store.models()
        assert record is not None and record.outcome == "failed"
        assert f"privacy.min_updates = {floor}" in (record.detail or ""), record.detail
        assert f"only {3 - bad} of the round's updates" in (record.detail or "")
        assert [m.version for m in models if m.version >= 1] == []
        assert not any(trained(p) for p in h.participants)
        # The updates themselves were accepted: the floor is about unmasking, not intake.
        for p in updaters:
            assert reasons(p) == [None], p.receipts


def test_shortfall_reasons() -> None:
    from maskfl.broker_coordinator.errors import shortfall_reason

    assert shortfall_reason(Phase.SUM, 0, 1, 15.0) == (
        "no device drew the summer task this round (sum phase: 0 of at least 1 messages in 15 s)"
    )
    assert shortfall_reason(Phase.UPDATE, 1, 3, 14.2).startswith(
        "only 1 of the 3 required updates arrived (update phase: 1 of at least 3"
    )
    assert shortfall_reason(Phase.UPDATE, 0, 3, 5.0).startswith("no update arrived")
    assert shortfall_reason(Phase.SUM2, 0, 2, 30.0).startswith(
        "only 0 of the 2 required summers sent their aggregated masks"
    )


async def test_round_with_two_mask_groups(tmp_path) -> None:
    """g = 2: every updater seals one seed per group, each group's summers return their
    group's mask (one of group 1 drops out, the other answers late: the sum2 phase waits
    past time_min for a group without an answer), and the coordinator unmasks with one
    agreed mask per group."""
    pet = {"sum2": {"count_min": 2, "count_max": 4, "time_min_s": 0.2}}
    async with harness(tmp_path, summers=4, updaters=4, groups=2, pet=pet) as h:
        s = h.setup.summers  # summer i is in group i % 2
        summers, updaters = h.fleet({s[3].device_id: Behaviour(skip_sum2=True)})
        slow = h.broker.hold(Topics(h.setup.fleet.fleet).sum2(1, s[1].device_id))
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(len(p.receipts) == 2 for p in summers[::2]), "group 0's SUM2s")
        await h.until(lambda: len(slow.held) == 1, "group 1's SUM2, held back")
        h.advance(29.5)  # past time_min (count_min in), just before time_max
        await h.settle()
        assert phase(h) is Phase.SUM2  # group 1 has not answered: keep waiting
        assert slow.release() == 1
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = trained(summers[0])[0]
        metrics = dict(model.metrics)
        assert metrics["groups"] == 2 and metrics["sum2"] == 3 and metrics["mask_votes"] == 3
        assert metrics["updates"] == 4 and metrics["dropped"] == 0
        assert all(len(p.sent[1].seeds) == 2 for p in updaters)
        check_mean(h, updaters, model)
        for p in h.participants:
            assert not p.errors, p.errors


async def test_a_mask_group_without_a_summer_fails_the_round(tmp_path) -> None:
    async with harness(tmp_path, summers=2, updaters=3, groups=2, fill=1) as h:
        summers, updaters = h.fleet()
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        # Both sums in (count_max): the phase closes at once, and finds group 1 empty.
        await h.finished()  # failure -> idle -> max_rounds reached
        assert coordinator.runner is not None and coordinator.runner.rounds_failed == 1
        reason = coordinator.status()["last_failure"]["reason"]
        assert reason.startswith("mask group(s) 1 of 2 drew no summer this round"), reason
        assert "summers per group 0: 2, 1: 0" in reason
        assert not any(p.sent for p in h.participants), "no updater may seal a seed to nobody"


async def test_the_sum_phase_waits_past_time_min_for_a_group_without_a_summer(
    tmp_path,
) -> None:
    """count_min summers are in at time_min, all of group 0: the phase keeps waiting
    (until time_max) and group 1's summer, starting late, completes the round."""
    pet = {"sum": {"count_min": 2, "count_max": 3, "time_min_s": 0.2}}
    async with harness(tmp_path, summers=3, updaters=3, groups=2, fill=2, pet=pet) as h:
        summers, _ = h.fleet()
        late = summers[1]  # the only summer in group 1
        early = [p for p in h.participants if p is not late]
        await h.start(early)
        coordinator = await h.start_coordinator()
        await h.until(lambda: all(len(p.receipts) == 1 for p in summers[::2]), "group 0's two sums")
        h.advance(29.5)  # well past time_min with 2 summers of group 0, before time_max
        await h.settle()
        status = coordinator.status()  # g and each summer's group are public
        assert status["phase"] == "sum" and status["groups"] == 2, status
        assert status["summer_groups"] == [
            {"device": d, "group": 0} for d in sorted(s.device_id for s in h.setup.summers[::2])
        ], status
        rounds = (await coordinator.dashboard())["rounds"]
        assert [(r["round_id"], r["groups"]) for r in rounds] == [(1, 2)], rounds
        await h.start([late])
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        assert coordinator.runner is not None and coordinator.runner.rounds_failed == 0
        metrics = dict(trained(summers[0])[0].metrics)
        assert metrics["summers"] == 3 and metrics["groups"] == 2 and metrics["updates"] == 3


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "stop"])
async def test_a_coordinator_restarted_mid_update_phase_goes_on_with_the_store(
    tmp_path, crash: bool
) -> None:
    """Two of four updates are committed when the coordinator is thrown away (or
    stopped as a service stop would); a new one on the same SQLite files resumes the
    update phase with them, takes the other two, and publishes the mean of all four."""
    async with harness(tmp_path, summers=2, updaters=4) as h:
        gate = asyncio.Event()
        held = {i.device_id: Behaviour(update_gate=gate) for i in h.setup.updaters[2:]}
        summers, updaters = h.fleet(held)
        await h.start(summers + updaters)
        first = await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[:2]), "two updates' receipts")
        second = await h.restart_coordinator(crash=crash)
        assert second is not first and second.runner is not None
        assert second.runner.phase is Phase.UPDATE and second.runner.state is not None
        assert len(second.runner.state.updates) == 2
        gate.set()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = trained(summers[0])[0]
        assert model.version == 1 and dict(model.metrics)["updates"] == 4
        check_mean(h, updaters, model)
        assert all(reasons(p) == [None] * len(p.receipts) for p in h.participants)


async def test_an_update_delivered_twice_while_it_is_handled_counts_once(tmp_path) -> None:
    """The coordinator's link drops just after it took an update and before it could
    acknowledge it: the broker delivers the update again while the first copy is being
    admitted. It counts once, and every answer about it says it counted."""
    async with harness(tmp_path, summers=2, updaters=4) as h:
        summers, updaters = h.fleet()
        twice = updaters[0]
        await h.start(summers)
        coordinator = await h.start_coordinator()
        topic = Topics(h.setup.fleet.fleet).update(1, twice.device)
        h.drop_link_after(coordinator.transport, topic)
        await h.start(updaters)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        assert coordinator.transport is not None
        assert coordinator.transport.stats.redelivered >= 1
        model = trained(summers[0])[0]
        assert dict(model.metrics)["updates"] == 4
        check_mean(h, updaters, model)
        await h.until(lambda: len(twice.receipts) == 2, "both answers")
        assert sorted(reasons(twice), key=str) == [None, "duplicate"]
        assert twice.receipts[0].message_digest == twice.receipts[1].message_digest


async def test_an_update_whose_chunks_arrive_in_reverse_order_counts(tmp_path) -> None:
    """Chunk frames may arrive in any order (a broker promises order per client and
    topic only over one session): one updater's frames are held back and delivered
    last frame first, after the other updates; the coordinator reassembles the update
    and counts it like any other."""
    pet = {"chunk_size": 16384}
    async with harness(tmp_path, summers=2, updaters=3, length=50_000, pet=pet) as h:
        summers, updaters = h.fleet()
        late = updaters[0]
        frames = h.broker.hold(Topics(h.setup.fleet.fleet).update(1, late.device))

        def whole() -> bool:
            return (
                bool(frames.held) and len(frames.held) == ChunkFrame.parse(frames.held[0][1]).count
            )

        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[1:]), "two updates' receipts")
        await h.until(whole, "every frame of the held update")
        assert len(frames.held) > 2
        frames.release(reverse=True)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        assert reasons(late) == [None]
        model = trained(summers[0])[0]
        assert dict(model.metrics)["updates"] == 3
        check_mean(h, updaters, model)
