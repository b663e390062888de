"""Real agents (LiteRT training on digits) and the real coordinator over a real mosquitto.

Two summers and three updaters, chosen by their sortition tickets for round 1, run a
full round; the coordinator's new global model must be the initial weights plus the
weighted mean of the three local deltas, which the test recomputes with the same
model, data shards and training seed. Federated evaluation: the fleet accuracy the
coordinator publishes (signed model metrics, Prometheus, ``models list``) must equal
the accuracy of the initial model on the three updaters' held-out data, computed
here directly, and an update as the coordinator stored it must still look uniform.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from maskfl.agent.daemon import Agent
from maskfl.agent.datasources import load_dataset
from maskfl.agent.learning import holdout_split
from maskfl.agent.state import ReceiptStatus, SentMessage
from maskfl.agent.steps import Step
from maskfl.agent.training import LocalTrainer
from maskfl.broker_coordinator.cli import main as cli_main
from maskfl.broker_coordinator.service import Coordinator
from maskfl.protocol.masking import LOSS_CAP, update_words
from maskfl.protocol.messages import GlobalModel, decode_message
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import TopicKind, Topics
from maskfl.testing.broker import Mosquitto
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import wait_for
from maskfl.tools.report import randomness
from maskfl.transport import MqttConfig, MqttTransport
from tests.agent.test_daemon import running_agent
from tests.broker_coordinator.crashing import Killer, Proc, kill_with_output_held
from tests.broker_coordinator.support import Setup, running_coordinator
from tests.support.harness import NOWHERE, bench, harness_on
from tests.support.proxy import HoldingProxy

pytestmark = pytest.mark.timeout(180)

SHARDS = 4


class Address(Protocol):
    host: str
    port: int


async def retained_model(broker: Mosquitto, fleet: str, model_id: str, version: int) -> GlobalModel:
    topic = Topics(fleet).model_latest(model_id)
    async with MqttTransport(MqttConfig(host=broker.host, port=broker.port)) as reader:
        await reader.subscribe(topic)
        async with asyncio.timeout(30):
            async for message in reader.messages():
                body = decode_message(message.payload, max_size=1 << 24).body
                if isinstance(body, GlobalModel) and body.version >= version:
                    return body
    raise AssertionError("no model")


@dataclass
class Bundles:
    setup: Setup
    agents: list[Path]
    """agent.toml of the three updaters, then the two summers"""


def _bundles(tmp_path: Path, broker: Address, groups: int) -> Bundles:
    """A fleet whose round-1 tickets give two summers and three updaters, a coordinator
    bundle and five agent bundles, all naming ``broker``."""
    initial = LocalTrainer.shipped("mlp").get_weights()
    fleet = SimFleet(fleet="agentfleet")
    p_sum = 0.5
    summers, updaters = fleet.identities_for_roles(
        first_round_seed(bytes(32), initial),
        p_sum=p_sum,
        p_update=1.0,
        summers=2,
        updaters=3,
        groups=groups,
    )
    coordinator_toml = fleet.write_coordinator(
        tmp_path / "coordinator",
        port=broker.port,
        length=initial.size,
        initial=initial,
        overrides={
            "model": {"id": "mlp"},
            "pet": {
                "sum": {"prob": p_sum, "count_min": 2, "count_max": 2, "time_max_s": 30.0},
                "update": {"prob": 1.0, "count_min": 3, "count_max": 3, "time_max_s": 20.0},
                "sum2": {"count_min": 2, "count_max": 2, "time_max_s": 30.0},
                "max_rounds": 1,
            },
            "storage": {"update_words": "file"},  # keep the stored words to inspect
            "masking": {"groups": groups},
        },
    )
    configs = fleet.write_agents(
        tmp_path, [*updaters, *summers], host=broker.host, port=broker.port, shards=SHARDS
    )
    return Bundles(Setup(fleet, coordinator_toml, summers, updaters, initial), configs)


@dataclass
class Outcome:
    model: GlobalModel
    prometheus: str
    status: dict[str, Any]
    loss_scale: int

    @classmethod
    def of(cls, model: GlobalModel, coordinator: Coordinator) -> Outcome:
        """The model and what the (still running) coordinator says about it."""
        assert coordinator.services is not None
        return cls(
            model,
            coordinator.metrics.render().decode(),
            coordinator.status(),
            coordinator.services.mask.loss_scale,
        )


async def _all_done(agents: list[Agent]) -> bool:
    states = [await a.journal.load(1) for a in agents]
    return all(s is not None and s.step.terminal for s in states)


async def _check_steps(agents: list[Agent]) -> None:
    states = [await a.journal.load(1) for a in agents]
    assert [s.task for s in states if s] == [Task.UPDATE] * 3 + [Task.SUM] * 2
    assert all(s is not None and s.step is Step.DONE for s in states), states
    # No agent downloaded the new model: none trains again (the updaters started from
    # their shipped weights, v0).
    assert all(a.global_model("mlp") is None for a in agents)


@pytest.mark.parametrize("groups", [1, 2])
async def test_agents_and_coordinator_complete_a_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], groups: int
) -> None:
    """Through the in-memory harness. With groups = 2 the two summers are in different
    mask groups: each real agent seals one seed per group and each summer returns its
    group's aggregate mask."""
    b = _bundles(tmp_path, NOWHERE, groups)
    async with harness_on(b.setup) as h, contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(h.agent(c)) for c in b.agents]
        coordinator = await h.start_coordinator()
        await h.until(lambda: _all_done(agents), "every agent's end of round 1")
        await h.finished()  # max_rounds = 1
        retained = h.broker.retained[Topics(b.setup.fleet.fleet).model_latest("mlp")].payload
        model = decode_message(retained, max_size=len(retained)).body
        assert isinstance(model, GlobalModel) and model.version == 1
        outcome = Outcome.of(model, coordinator)
        await _check_steps(agents)
    await _check_round(tmp_path, b, outcome, groups, capsys)


@pytest.mark.broker
@pytest.mark.slow
async def test_agents_and_coordinator_complete_a_round_over_mosquitto(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same round end to end over a real broker: the truth for the transport."""
    b = _bundles(tmp_path, mosquitto, 1)
    async with bench() as events, contextlib.AsyncExitStack() as stack:
        wake = events.broker.traffic
        agents = [await stack.enter_async_context(running_agent(c, wake=wake)) for c in b.agents]
        async with running_coordinator(b.setup.config_path) as coordinator:
            await events.until(lambda: _all_done(agents), "every agent's end of round 1", 120)
            # The new model is retained on the broker.
            model = await retained_model(mosquitto, b.setup.fleet.fleet, "mlp", version=1)
            outcome = Outcome.of(model, coordinator)
        await _check_steps(agents)
    await _check_round(tmp_path, b, outcome, 1, capsys)


async def _check_round(
    tmp_path: Path,
    b: Bundles,
    outcome: Outcome,
    groups: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    initial = b.setup.initial
    coordinator_toml = b.setup.config_path
    model = outcome.model
    weights = np.array(model.weights, dtype=np.float64)
    prometheus, status, loss_scale = outcome.prometheus, outcome.status, outcome.loss_scale
    # Recompute what each updater sent: same model, shard, held-out split and seed.
    num = np.zeros(initial.size)
    den = 0.0
    examples = correct = 0
    loss_sum = 0.0
    for k in range(3):
        split = holdout_split(load_dataset("digits", {"shard": k, "shards": SHARDS}), 0.2)
        trainer = LocalTrainer.shipped("mlp")
        n, c, loss = trainer.counts(initial, split.x_eval, split.y_eval, loss_cap=LOSS_CAP)
        examples, correct, loss_sum = examples + n, correct + c, loss_sum + loss
        local = trainer.local_update(
            initial, split.x_train, split.y_train, epochs=1, batch_size=32, seed=1
        )
        weight = min(local.num_samples, 1000) / 1000
        num += weight * np.clip(local.delta.astype(np.float64), -1.0, 1.0)
        den += weight
    expected = initial.astype(np.float64) + num / den
    np.testing.assert_allclose(weights, expected, atol=1e-4)

    # The fleet evaluation, unmasked only as a total, is the directly computed one.
    metrics = dict(model.metrics)
    assert metrics.get("groups", 1) == groups and metrics["mask_votes"] == 2
    assert examples > 0 and metrics["evaluated_version"] == 0
    assert metrics["examples"] == examples
    assert metrics["accuracy"] == correct / examples
    # Each updater's loss word is rounded to half a unit of 1/Q.
    assert abs(metrics["loss"] - loss_sum / examples) <= 3 / (2 * loss_scale * examples) + 1e-9
    assert f'maskfl_model_accuracy{{model_version="0"}} {correct / examples}' in prometheus
    assert status["model_evaluation"] == {
        "evaluated_version": 0,
        "examples": examples,
        "accuracy": correct / examples,
        "loss": metrics["loss"],
    }
    # An update exactly as the coordinator stored it: uniform bytes, and its
    # evaluation words are not the counts in the clear.
    log = tmp_path / "coordinator" / "state" / "updates" / "round-1.log"
    stored = np.frombuffer(log.read_bytes(), dtype=np.uint32).reshape(3, -1)
    assert stored.shape[1] == update_words(initial.size)
    for words in stored:
        r = randomness(words)
        assert r.entropy_bits_per_byte > 7.9 and r.p_value > 1e-4, r
    tails = {tuple(int(w) for w in words[-3:]) for words in stored}
    assert all(max(t) > 100_000 for t in tails), tails  # held-out counts are < 2,000
    # The registry keeps it with the version it came with: `maskfl-coordinator models list`.
    assert (
        await asyncio.to_thread(cli_main, ["models", "list", "--config", str(coordinator_toml)])
        == 0
    )
    listed = capsys.readouterr().out.splitlines()
    v1 = next(line for line in listed if line.startswith("mlp v1 "))
    assert f"accuracy={correct / examples:g}" in v1 and "evaluated_version=0" in v1, v1


@pytest.mark.broker
@pytest.mark.slow
async def test_coordinator_killed_with_receipts_unsent_no_agent_journals_a_rejection(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Real agents; the coordinator, a process behind a proxy, dies three times at the
    worst instant for receipts: from the moment a phase's input is out (round
    parameters, sum dictionary, all seed dictionaries) everything it sends is dropped,
    and it is killed once its database shows the phase closed (the round completed,
    for sum2). Every message the model counts must get an ``accepted`` receipt, and
    no agent's journal may record a rejection for any of its messages."""
    initial = LocalTrainer.shipped("mlp").get_weights()
    fleet = SimFleet(fleet="agentcrash")
    p_sum = 0.5
    summers, updaters = fleet.identities_for_roles(
        first_round_seed(bytes(32), initial), p_sum=p_sum, p_update=1.0, summers=2, updaters=3
    )
    proxy = await HoldingProxy(mosquitto.host, mosquitto.port).start()
    coordinator_toml = fleet.write_coordinator(
        tmp_path / "coordinator",
        port=proxy.port,
        length=initial.size,
        initial=initial,
        overrides={
            "model": {"id": "mlp"},
            "pet": {
                "sum": {"prob": p_sum, "count_min": 2, "count_max": 2, "time_max_s": 60.0},
                "update": {"prob": 1.0, "count_min": 3, "count_max": 3, "time_max_s": 60.0},
                "sum2": {"count_min": 2, "count_max": 2, "time_max_s": 60.0},
                "max_rounds": 2,
                "round_pause_s": 60.0,
            },
        },
    )
    configs = fleet.write_agents(
        tmp_path, [*updaters, *summers], host=mosquitto.host, port=mosquitto.port, shards=SHARDS
    )
    coordinator = Proc(coordinator_toml, tmp_path / "coordinator.log")
    killer = Killer(mosquitto.host, mosquitto.port, fleet.fleet)
    try:
        async with bench() as events, contextlib.AsyncExitStack() as stack:
            wake = events.broker.traffic
            agents = [await stack.enter_async_context(running_agent(c, wake=wake)) for c in configs]
            await kill_with_output_held(coordinator, killer, proxy, summers=2, what="agents")
            coordinator.start()

            async def journal() -> dict[tuple[str, str], SentMessage]:
                entries = {
                    (a.device, kind): await a.journal.sent(1, kind)
                    for a in agents
                    for kind in (TopicKind.SUM, TopicKind.UPDATE, TopicKind.SUM2)
                }
                return {key: e for key, e in entries.items() if e is not None}

            async def done_without_rejection() -> bool:
                rejected = {
                    key: e.reason
                    for key, e in (await journal()).items()
                    if e.status is ReceiptStatus.REJECTED
                }
                assert not rejected, f"{rejected}\n{coordinator.log.read_text()[-3000:]}"
                states = [await a.journal.load(1) for a in agents]
                return all(s is not None and s.step is Step.DONE for s in states)

            # Re-checked at every journal write of any agent.
            await events.until(done_without_rejection, "every agent done", 90)
            sent = await journal()
            await wait_for(
                lambda: all(e.digest in killer.accepted for e in sent.values()),
                30,
                "an accepted receipt for every message",
            )
            final = await journal()
    finally:
        killer.close()
        coordinator.stop()
        await proxy.stop()
    assert proxy.dropped > 0
    assert len(sent) == 3 + 2 * 2
    for key, entry in final.items():
        assert entry.status is not ReceiptStatus.REJECTED, (key, entry.reason)
        # a summer learns its sum counted from its seed dictionary
        if entry.kind is not TopicKind.SUM:
            assert entry.status is ReceiptStatus.ACCEPTED, (key, entry.status, entry.reason)
            assert entry.reason in ("", "duplicate"), (key, entry.reason)
