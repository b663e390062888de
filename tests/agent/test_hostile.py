"""Whatever arrives on the agent's topics, the daemon logs, counts and keeps serving.

Property test: random bytes and bit-flipped genuine coordinator messages on every topic
an agent subscribes to never raise out of ``Agent.handle`` and never reach the
supervisor's catch-all (``handler_errors`` stays 0). No broker needed: messages are
handed to the daemon directly, with a real SQLite journal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskfl.agent.config import load_config
from maskfl.agent.daemon import Agent
from maskfl.agent.identity import load_identity
from maskfl.agent.state import Journal
from maskfl.protocol.chunking import split_payload
from maskfl.protocol.messages import GlobalModel, Receipt, SeedDict, SumDict
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto
from maskfl.transport import Message
from tests.agent.fleet import Fleet, StandIn, summer_entry

DEVICE = "dev-f"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, Path, list[tuple[str, bytes]]]:
    """A device bundle and genuine coordinator messages of round 1 to mutate."""
    root = tmp_path_factory.mktemp("hostile")
    fleet = Fleet(root / "fleet")
    broker = Mosquitto(root / "unused")  # never started: only its address goes in the config
    config = fleet.device(DEVICE, broker)
    coord = StandIn(fleet, broker)
    weights = np.linspace(-1, 1, 32, dtype=np.float32)
    topics = Topics(fleet.name)
    params = coord.round_params(1, p_sum=0.0, p_update=0.0, weights=weights)
    genuine = [
        (topics.round, coord.sign(params, 1)),
        (topics.sums(1), coord.sign(SumDict((summer_entry(fleet, "s0", 1)[3],)), 1)),
        (topics.seeds(1, DEVICE), coord.sign(SeedDict(bytes(32), {bytes(32): bytes(80)}), 1)),
        (topics.receipts(DEVICE), coord.sign(Receipt(bytes(32), None, True), 1)),
        (
            topics.model_latest("mlp"),
            coord.sign(GlobalModel("mlp", 0, 1, bytes(32), weights), 1),  # type: ignore[arg-type]
        ),
        (topics.revocations, b"\x01" * 40),
        (topics.model_graph("mlp"), b"not a tflite model"),
    ]
    return fleet, config, genuine


def _mutations(genuine: list[tuple[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    topics = [t for t, _ in genuine] + ["maskfl/v1/other/round", "maskfl/v1/testfleet/nope/x"]

    @st.composite
    def flipped(draw: st.DrawFn) -> tuple[str, bytes]:
        topic, raw = draw(st.sampled_from(genuine))
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        cut = draw(st.integers(0, len(data)))
        return topic, bytes(data[:cut] if draw(st.booleans()) else data)

    @st.composite
    def chunked(draw: st.DrawFn) -> tuple[str, bytes]:
        topic, raw = draw(st.sampled_from(genuine))
        frames = split_payload(raw, max(64, len(raw) // 3))
        frame = bytearray(draw(st.sampled_from(frames)))
        frame[draw(st.integers(0, len(frame) - 1))] ^= 0xFF
        return topic, bytes(frame)

    garbage = st.tuples(st.sampled_from(topics), st.binary(max_size=600))
    return st.one_of(garbage, flipped(), chunked())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_nothing_on_the_wire_breaks_the_daemon(
    world: tuple[Fleet, Path, list[tuple[str, bytes]]], tmp_path: Path, data: st.DataObject
) -> None:
    _, config_path, genuine = world
    messages = data.draw(st.lists(_mutations(genuine), min_size=1, max_size=12))

    async def scenario() -> None:
        config = load_config(config_path)
        identity = load_identity(config.device)
        db = tmp_path / f"{abs(hash(tuple(messages)))}.sqlite3"
        async with Journal.open(db) as journal:
            agent = Agent(config, identity, journal)
            # A genuine round first (this device sits it out), so coordinator
            # messages are checked in full rather than parked.
            await agent.handle(Message(*genuine[0]))
            for topic, payload in messages:
                await agent.handle(Message(topic, payload))
            for topic, payload in genuine[1:]:
                await agent.handle(Message(topic, payload))
            assert agent.handler_errors == 0
            if agent.driver is not None:
                await agent.driver.stop()

    asyncio.run(scenario())
