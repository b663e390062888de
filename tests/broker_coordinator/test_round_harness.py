"""Round logic through the in-memory harness: no broker, no sleep, a fake clock.

Each test drives a real coordinator (SQLite store, numpy aggregator) with simulated
participants; windows close only when the test advances the clock.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from maskfl.broker_coordinator.service import Coordinator
from maskfl.broker_coordinator.store import Store
from maskfl.protocol.masking import aggregate_mask, update_words
from maskfl.protocol.messages import GlobalModel, RoundParams, Sum2, decode_message
from maskfl.protocol.phases import Phase
from maskfl.testing.participants import Behaviour, SimParticipant, expected_mean
from tests.broker_coordinator.support import trained
from tests.support.harness import Harness, harness

pytestmark = pytest.mark.timeout(60)


def reasons(p: SimParticipant) -> list[str | None]:
    return [None if r.accepted else str(r.reason) for r in p.receipts]


def the_model(parts: list[SimParticipant]) -> GlobalModel:
    models = trained(parts[0])
    assert [m.version for m in models] == [1]
    return models[0]


def phase(h: Harness) -> Phase:
    assert h.coordinator is not None and h.coordinator.runner is not None
    return h.coordinator.runner.phase


def round_params(h: Harness) -> RoundParams:
    assert h.coordinator is not None and h.coordinator.runner is not None
    state = h.coordinator.runner.state
    assert state is not None
    body = decode_message(state.record.params, max_size=len(state.record.params)).body
    assert isinstance(body, RoundParams)
    return body


def check_mean(h: Harness, included: list[SimParticipant], model: GlobalModel) -> None:
    metrics = dict(model.metrics)
    expected = h.setup.initial + expected_mean([p.sent[1] for p in included], 1.0)
    np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)


async def test_a_round_publishes_the_weighted_mean_without_time_passing(tmp_path) -> None:
    async with harness(tmp_path, summers=3, updaters=5) as h:
        summers, updaters = h.fleet()
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(trained(p) for p in h.participants), "global model")
        await h.finished()  # max_rounds = 1
        model = the_model(h.participants)
        assert model.version == 1 and dict(model.metrics)["updates"] == 5
        check_mean(h, updaters, model)
        assert all(reasons(p) == [None] * len(p.receipts) for p in h.participants)
        assert sum(len(p.receipts) for p in h.participants) == 3 + 5 + 3
        assert not [e for p in h.participants for e in p.errors]


@pytest.mark.parametrize(("time_min_s", "time_max_s"), [(20.0, 60.0), (60.0, 60.0)])
async def test_the_update_window_closes_at_its_time_with_count_min(
    tmp_path, time_min_s: float, time_max_s: float
) -> None:
    """count_min (3) is reached at once, count_max (5) never: the window stays open to
    the instant time_min allows closing (time_max when they are equal), not one tick
    more or less; a message just before is counted, one just after is phase_closed."""
    window = {"count_min": 3, "count_max": 5, "time_min_s": time_min_s, "time_max_s": time_max_s}
    # A second round that waits (idle) so the late update still finds a coordinator.
    pet = {"update": window, "max_rounds": 2, "round_pause_s": 3600.0}
    async with harness(tmp_path, summers=2, updaters=5, pet=pet) as h:
        held = [asyncio.Event(), asyncio.Event()]
        late = {
            i.device_id: Behaviour(update_gate=g)
            for i, g in zip(h.setup.updaters[3:], held, strict=True)
        }
        summers, updaters = h.fleet(late)
        await h.start(summers + updaters)
        await h.start_coordinator()
        prompt = updaters[:3]
        await h.until(lambda: all(p.receipts for p in prompt), "the first three updates' receipts")
        assert phase(h) is Phase.UPDATE
        h.advance(time_min_s - 0.5)
        held[0].set()
        await h.until(lambda: bool(updaters[3].receipts), "the fourth update's receipt")
        assert reasons(updaters[3]) == [None]  # still open half a second before
        h.advance(0.5)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        held[1].set()
        await h.until(lambda: bool(updaters[4].receipts), "the late update's receipt")
        assert reasons(updaters[4]) == ["phase_closed"]
        model = the_model(h.participants)
        assert dict(model.metrics)["updates"] == 4
        check_mean(h, updaters[:4], model)


async def test_a_sum_phase_without_summers_fails_with_the_reason_in_words(tmp_path) -> None:
    async with harness(tmp_path, summers=1, updaters=3, pet={"sum": {"time_max_s": 30.0}}) as h:
        _, updaters = h.fleet()
        await h.start(updaters)  # the one device that drew the summer task is offline
        coordinator = await h.start_coordinator()
        await h.until(lambda: phase(h) is Phase.SUM, "the sum phase")
        h.advance(30.0)
        await h.finished()  # failure -> idle -> max_rounds reached
        assert coordinator.runner is not None and coordinator.runner.rounds_failed == 1
        async with Store.open(tmp_path / "coordinator" / "state" / "coordinator.db") as store:
            record = await store.last_round()
        assert record is not None and record.outcome == "failed"
        assert record.detail == (
            "no device drew the summer task this round (sum phase: 0 of at least 1 "
            "messages in 30 s)"
        )
        assert not any(p.receipts or trained(p) for p in updaters)


async def test_an_updater_that_drops_out_is_left_out_of_the_mean(tmp_path) -> None:
    window = {"count_min": 3, "count_max": 5, "time_min_s": 10.0, "time_max_s": 60.0}
    async with harness(tmp_path, summers=3, updaters=5, pet={"update": window}) as h:
        gone = h.setup.updaters[2].device_id
        summers, updaters = h.fleet({gone: Behaviour(update_gate=asyncio.Event())})
        await h.start(summers + updaters)
        await h.start_coordinator()
        stayed = [p for p in updaters if p.device != gone]
        await h.until(lambda: all(p.receipts for p in stayed), "four updates' receipts")
        h.advance(10.0)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = the_model(h.participants)
        metrics = dict(model.metrics)
        assert metrics["updates"] == 4 and metrics["sum2"] == 3
        check_mean(h, stayed, model)
        dropped = next(p for p in updaters if p.device == gone)
        assert dropped.receipts == [] and 1 not in dropped.sent


async def test_a_repeated_update_is_answered_duplicate_and_counts_once(tmp_path) -> None:
    async with harness(tmp_path, summers=2, updaters=4) as h:
        gate = asyncio.Event()
        last = h.setup.updaters[3].device_id
        summers, updaters = h.fleet({last: Behaviour(update_gate=gate)})
        await h.start(summers + updaters)
        await h.start_coordinator()
        first = updaters[0]
        await h.until(lambda: all(p.receipts for p in updaters[:3]), "three updates' receipts")
        sent = [m for m in first.transport.published if "/update/" in m.topic]
        assert sent
        for m in sent:  # the same signed bytes again
            await first.transport.publish(m.topic, m.payload, qos=1)
        await h.until(lambda: len(first.receipts) == 2, "the repeat's receipt")
        assert reasons(first) == [None, "duplicate"]
        assert first.receipts[0].message_digest == first.receipts[1].message_digest
        gate.set()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = the_model(h.participants)
        assert dict(model.metrics)["updates"] == 4
        check_mean(h, updaters, model)


async def test_messages_for_another_phase_or_round_are_turned_away(tmp_path) -> None:
    async with harness(tmp_path, summers=2, updaters=3) as h:
        gate = asyncio.Event()
        summers, updaters = h.fleet({h.setup.updaters[2].device_id: Behaviour(update_gate=gate)})
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[:2]), "two updates' receipts")
        assert phase(h) is Phase.UPDATE
        params = round_params(h)
        rid = int(params.round_id)
        eve = summers[0]
        words = aggregate_mask([], update_words(params.vector_length), params.mask.word_bits)
        early = eve.sign(Sum2(eve.identity.certificate, words, ()), rid)
        await eve.transport.publish(eve.topics.sum2(rid, eve.device), early, qos=1)
        await h.until(lambda: len(eve.receipts) == 2, "the early sum2's receipt")
        assert reasons(eve) == [None, "wrong_phase"]
        future = eve.sign(Sum2(eve.identity.certificate, words, ()), rid + 6)
        await eve.transport.publish(eve.topics.sum2(rid + 6, eve.device), future, qos=1)
        await h.until(lambda: len(eve.receipts) == 3, "the future round's receipt")
        assert reasons(eve) == [None, "wrong_phase", "wrong_round"]
        gate.set()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        assert dict(the_model(h.participants).metrics)["sum2"] == 2


async def test_a_new_coordinator_resumes_the_round_from_the_store(tmp_path) -> None:
    """Two of three sums are committed when the coordinator object is thrown away; a
    new one on the same store goes on with them: the third sum closes the phase."""
    async with harness(tmp_path, summers=3, updaters=3) as h:
        summers, updaters = h.fleet()
        await h.start(summers[:2] + updaters)
        first = await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in summers[:2]), "two sums' receipts")
        assert first.runner is not None and len(first.runner.state.summers) == 2  # type: ignore[union-attr]
        await h.discard_coordinator()
        h.advance(5.0)
        second: Coordinator = await h.start_coordinator()
        assert second is not first and second.runner is not None
        assert second.runner.phase is Phase.SUM and second.runner.state is not None
        assert len(second.runner.state.summers) == 2
        await h.start(summers[2:])
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        model = the_model(h.participants)
        assert model.round_id == 1 and dict(model.metrics)["sum2"] == 3
        check_mean(h, updaters, model)
        assert all(reasons(p) == [None] * len(p.receipts) for p in h.participants)


async def test_a_failed_round_says_why_in_words(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Two of the three required updates by time_max: the round fails, and the status,
    the round's record and the log say so in words (not an exception's name)."""
    window = {"count_min": 3, "count_max": 3, "time_min_s": 0.0, "time_max_s": 3.0}
    async with harness(tmp_path, summers=1, updaters=3, pet={"update": window}) as h:
        late = h.setup.updaters[2].device_id
        summers, updaters = h.fleet({late: Behaviour(update_gate=asyncio.Event())})
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in updaters[:2]), "two updates' receipts")
        h.advance(3.0)
        await h.finished()  # failure -> idle -> max_rounds reached
        status = coordinator.status()
        async with Store.open(tmp_path / "coordinator" / "state" / "coordinator.db") as store:
            record = await store.get_round(1)
    words = "only 2 of the 3 required updates arrived"
    assert status["rounds_failed"] == 1 and status["last_failure"]["round_id"] == 1
    reason = status["last_failure"]["reason"]
    assert reason == f"{words} (update phase: 2 of at least 3 messages in 3 s)"
    assert record is not None and record.outcome == "failed" and record.detail == reason
    logged = [r.getMessage() for r in caplog.records if "round 1 failed" in r.getMessage()]
    assert logged == [f"round 1 failed: {reason}"]


async def test_a_message_that_counted_is_answered_duplicate_after_its_sender_is_revoked(
    tmp_path,
) -> None:
    """Issue 10 item 4: a redelivery of a message the coordinator committed gets its
    original outcome in any later phase or round, never a rejection. Here the device
    is revoked after its update counted (an operator's revoke while the coordinator
    was down) and the broker redelivers the update after the round: the answer is
    ``duplicate``, not ``revoked``."""
    async with harness(
        tmp_path,
        summers=2,
        updaters=3,
        pet={"max_rounds": 2},
        extra={"fleet": {"revocations_file": "revocations.bin"}},
    ) as h:
        summers, updaters = h.fleet()
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        assert h.coordinator is not None and h.coordinator.runner is not None
        runner = h.coordinator.runner
        await h.until(lambda: runner.state is not None and runner.state.round_id == 2, "round 2")
        first = updaters[0]
        assert reasons(first) == [None]
        path = h.setup.config_path.parent / "revocations.bin"
        h.setup.fleet.revocations(path, [first.identity.certificate.serial], 1)
        assert h.coordinator.services is not None
        assert h.coordinator.services.enrollment.reload_if_changed()
        sent = [m for m in first.transport.published if "/update/" in m.topic]
        assert sent
        counted = first.receipts[0].message_digest
        for m in sent:  # the broker's redelivery: the same signed bytes again
            await first.transport.publish(m.topic, m.payload, qos=1)

        # The device may also take part in round 2 meanwhile (its own messages get
        # their own receipts): look only at the answers about the redelivered update.
        def answers() -> list[str | None]:
            return [
                None if r.accepted else str(r.reason)
                for r in first.receipts
                if r.message_digest == counted
            ]

        await h.until(lambda: len(answers()) == 2, "the redelivery's receipt")
        assert answers() == [None, "duplicate"], first.receipts


async def test_the_per_message_limit_is_the_spec_formula(tmp_path) -> None:
    """protocol.md §9: SUM, UPDATE and SUM2 share one limit, 490 + max(112·sum.count_max,
    32·update.count_max) + (M + 4)·w/8 bytes; one byte more is
    `oversize`, a message of exactly the limit is judged by its bytes (here `malformed`,
    like a 503-byte SUM)."""
    async with harness(tmp_path, summers=3, updaters=3) as h:
        summers, updaters = h.fleet()
        eve = summers[0]
        await h.start(summers + updaters)
        await h.start_coordinator()
        await h.until(lambda: len(eve.receipts) == 1, "the summer's receipt")
        params = round_params(h)
        assert h.coordinator is not None
        pet = h.coordinator.config.pet
        words = params.vector_length + 4
        limit = 490 + max(112 * pet.sum.count_max, 32 * pet.update.count_max)
        limit += words * params.mask.word_bits // 8
        rid = int(params.round_id)
        for size in (limit + 1, limit):
            garbage = bytes([0xA5]) * size
            await eve.transport.publish(eve.topics.sum(rid, eve.device), garbage, qos=1)
        await h.until(lambda: len(eve.receipts) == 3, "both receipts")
        assert reasons(eve) == [None, "oversize", "malformed"]


async def test_a_sum2_failing_every_update_is_within_the_limit(tmp_path) -> None:
    """A summer whose 40 seeds all fail to open lists 40 digests (1,280 B) in its SUM2:
    an honest message the per-message limit must admit (§9: it counts 32 B for each
    update the round can accept)."""
    async with harness(tmp_path, summers=1, updaters=40) as h:
        corrupt = {
            i.device_id: Behaviour(corrupt_seed_for_all_summers=True) for i in h.setup.updaters
        }
        summers, updaters = h.fleet(corrupt)
        await h.start(summers + updaters)
        await h.start_coordinator()
        summer = summers[0]
        await h.until(lambda: len(summer.receipts) == 2, "the SUM2's receipt", limit_s=60)
        assert reasons(summer) == [None, None]


async def armed(h: Harness, seconds: float) -> float:
    """Return once the coordinator waits on its clock until ``seconds`` from now (a
    pause): nothing else can move it then, so the test's next advance is what ends
    the pause. Returns when the pause ends."""
    end = h.clock() + seconds
    await h.until(lambda: end in h.clock.sleeps, f"a {seconds} s pause")
    return end


async def test_the_pause_between_rounds_runs_on_the_coordinators_clock(tmp_path) -> None:
    pet = {"round_pause_s": 30.0, "max_rounds": 2}
    async with harness(tmp_path, summers=3, updaters=3, pet=pet) as h:
        summers, updaters = h.fleet()
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        runner = coordinator.runner
        assert runner is not None
        await h.until(lambda: all(trained(p) for p in h.participants), "round 1's model")
        end = await armed(h, 30.0)
        assert runner.phase is Phase.IDLE and runner.state is None
        h.advance(29.0)
        assert h.clock.sleeps == [end]  # 1 s to go: the pause still waits
        assert runner.phase is Phase.IDLE and runner.state is None
        h.advance(1.0)
        await h.until(lambda: runner.state is not None, "round 2")
        assert round_params(h).round_id == 2


async def test_the_pause_after_a_failed_round_runs_on_the_coordinators_clock(tmp_path) -> None:
    pet = {"sum": {"time_max_s": 30.0}, "failure_pause_s": 60.0, "max_rounds": 2}
    async with harness(tmp_path, summers=1, updaters=3, pet=pet) as h:
        _, updaters = h.fleet()
        await h.start(updaters)  # the summer is offline: round 1 fails
        coordinator = await h.start_coordinator()
        runner = coordinator.runner
        assert runner is not None
        await h.until(lambda: phase(h) is Phase.SUM, "the sum phase")
        h.advance(30.0)
        end = await armed(h, 60.0)
        assert runner.phase is Phase.FAILURE and runner.rounds_failed == 1
        h.advance(59.0)
        assert h.clock.sleeps == [end]  # 1 s to go: the pause still waits
        assert runner.phase is Phase.FAILURE and runner.state is None
        h.advance(1.0)
        await h.until(lambda: runner.state is not None, "round 2")
        assert round_params(h).round_id == 2 and phase(h) is Phase.SUM


async def test_the_group_commit_window_runs_on_the_coordinators_clock(tmp_path) -> None:
    """Two sums wait in one open batch (a 10 s window) until the clock passes it: no
    receipt before, both after, in one commit."""
    storage = {"group_commit_ms": 10_000.0}
    async with harness(tmp_path, summers=2, updaters=3, extra={"storage": storage}) as h:
        summers, _ = h.fleet()
        coordinator = await h.start_coordinator()
        runner, services = coordinator.runner, coordinator.services
        assert runner is not None and services is not None
        await h.start(summers)
        await h.spin_until(
            lambda: (
                runner.state is not None
                and len(runner.state.pending) == 2
                and not runner.committer.pending
            ),
            "both sums admitted and held by the committer",
        )
        assert runner.state is not None
        before = commits(coordinator)
        assert not any(p.receipts for p in summers) and len(runner.state.summers) == 0
        await h.fire_timer(10.0, "the batch's window")
        assert not any(p.receipts for p in summers) and len(runner.state.summers) == 0
        h.advance(10.0)
        await h.until(lambda: all(p.receipts for p in summers), "both sums' receipts", 5)
        assert [reasons(p) for p in summers] == [[None], [None]]
        assert commits(coordinator) == before + 1


def commits(coordinator: Coordinator) -> float:
    """Group commits so far (the batch-size histogram's count)."""
    assert coordinator.services is not None
    (family,) = coordinator.services.metrics.batch_size.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))
