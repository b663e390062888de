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
import functools
from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.datasources import load_dataset
from maskfl.agent.learning import holdout_split
from maskfl.agent.state import OutboxEntry, OutboxStatus, Step, TaskKind
from maskfl.agent.training import LocalTrainer
from maskfl.broker_coordinator.cli import main as cli_main
from maskfl.protocol.keys import public_key_to_pem
from maskfl.protocol.masking import LOSS_CAP, update_words
from maskfl.protocol.messages import GlobalModel, decode_message
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import wait_for
from maskfl.tools.report import randomness
from maskfl.transport import MqttConfig, MqttTransport
from tests.agent.fleet import write_bundle
from tests.agent.test_daemon import running_agent
from tests.broker_coordinator.crashing import Killer, Proc, round_row
from tests.broker_coordinator.support import running_coordinator
from tests.support.proxy import HoldingProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

SHARDS = 4


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


@pytest.mark.parametrize("groups", [1, 2])
async def test_agents_and_coordinator_complete_a_round(  # noqa: PLR0915 one end-to-end round, step by step
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str], groups: int
) -> None:
    """With groups = 2 the two summers are in different mask groups: each real agent
    seals one seed per group and each summer returns its group's aggregate mask."""
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
        port=mosquitto.port,
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
    ca_file = tmp_path / "ca.pub"
    ca_file.write_bytes(public_key_to_pem(fleet.ca_key.verify_key))
    configs = [
        write_bundle(
            tmp_path / ident.certificate.subject,
            ident,
            fleet=fleet.fleet,
            ca_public_key_file=ca_file,
            broker=mosquitto,
            shard=k,
            shards=SHARDS,
        )
        for k, ident in enumerate([*updaters, *summers])
    ]
    async with contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(running_agent(c)) for c in configs]
        async with running_coordinator(coordinator_toml) as coordinator:

            async def all_done() -> None:
                while True:
                    states = [await a.journal.load(1) for a in agents]
                    if all(s is not None and s.step.terminal for s in states):
                        return
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(all_done(), 120)

            # The new model is retained on the broker; no agent downloads it until it
            # trains again (the updaters started from their shipped weights, v0).
            model = await retained_model(mosquitto, fleet.fleet, "mlp", version=1)
            weights = np.array(model.weights, dtype=np.float64)
            assert all(a.global_model("mlp") is None for a in agents)
            prometheus = coordinator.metrics.render().decode()
            status = coordinator.status()
            assert coordinator.services is not None
            loss_scale = coordinator.services.mask.loss_scale
        states = [await a.journal.load(1) for a in agents]
        assert [s.task for s in states if s] == [TaskKind.UPDATE] * 3 + [TaskKind.SUM] * 2
        assert all(s is not None and s.step is Step.DONE for s in states), states

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
    db = coordinator_toml.parent / "state" / "coordinator.db"
    ca_file = tmp_path / "ca.pub"
    ca_file.write_bytes(public_key_to_pem(fleet.ca_key.verify_key))
    configs = [
        write_bundle(
            tmp_path / ident.certificate.subject,
            ident,
            fleet=fleet.fleet,
            ca_public_key_file=ca_file,
            broker=mosquitto,
            shard=k,
            shards=SHARDS,
        )
        for k, ident in enumerate([*updaters, *summers])
    ]
    coordinator = Proc(coordinator_toml, tmp_path / "coordinator.log")
    killer = Killer(mosquitto.host, mosquitto.port, fleet.fleet)
    steps = (("round", 1, "phase = 'update'"), ("sums", 1, "phase = 'sum2'"))
    steps += (("seeds", 2, "outcome = 'completed'"),)
    try:
        async with contextlib.AsyncExitStack() as stack:
            agents = [await stack.enter_async_context(running_agent(c)) for c in configs]
            for trigger, count, done in steps:
                killer.on(trigger, proxy.hold, count)
                coordinator.start()
                await wait_for(killer.fired.is_set, 60, trigger)
                await wait_for(functools.partial(round_row, db, done), 90, done)
                coordinator.kill9()
                await proxy.release()
            coordinator.start()

            async def journal() -> dict[tuple[str, str], OutboxEntry]:
                entries = {
                    (a.device, kind): await a.journal.outbox(1, kind)
                    for a in agents
                    for kind in ("sum", "update", "sum2")
                }
                return {key: e for key, e in entries.items() if e is not None}

            deadline = asyncio.get_running_loop().time() + 90
            while True:
                rejected = {
                    key: e.reason
                    for key, e in (await journal()).items()
                    if e.status is OutboxStatus.REJECTED
                }
                assert not rejected, f"{rejected}\n{coordinator.log.read_text()[-3000:]}"
                states = [await a.journal.load(1) for a in agents]
                if all(s is not None and s.step is Step.DONE for s in states):
                    break
                assert asyncio.get_running_loop().time() < deadline, states
                await asyncio.sleep(0.1)
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
        assert entry.status is not OutboxStatus.REJECTED, (key, entry.reason)
        if entry.kind != "sum":  # a summer learns its sum counted from its seed dictionary
            assert entry.status is OutboxStatus.ACCEPTED, (key, entry.status, entry.reason)
            assert entry.reason in ("", "duplicate"), (key, entry.reason)
