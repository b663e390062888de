"""Real agents and the real coordinator through the in-memory harness (no broker).

Every agent here is a real :class:`Agent` (SQLite journal, LiteRT training on the
digits data, PyNaCl) on the harness's memory broker and fake clock, with the real
coordinator. The tests walk the agent's step machine (:mod:`maskfl.agent.steps`)
through its paths: selected as summer, updater or neither; a round dropped mid-way;
a rejected message; a lost, a duplicate and a late receipt; a restart mid-round from
the journal. Nothing sleeps: a test waits on broker traffic for a state it names,
holds back chosen messages (the harness broker's ``hold``) to put the agent where it
wants it, and moves the fake clock to close a phase window or to run out an agent's
receipt timeout (the agents' timers are on the same clock). The same round over a real
mosquitto, with the model recomputed, is tests/agent/test_with_coordinator.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from maskfl.agent.daemon import Agent
from maskfl.agent.state import ReceiptStatus
from maskfl.agent.steps import Step
from maskfl.agent.training import LocalTrainer
from maskfl.protocol.identity import Identity
from maskfl.protocol.messages import GlobalModel, Receipt, decode_message, weights_digest
from maskfl.protocol.sortition import Task, next_round_seed, select_task
from maskfl.protocol.topics import TopicKind, Topics
from maskfl.testing.fleet import write_agent_bundle
from tests.broker_coordinator.support import P_SUM
from tests.support.harness import UNUSED_PORT, Harness, Hold, TrafficBroker, harness

pytestmark = pytest.mark.timeout(120)

INITIAL = LocalTrainer.shipped("mlp").get_weights()
#: The summer's and the updater's happy paths, one entry per journaled step.
SUMMER_PATH = ["sum_sent", "seeds_received", "sum2_sent", "done"]
UPDATER_PATH = ["waiting_sums", "trained", "update_sent", "done"]


def release_where(hold: Hold, which: Callable[[str, bytes], bool]) -> int:
    """Deliver the held messages ``which`` picks (in order), keep holding the rest."""
    out = [m for m in hold.held if which(m[0], m[1])]
    hold.held = [m for m in hold.held if m not in out]
    for message in out:
        hold.broker.route(*message)
    return len(out)


@dataclass
class Fleet:
    """The harness and a factory of real agents for its identities."""

    h: Harness
    broker: TrafficBroker
    tmp: Path
    topics: Topics
    stack: contextlib.AsyncExitStack

    def config(self, identity: Identity, extra: str = "") -> Path:
        fleet = self.h.setup.fleet
        return write_agent_bundle(
            self.tmp / identity.certificate.subject,
            identity,
            fleet=fleet.fleet,
            ca_public_key_file=fleet.write_ca(self.tmp / "ca.pub"),
            port=UNUSED_PORT,
            shard=abs(hash(identity.device_id)) % 4,
            extra=extra,
        )

    async def agents(self, identities: Sequence[Identity], extra: str = "") -> list[Agent]:
        """Real agents for ``identities``, running until the test's fleet closes."""
        return [
            await self.stack.enter_async_context(self.h.agent(self.config(i, extra)))
            for i in identities
        ]

    async def until_step(self, agent: Agent, round_id: int, *steps: Step) -> None:
        def there() -> bool:
            d = agent.driver
            return d is not None and d.round_id == round_id and d.step in steps

        await self.h.until(there, f"{agent.device} in round {round_id} at {steps}")

    def model(self) -> GlobalModel:
        retained = self.broker.retained[self.topics.model_latest("mlp")].payload
        body = decode_message(retained, max_size=len(retained)).body
        assert isinstance(body, GlobalModel)
        return body

    def is_receipt_for(self, device: str) -> Callable[[str], bool]:
        def match(topic: str) -> bool:
            parsed = self.topics.parse(topic)
            return parsed.kind is TopicKind.RECEIPTS and parsed.device == device

        return match


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, **setup: Any) -> AsyncIterator[Fleet]:
    pet = {"sum": {"time_max_s": 30.0}, "update": {"time_max_s": 60.0}, **setup.pop("pet", {})}
    model = {"model": {"id": "mlp"}}
    async with (
        harness(tmp_path, length=INITIAL.size, initial=INITIAL, pet=pet, extra=model, **setup) as h,
        contextlib.AsyncExitStack() as stack,
    ):
        yield Fleet(h, h.broker, tmp_path, Topics(h.setup.fleet.fleet), stack)


async def path_of(agent: Agent, round_id: int) -> list[str]:
    """The steps the journal went through in a round (a published copy repeats a step)."""
    steps = [step for step, _ in await agent.journal.events(round_id)]
    return [s for k, s in enumerate(steps) if k == 0 or s != steps[k - 1]]


def receipt(payload: bytes) -> Receipt:
    body = decode_message(payload, max_size=len(payload)).body
    assert isinstance(body, Receipt)
    return body


def receipt_reason(payload: bytes) -> str:
    return str(receipt(payload).reason or "accepted")


def answers(payload: bytes) -> bytes:
    """The digest of the message a receipt answers."""
    return receipt(payload).message_digest


async def test_summers_and_updaters_step_through_a_round(tmp_path: Path) -> None:
    async with fleet(tmp_path, summers=2, updaters=3) as f:
        updaters = await f.agents(f.h.setup.updaters)
        summers = await f.agents(f.h.setup.summers)
        await f.h.start_coordinator()
        await f.h.finished()  # max_rounds = 1
        metrics = dict(f.model().metrics)
        assert metrics["updates"] == 3 and metrics["sum2"] == 2 and metrics["dropped"] == 0
        assert f.model().version == 1 and not np.allclose(f.model().weights, INITIAL)
        for agent, task, path in [(a, Task.UPDATE, UPDATER_PATH) for a in updaters] + [
            (a, Task.SUM, SUMMER_PATH) for a in summers
        ]:
            state = await agent.journal.load(1)
            assert state is not None and state.task is task and state.step is Step.DONE
            assert state.ephemeral_sk is None  # the round's secret is gone
            assert await path_of(agent, 1) == path


async def test_a_device_not_selected_sits_out_at_once(tmp_path: Path) -> None:
    """With p_update below 1 a device can draw neither ticket: it journals sat_out
    and sends nothing, while the round goes on without it."""
    p_update = 0.99
    async with fleet(tmp_path, summers=2, updaters=3, pet={"update": {"prob": p_update}}) as f:
        seed = next_round_seed(bytes(32), weights_digest(INITIAL), 1)
        while True:
            key = SigningKey.generate()
            if select_task(seed, bytes(key.verify_key), P_SUM, p_update) is Task.NONE:
                break
        idle = f.h.setup.fleet.identity("dev-idle", key=key)
        (agent,) = await f.agents([idle])
        await f.h.start_coordinator()
        await f.until_step(agent, 1, Step.SAT_OUT)
        state = await agent.journal.load(1)
        assert state is not None and state.task is Task.NONE
        assert state.detail.startswith("not selected")
        assert await path_of(agent, 1) == ["sat_out"]
        assert state.bytes_sent == 0


async def test_a_round_dropped_mid_way_leaves_its_summers_sat_out(tmp_path: Path) -> None:
    """The update phase misses its count by time_max: the coordinator fails the round
    and starts the next; the summers waiting for seeds leave round 1 as sat_out, and
    their ephemeral keys are erased."""
    pet = {"max_rounds": 2}
    async with fleet(tmp_path, summers=2, updaters=3, pet=pet) as f:
        summers = await f.agents(f.h.setup.summers)
        (updater,) = await f.agents(f.h.setup.updaters[:1])  # 1 of count_min 3
        await f.h.start_coordinator()
        await f.until_step(updater, 1, Step.DONE)
        for s in summers:
            await f.until_step(s, 1, Step.SUM_SENT)
        f.h.advance(61)  # past the update phase's time_max
        for s in summers:
            await f.h.until(lambda s=s: s.driver is not None and s.driver.round_id == 2, "round 2")
            state = await s.journal.load(1)
            assert state is not None and state.step is Step.SAT_OUT
            assert state.detail == "round 2 started" and state.ephemeral_sk is None
            assert await path_of(s, 1) == ["sum_sent", "sat_out"]
        assert await path_of(updater, 1) == UPDATER_PATH


async def test_a_sum_after_the_sum_phase_closed_is_rejected(tmp_path: Path) -> None:
    """A third summer comes up once the sum phase took its two: its sum is refused,
    the journal keeps the reason, and the round fails for this device only."""
    pet = {"sum": {"count_min": 2, "count_max": 2}, "sum2": {"count_min": 2, "count_max": 2}}
    async with fleet(tmp_path, summers=3, updaters=3, pet=pet) as f:
        early = await f.agents(f.h.setup.summers[:2])
        await f.h.start_coordinator()
        for s in early:
            await f.until_step(s, 1, Step.SUM_SENT)
        sums = f.topics.sums(1)
        await f.h.until(lambda: sums in f.broker.retained, "the sum dictionary (sum phase closed)")
        (late,) = await f.agents(f.h.setup.summers[2:])
        await f.until_step(late, 1, Step.FAILED)
        state = await late.journal.load(1)
        assert state is not None and state.detail.startswith("sum rejected: ")
        sent = await late.journal.sent(1, TopicKind.SUM)
        assert sent is not None and sent.status is ReceiptStatus.REJECTED
        assert sent.reason in ("phase_closed", "wrong_phase"), sent.reason
        assert state.ephemeral_sk is None
        assert await path_of(late, 1) == ["sum_sent", "failed"]


async def test_a_lost_receipt_is_resent_and_answered_duplicate(tmp_path: Path) -> None:
    """The receipts to one updater are held: once receipt_timeout_s has passed on the
    clock it publishes the same bytes again, the coordinator answers the copy
    ``duplicate`` and counts the update once. The duplicate receipt ends the updater's
    wait (done); the first, late, receipt changes nothing."""
    # u0's timeout ends before the others' (60 s), the heartbeats (30 s) and the sum2
    # window (30 s), so moving the clock by it fires u0's resend and nothing else.
    limits = "\n[limits]\nreceipt_timeout_s = 10\nupload_retries = 1\n"
    async with fleet(tmp_path, summers=2, updaters=3) as f:
        (u0,) = await f.agents(f.h.setup.updaters[:1], extra=limits)
        others = await f.agents(f.h.setup.updaters[1:])
        await f.agents(f.h.setup.summers)
        to_u0 = f.is_receipt_for(u0.device)
        sum2s = {f.topics.sum2(1, s.device_id) for s in f.h.setup.summers}
        receipts = f.broker.hold(to_u0)
        # The sum2 messages wait too, so the round is still on when the copy comes.
        late_sum2 = f.broker.hold(lambda topic: topic in sum2s)
        await f.h.start_coordinator()
        await f.h.until(lambda: len(receipts.held) == 1, "the receipt to the updater")
        await f.h.fire_timer(10, "u0's receipt timeout")
        await f.h.until(lambda: len(receipts.held) == 2, "two receipts to the updater")
        assert [receipt_reason(p) for _, p, _, _ in receipts.held] == ["accepted", "duplicate"]
        assert u0.driver is not None and u0.driver.step is Step.UPDATE_SENT
        assert release_where(receipts, lambda t, p: receipt_reason(p) == "duplicate") == 1
        await f.until_step(u0, 1, Step.DONE)
        handled = f.h.handled(u0, to_u0)
        assert receipts.release() == 1  # the first one, late
        await f.h.until(handled.is_set, "the late receipt handled")
        late_sum2.release()
        await f.h.finished()  # the round completes
        assert dict(f.model().metrics)["updates"] == 3  # the copy was not counted again
        sent = await u0.journal.sent(1, TopicKind.UPDATE)
        assert sent is not None and sent.status is ReceiptStatus.ACCEPTED
        assert (sent.reason, sent.attempts) == ("duplicate", 2)
        assert await path_of(u0, 1) == UPDATER_PATH
        for other in others:
            entry = await other.journal.sent(1, TopicKind.UPDATE)
            assert entry is not None and (entry.reason, entry.attempts) == ("", 1)


async def test_a_receipt_after_the_device_left_the_round_is_journaled(tmp_path: Path) -> None:
    """An updater's receipt is held until round 2 has started and the updater left
    round 1; the late receipt still settles round 1's message in the journal."""
    limits = "\n[limits]\nupload_retries = 0\n"
    async with fleet(tmp_path, summers=2, updaters=3, pet={"max_rounds": 2}) as f:
        u0, *_ = await f.agents(f.h.setup.updaters, extra=limits)
        await f.agents(f.h.setup.summers)
        receipts = f.broker.hold(f.is_receipt_for(u0.device))
        await f.h.start_coordinator()
        await f.h.until(lambda: u0.driver is not None and u0.driver.round_id == 2, "round 2")
        state = await u0.journal.load(1)
        assert state is not None and state.step is Step.SAT_OUT
        sent = await u0.journal.sent(1, TopicKind.UPDATE)
        assert sent is not None and sent.status is ReceiptStatus.PENDING
        # upload_retries = 0: one copy of round 1's update, one receipt for it
        assert release_where(receipts, lambda t, p: answers(p) == sent.digest) == 1

        async def settled() -> bool:
            entry = await u0.journal.sent(1, TopicKind.UPDATE)
            return entry is not None and entry.status is not ReceiptStatus.PENDING

        await f.h.until(settled, "round 1's update settled in the journal")
        sent = await u0.journal.sent(1, TopicKind.UPDATE)
        assert sent is not None and sent.status is ReceiptStatus.ACCEPTED


async def test_a_summer_restarted_mid_round_resumes_from_its_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both summers stop after their sum was accepted and before their seeds come; the
    new processes find round 1 at sum_sent in the journal, open their seeds with the
    journaled ephemeral key and complete the round."""
    async with fleet(tmp_path, summers=2, updaters=3) as f:
        seeds = {s.device_id: f.topics.seeds(1, s.device_id) for s in f.h.setup.summers}
        held_seeds = f.broker.hold(lambda topic: topic in seeds.values())
        await f.agents(f.h.setup.updaters)
        configs = [f.config(s) for s in f.h.setup.summers]
        async with contextlib.AsyncExitStack() as first:
            summers = [await first.enter_async_context(f.h.agent(c)) for c in configs]
            await f.h.start_coordinator()
            await f.h.until(lambda: len(held_seeds.held) == 2, "both seed dictionaries")
            for s in summers:
                assert s.driver is not None and s.driver.step is Step.SUM_SENT
        # stopped: the journals say sum_sent; the seed dictionaries are on their way
        assert held_seeds.release() == 2
        caplog.set_level(logging.INFO, logger="maskfl.agent.round")
        again = await f.agents(f.h.setup.summers)
        await f.h.finished()
        resumed = [
            r for r in caplog.messages if r == "round 1: resuming as sum:sum_sent from the journal"
        ]
        assert len(resumed) == 2
        metrics = dict(f.model().metrics)
        assert metrics["sum2"] == 2 and metrics["dropped"] == 0 and metrics["updates"] == 3
        for s in again:
            assert await path_of(s, 1) == SUMMER_PATH
            sent = await s.journal.sent(1, TopicKind.SUM)
            assert sent is not None and sent.attempts >= 1


async def test_updaters_restarted_after_training_resume_from_their_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sum dictionary is held: the updaters train and journal their result, then
    stop at trained; the new processes mask the journaled result (no second training)
    once the dictionary comes, and the round completes."""
    async with fleet(tmp_path, summers=2, updaters=3) as f:
        held_sums = f.broker.hold(f.topics.sums(1))
        await f.agents(f.h.setup.summers)
        configs = [f.config(u) for u in f.h.setup.updaters]
        async with contextlib.AsyncExitStack() as first:
            updaters = [await first.enter_async_context(f.h.agent(c)) for c in configs]
            await f.h.start_coordinator()
            for u in updaters:
                await f.until_step(u, 1, Step.TRAINED)
            assert len(held_sums.held) == 1
        caplog.set_level(logging.INFO, logger="maskfl.agent.round")
        assert held_sums.release() == 1
        again = await f.agents(f.h.setup.updaters)
        await f.h.finished()
        assert caplog.messages.count("round 1: resuming as update:trained from the journal") == 3
        assert not [m for m in caplog.messages if "trained on" in m]  # not trained again
        assert dict(f.model().metrics)["updates"] == 3
        for u in again:
            assert await path_of(u, 1) == UPDATER_PATH
