"""The agent daemon in-process against a protocol-level stand-in coordinator.

Summer and updater rounds end to end (real SQLite journal, real PyNaCl, real LiteRT
training on the digits data), receipts and retries, guards, and hostile round
parameters that must be ignored with one log line each. The round logic runs on the
in-memory harness (tests/support/harness.py: memory broker, fake clock, waits on
events); waiting for a broker that is down and surviving its restart is the
transport's and stays on a real mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from maskfl.agent.config import load_config
from maskfl.agent.daemon import Agent
from maskfl.agent.datasources import load_dataset
from maskfl.agent.identity import load_identity
from maskfl.agent.learning import holdout_split
from maskfl.agent.state import ReceiptStatus
from maskfl.agent.steps import Step
from maskfl.agent.training import LocalTrainer
from maskfl.models import shipped_model
from maskfl.protocol.crypto import digest, new_seed, open_seed, seal_seed
from maskfl.protocol.errors import Reason
from maskfl.protocol.ids import Role
from maskfl.protocol.masking import (
    LOSS_CAP,
    aggregate_mask,
    decode_aggregate,
    error_bound,
    mask_stream,
    update_words,
)
from maskfl.protocol.messages import HEADER_SIZE, Heartbeat, Sum, Sum2, Update, encode_message
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import TopicKind
from maskfl.testing.broker import Mosquitto
from tests.agent.fleet import Fleet, StandIn, summer_entry
from tests.support.harness import NOWHERE, Bench, WatchedJournal, bench

pytestmark = pytest.mark.timeout(120)

M = 4810  # the shipped MLP


def mlp_weights() -> np.ndarray:
    return LocalTrainer.shipped("mlp").get_weights()


def small_weights(n: int = 64) -> np.ndarray:
    return np.linspace(-0.5, 0.5, n, dtype=np.float32)


@contextlib.asynccontextmanager
async def running_agent(
    config_path: Path, *, wake: asyncio.Event | None = None
) -> AsyncIterator[Agent]:
    """The agent on its configured (real) broker; its journal writes set ``wake``."""
    config = load_config(config_path)
    identity = load_identity(config.device)
    async with WatchedJournal.open(config.state.database) as journal:
        assert isinstance(journal, WatchedJournal)
        journal.wake = wake
        agent = Agent(config, identity, journal)
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.request_stop()
            async with asyncio.timeout(15):
                await task


async def wait_step(b: Bench, agent: Agent, round_id: int, step: Step) -> None:
    """Until the agent journals ``step`` for the round (each journal write wakes it)."""

    async def there() -> bool:
        state = await agent.journal.load(round_id)
        return state is not None and state.step is step

    await b.until(there, f"round {round_id} at {step}")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "fleet")


@contextlib.asynccontextmanager
async def stand_in(b: Bench, fleet: Fleet) -> AsyncIterator[StandIn]:
    """The stand-in coordinator on the bench's memory broker."""
    async with StandIn(fleet, transport=b.broker.transport("standin")) as coord:
        yield coord


#: A receipt timeout that ends before nothing else the agent waits for (heartbeats: 30 s).
RECEIPT_TIMEOUT = "[limits]\nreceipt_timeout_s = 45\n"


async def test_summer_round(fleet: Fleet) -> None:
    config = fleet.device("dev-s", NOWHERE, extra=RECEIPT_TIMEOUT)
    weights = small_weights()
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config) as agent:
        setup = await coord.start_round(1, p_sum=1.0, p_update=0.0, weights=weights)
        first = await coord.expect(TopicKind.SUM)
        assert isinstance(first.body, Sum)
        assert first.body.certificate.subject == "dev-s"
        # No receipt within the timeout: the agent publishes the very same bytes again.
        await b.fire_timer(45, "the receipt timeout")
        again = await coord.expect(TopicKind.SUM)
        assert again.raw == first.raw
        await coord.receipt("dev-s", again)
        # Three updates sealed to the summer's key, and one seed that does not open.
        seeds = [new_seed() for _ in range(3)]
        sealed = {
            bytes([i + 1]) * 32: seal_seed(s, first.body.ephemeral_pk) for i, s in enumerate(seeds)
        }
        broken = bytes([9]) * 32
        sealed[broken] = bytes(80)
        await coord.publish_seeds(1, "dev-s", agent.identity.identity.public_key, sealed)
        sum2 = await coord.expect(TopicKind.SUM2)
        assert isinstance(sum2.body, Sum2)
        expected = aggregate_mask(seeds, update_words(setup.params.vector_length), 32)
        assert np.array_equal(sum2.body.words, expected)
        assert sum2.body.failed == (broken,)
        await coord.receipt("dev-s", sum2)
        await wait_step(b, agent, 1, Step.DONE)
        state = await agent.journal.load(1)
        assert state is not None and state.task is Task.SUM
        assert state.ephemeral_sk is None  # erased once the duty is done
        # Signed heartbeats on status/<device>.
        beat = await coord.expect(TopicKind.STATUS)
        assert isinstance(beat.body, Heartbeat)
        assert beat.header.sender == agent.identity.identity.public_key
        # A summer does not train: it never fetched the global model retained for the round.
        assert agent.global_model("mlp") is None


async def test_updater_round_with_litert(fleet: Fleet) -> None:
    config_path = fleet.device(
        "dev-u", NOWHERE, extra="[training]\nepochs = 1\nbatch_size = 32\nsample_cap = 1000\n"
    )
    # Not the shipped weights: the agent must fetch this model from the broker.
    weights = mlp_weights() + np.float32(0.01)
    assert weights.size == M
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        setup = await coord.start_round(
            3, p_sum=0.0, p_update=1.0, weights=weights, chunk_size=8 * 1024
        )
        summers = [summer_entry(fleet, f"summer-{i}", 3) for i in range(2)]
        await coord.publish_sums(3, [raw for *_, raw in summers])
        update = await coord.expect(TopicKind.UPDATE)
        body = update.body
        assert isinstance(body, Update)
        assert set(body.sealed_seeds) == {ident.public_key for ident, *_ in summers}
        opened = {open_seed(body.sealed_seeds[ident.public_key], sk) for ident, sk, _, _ in summers}
        assert len(opened) == 1  # the same seed, sealed to every summer
        seed = opened.pop()
        cfg = setup.params.mask
        encoded = body.words - mask_stream(seed, update_words(M), 32)
        values, weight_sum = decode_aggregate(encoded, 1, cfg)
        # Recompute the local round: same model, data split, seed (the round id) and weights.
        split = holdout_split(load_dataset("digits", {"shard": 0, "shards": 4}), 0.2)
        trainer = LocalTrainer.shipped("mlp")
        # The evaluation words: the global model on the held-out fifth, before training.
        n, correct, loss = trainer.counts(weights, split.x_eval, split.y_eval, loss_cap=LOSS_CAP)
        assert n == len(split.y_eval) > 0
        assert encoded[M + 1 : M + 3].tolist() == [n, correct]
        assert abs(int(encoded[M + 3]) / cfg.loss_scale - loss) <= 0.5 / cfg.loss_scale + 1e-9
        local = trainer.local_update(
            weights, split.x_train, split.y_train, epochs=1, batch_size=32, seed=3
        )
        weight = min(local.num_samples, 1000) / 1000
        assert weight_sum == pytest.approx(weight, abs=1e-5)
        expected = np.clip(local.delta, -1.0, 1.0) * weight
        bound = error_bound(1, weight_sum, cfg) * weight_sum
        assert np.max(np.abs(values - expected)) <= bound + 1e-5
        await coord.receipt("dev-u", update)
        await wait_step(b, agent, 3, Step.DONE)
        # The updater fetched model v2 for its round, and only that: the next global
        # model, and round 4 (in which it sits out), do not bring it another one.
        held = agent.global_model("mlp")
        assert held is not None and held.version == 2
        await coord.start_round(4, p_sum=0.0, p_update=0.0, weights=weights + 1)
        await wait_step(b, agent, 4, Step.SAT_OUT)
        held = agent.global_model("mlp")
        assert held is not None and held.version == 2


async def test_rejected_update_is_not_retried(fleet: Fleet) -> None:
    """A rejection of the first copy is final: the round fails for the device, and
    the receipt timeout running out afterwards brings no second copy."""
    config_path = fleet.device("dev-r", NOWHERE, extra=RECEIPT_TIMEOUT)
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        await coord.start_round(2, p_sum=0.0, p_update=1.0, weights=mlp_weights())
        summers = [summer_entry(fleet, "summer-0", 2)]
        await coord.publish_sums(2, [summers[0][3]])
        update = await coord.expect(TopicKind.UPDATE)
        resend_at = b.clock() + 45
        await b.until(lambda: resend_at in b.clock.sleeps, "receipt wait on the clock")
        receipts = coord.topics.receipts("dev-r")
        handled = b.handled(agent, lambda topic: topic == receipts)
        await coord.receipt("dev-r", update, accepted=False, reason=Reason.PHASE_CLOSED)
        await b.until(handled.is_set, "the rejection handled")
        b.advance(45)  # an agent still waiting for a receipt would publish again now

        async def failed_or_resent() -> bool:
            state = await agent.journal.load(2)
            entry = await agent.journal.sent(2, TopicKind.UPDATE)
            assert state is not None and entry is not None
            return state.step is Step.FAILED or entry.attempts > 1

        await b.until(failed_or_resent, "the round failed (or the update sent again)")
        state = await agent.journal.load(2)
        entry = await agent.journal.sent(2, TopicKind.UPDATE)
        assert state is not None and state.step is Step.FAILED, state
        assert "phase_closed" in state.detail
        assert entry is not None and (entry.status, entry.attempts) == (ReceiptStatus.REJECTED, 1)
        assert agent.driver is not None and agent.driver.finished.is_set()  # nothing left to send
        assert coord.queues[TopicKind.UPDATE].empty()


async def test_a_late_duplicate_receipt_is_journaled_as_accepted(
    fleet: Fleet,
) -> None:
    """After a coordinator crash, a redelivered message that already counted is
    answered ``duplicate`` (issue 10 item 4), perhaps once the device has moved on
    to a later round and before the stored ``accepted`` receipt comes back. The
    journal must record the message as accepted, not as rejected (it was: status
    rejected, reason duplicate, and the accepted receipt after it was ignored)."""
    config_path = fleet.device("dev-l", NOWHERE)
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        await coord.start_round(2, p_sum=0.0, p_update=1.0, weights=mlp_weights())
        await coord.publish_sums(2, [summer_entry(fleet, "summer-0", 2)[3]])
        update = await coord.expect(TopicKind.UPDATE)
        await coord.start_round(3, p_sum=0.0, p_update=0.0, weights=mlp_weights())
        await wait_step(b, agent, 2, Step.SAT_OUT)  # round 2 is left, its update unanswered
        entry = await agent.journal.sent(2, TopicKind.UPDATE)
        assert entry is not None and entry.status is ReceiptStatus.PENDING
        await coord.receipt("dev-l", update, accepted=False, reason=Reason.DUPLICATE)

        async def answered() -> bool:
            entry = await agent.journal.sent(2, TopicKind.UPDATE)
            return entry is not None and entry.status is not ReceiptStatus.PENDING

        await b.until(answered, "the journaled answer")
        entry = await agent.journal.sent(2, TopicKind.UPDATE)
        assert entry is not None and entry.status is ReceiptStatus.ACCEPTED, entry


async def test_guards_make_an_updater_sit_out(fleet: Fleet) -> None:
    status = fleet.root / "battery"
    status.write_text("Discharging\n")
    config_path = fleet.device("dev-g", NOWHERE, extra=f'[guards]\non_battery_file = "{status}"\n')
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        await coord.start_round(1, p_sum=0.0, p_update=1.0, weights=small_weights())
        await wait_step(b, agent, 1, Step.SAT_OUT)
        state = await agent.journal.load(1)
        assert state is not None and "on battery" in state.detail


async def test_guards_and_the_sum2_budget_make_a_summer_sit_out(
    fleet: Fleet,
) -> None:
    # A summer expands U x (M + 1) mask words: outside its time window or on battery it
    # must not volunteer, so no Sum message leaves the device.
    status = fleet.root / "battery"
    status.write_text("Discharging\n")
    now = datetime.now()
    window = f"{(now.hour + 2) % 24:02d}:00-{(now.hour + 3) % 24:02d}:00"
    guarded = fleet.device(
        "dev-gs",
        NOWHERE,
        extra=f'[guards]\non_battery_file = "{status}"\ntime_windows = ["{window}"]\n',
    )
    # Its sum2 of M + 1 = 4811 words (19 kB) would not fit a 4 kB upload budget.
    budget = fleet.device("dev-gb", NOWHERE, extra="[guards]\nmax_upload_bytes = 4096\n")
    async with (
        bench() as b,
        stand_in(b, fleet) as coord,
        b.agent(guarded) as first,
        b.agent(budget) as second,
    ):
        await coord.start_round(1, p_sum=1.0, p_update=0.0, weights=mlp_weights())
        await wait_step(b, first, 1, Step.SAT_OUT)
        await wait_step(b, second, 1, Step.SAT_OUT)
        state = await first.journal.load(1)
        assert state is not None and state.task is Task.SUM
        assert "on battery" in state.detail and "outside the time windows" in state.detail
        state = await second.journal.load(1)
        assert state is not None and state.task is Task.SUM
        assert "sum and sum2" in state.detail and "max_upload_bytes 4096" in state.detail
        assert (await first.journal.sent(1, TopicKind.SUM)) is None
        assert coord.raw[TopicKind.SUM] == []


async def test_hostile_round_parameters_are_ignored(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="maskfl.agent")
    config_path = fleet.device("dev-h", NOWHERE)
    weights = small_weights()
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        round_topic = coord.topics.round

        async def send_and_wait_for_log(payload: bytes, words: str) -> None:
            caplog.clear()
            await coord.publish(round_topic, payload, retain=True)
            await b.until(
                lambda: any(
                    words in r.getMessage() and round_topic in r.getMessage()
                    for r in caplog.records
                ),
                f"a log line with {words!r}",
            )

        # 1. Garbage.
        await send_and_wait_for_log(b"not a message", "ignored message on")
        # 2. A coordinator certificate from another CA (forged).
        rogue_ca = nacl.signing.SigningKey.generate()
        key = nacl.signing.SigningKey.generate()
        forged_cert = fleet.certificate("coordinator", Role.COORDINATOR, key, ca=rogue_ca)
        forged = coord.round_params(
            1, p_sum=1.0, p_update=0.0, weights=weights, certificate=forged_cert
        )
        raw = encode_message(forged, fleet=fleet.name, round_id=1, signing_key=key)
        await send_and_wait_for_log(raw, "bad_signature")
        # 3. A device certificate signing round parameters.
        device = fleet.identity("mallory", Role.DEVICE)
        wrong_role = coord.round_params(
            1, p_sum=1.0, p_update=0.0, weights=weights, certificate=device.certificate
        )
        raw = encode_message(
            wrong_role, fleet=fleet.name, round_id=1, signing_key=device.signing_key
        )
        await send_and_wait_for_log(raw, "wrong_role")
        # 4. The genuine coordinator's parameters with one signature bit flipped.
        tampered = bytearray(
            coord.sign(coord.round_params(1, p_sum=1.0, p_update=0.0, weights=weights), 1)
        )
        tampered[HEADER_SIZE + 5] ^= 1
        await send_and_wait_for_log(bytes(tampered), "bad_signature")
        # 5. A seed that is not the hash chain (a coordinator grinding the sortition).
        ground = coord.round_params(1, p_sum=1.0, p_update=0.0, weights=weights, seed=bytes(32))
        await send_and_wait_for_log(coord.sign(ground, 1), "hash chain")
        # 6. Another fleet.
        other = Fleet(fleet.root / "other", name="otherfleet", ca=fleet.ca)
        stranger = other.identity("coordinator", Role.COORDINATOR)
        params = coord.round_params(
            1, p_sum=1.0, p_update=0.0, weights=weights, certificate=stranger.certificate
        )
        raw = encode_message(
            params, fleet="otherfleet", round_id=1, signing_key=stranger.signing_key
        )
        await send_and_wait_for_log(raw, "wrong_fleet")
        assert agent.driver is None
        assert sum(agent.ignored.values()) == 6
        # The agent still serves: a genuine round gets a Sum.
        await coord.start_round(1, p_sum=1.0, p_update=0.0, weights=weights)
        sum_message = await coord.expect(TopicKind.SUM)
        assert sum_message.header.sender == agent.identity.identity.public_key
        assert agent.handler_errors == 0


async def test_upload_budget_makes_an_updater_sit_out(fleet: Fleet) -> None:
    config_path = fleet.device("dev-b", NOWHERE, extra="[guards]\nmax_upload_bytes = 4096\n")
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        await coord.start_round(1, p_sum=0.0, p_update=1.0, weights=mlp_weights())
        await coord.publish_sums(1, [summer_entry(fleet, "summer-0", 1)[3]])
        await wait_step(b, agent, 1, Step.SAT_OUT)
        state = await agent.journal.load(1)
        assert state is not None and "max_upload_bytes 4096" in state.detail
        assert coord.raw[TopicKind.UPDATE] == []


@pytest.mark.broker
async def test_agent_waits_for_the_broker_and_survives_its_restart(
    fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    config_path = fleet.device("dev-w", broker)
    async with bench() as b, running_agent(config_path, wake=b.broker.traffic) as agent:
        # Nothing listens: the agent's first attempt fails and it retries with back-off.
        await b.until(
            lambda: any("retrying with back-off" in r.getMessage() for r in caplog.records),
            "a failed connection attempt",
        )
        assert agent.transport is None
        broker.start()
        try:
            async with StandIn(fleet, broker) as coord:
                await coord.start_round(1, p_sum=1.0, p_update=0.0, weights=small_weights())
                first = await coord.expect(TopicKind.SUM)
                assert isinstance(first.body, Sum)
                await coord.receipt("dev-w", first)
                await wait_step(b, agent, 1, Step.SUM_SENT)
                broker.kill()
                broker.start()
                seed = new_seed()
                sealed = {bytes(32): seal_seed(seed, first.body.ephemeral_pk)}
                await coord.publish_seeds(1, "dev-w", first.header.sender, sealed)
                sum2 = await coord.expect(TopicKind.SUM2, wait_s=30)
                assert isinstance(sum2.body, Sum2)
                assert np.array_equal(sum2.body.words, aggregate_mask([seed], update_words(64), 32))
        finally:
            broker.stop()


async def test_updater_resumes_after_restart_with_the_same_update(
    fleet: Fleet,
) -> None:
    config_path = fleet.device("dev-z", NOWHERE)
    async with bench() as b, stand_in(b, fleet) as coord:
        async with b.agent(config_path):
            await coord.start_round(4, p_sum=0.0, p_update=1.0, weights=mlp_weights())
            await coord.publish_sums(4, [summer_entry(fleet, "summer-0", 4)[3]])
            first = await coord.expect(TopicKind.UPDATE)
        # Stopped before the receipt came: the next start publishes the same bytes again.
        async with b.agent(config_path) as agent:  # the same journal: a restart
            again = await coord.expect(TopicKind.UPDATE)
            assert again.raw == first.raw
            await coord.receipt("dev-z", again, accepted=False, reason=Reason.DUPLICATE)
            await wait_step(b, agent, 4, Step.DONE)


async def test_a_forged_graph_is_refused_and_the_genuine_one_trains(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    # The model id "net" is not shipped and no model_file is set: the device needs the
    # graph from the broker. Mallory can publish on the graph topic (broker rights) and
    # retains another valid model there; loading it would fail the round (4810 != cnn).
    caplog.set_level(logging.INFO, logger="maskfl.agent")
    config_path = fleet.device("dev-gr", NOWHERE, extra="[training]\nepochs = 1\n")
    genuine = shipped_model("mlp").read_bytes()
    forged = shipped_model("cnn").read_bytes()
    async with bench() as b, stand_in(b, fleet) as coord, b.agent(config_path) as agent:
        mallory = await b.client("mallory")  # broker rights on the graph topic
        graph_topic = coord.topics.model_graph("net")
        await mallory.publish(graph_topic, forged, qos=1, retain=True)
        await coord.start_round(
            1,
            p_sum=0.0,
            p_update=1.0,
            weights=mlp_weights(),
            model_id="net",
            graph_digest=digest(genuine),
        )
        await coord.publish_sums(1, [summer_entry(fleet, "summer-0", 1)[3]])

        await b.until(lambda: agent.ignored["graph_digest"] > 0, "the refused graph")
        state = await agent.journal.load(1)
        assert state is not None and state.step is Step.WAITING_SUMS
        assert coord.raw[TopicKind.UPDATE] == []
        # The coordinator retains the genuine graph; training goes on with it.
        await coord.publish(graph_topic, genuine, retain=True)
        update = await coord.expect(TopicKind.UPDATE, wait_s=60)
        assert isinstance(update.body, Update)
        assert update.body.words.size == update_words(M)
        await coord.receipt("dev-gr", update)
        await wait_step(b, agent, 1, Step.DONE)
        assert agent.graphs.verified("net") == genuine
        await mallory.publish(graph_topic, b"", qos=1, retain=True)
    refused = [
        r.getMessage() for r in caplog.records if "refused the model graph" in r.getMessage()
    ]
    assert len(refused) == 1, refused
    assert f"({len(forged)} bytes)" in refused[0] and "signed graph digest" in refused[0]
    assert agent.ignored["graph_digest"] == 1 and agent.handler_errors == 0
