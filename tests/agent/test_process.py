"""``maskfl-agent run`` as a real process: crash-resume, systemd notify, last will.

The agent is SIGKILLed between sum and sum2; restarted on the same state directory it
still delivers the sum2 computed with the ephemeral key from its journal. An updater
SIGKILLed after training (``trained``) or after publishing its update without a receipt
(``update_sent``) delivers exactly one update for the round after a restart. A real
NOTIFY_SOCKET (a unix datagram socket bound by the test, path and abstract) receives
READY=1, STATUS=..., WATCHDOG=1 at half of WATCHDOG_USEC and STOPPING=1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from maskfl.agent.datasources import load_dataset
from maskfl.agent.learning import holdout_split
from maskfl.agent.training import LocalTrainer
from maskfl.protocol.crypto import new_seed, open_seed, seal_seed
from maskfl.protocol.errors import Reason
from maskfl.protocol.masking import (
    aggregate_mask,
    decode_aggregate,
    error_bound,
    mask_stream,
    update_words,
)
from maskfl.protocol.messages import Sum, Sum2, Update, decode_message
from maskfl.protocol.topics import TopicKind
from maskfl.testing.broker import Mosquitto
from tests.agent.fleet import Fleet, StandIn, summer_entry

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class AgentProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "maskfl.agent.cli",
                    "run",
                    "--config",
                    str(config),
                    "--log-format",
                    "text",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "fleet")


def journal_step(db: Path, round_id: int) -> str | None:
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            row = conn.execute("SELECT step FROM rounds WHERE round_id = ?", (round_id,))
            found = row.fetchone()
        except sqlite3.OperationalError:  # the agent created the file, not yet its tables
            return None
    return None if found is None else str(found[0])


async def wait_for_step(db: Path, round_id: int, step: str, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    while journal_step(db, round_id) != step:
        if time.monotonic() > deadline:
            raise AssertionError(f"round {round_id} never reached {step}")
        await asyncio.sleep(0.05)  # inherent: the journal of an agent process, read from outside


async def test_sigkill_between_sum_and_sum2_still_delivers_sum2(
    fleet: Fleet, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = fleet.device("dev-k", mosquitto)
    db = fleet.root / "dev-k" / "state" / "agent.sqlite3"
    weights = np.linspace(-1, 1, 300, dtype=np.float32)
    async with StandIn(fleet, mosquitto) as coord:
        first = AgentProcess(config, tmp_path / "agent1.log")
        try:
            setup = await coord.start_round(1, p_sum=1.0, p_update=0.0, weights=weights)
            sum_message = await coord.expect(TopicKind.SUM)
            assert isinstance(sum_message.body, Sum)
            await coord.receipt("dev-k", sum_message)
            assert journal_step(db, 1) == "sum_sent"
        finally:
            first.kill()
        # The broker publishes the will: an empty status message ("gone").
        await coord.wait_gone("dev-k", 10)
        # While the agent is dead the update phase ends and its seeds are published.
        seeds = [new_seed() for _ in range(4)]
        pk = sum_message.body.ephemeral_pk
        sealed = {bytes([i + 1]) * 32: seal_seed(s, pk) for i, s in enumerate(seeds)}
        await coord.publish_seeds(1, "dev-k", sum_message.header.sender, sealed)
        second = AgentProcess(config, tmp_path / "agent2.log")
        try:
            message = await coord.expect(TopicKind.SUM2, wait_s=30)
            assert isinstance(message.body, Sum2)
            expected = aggregate_mask(seeds, update_words(setup.params.vector_length), 32)
            assert np.array_equal(message.body.words, expected), second.text()
            assert message.body.failed == ()
            await coord.receipt("dev-k", message)
            await wait_for_step(db, 1, "done")
            # Any Sum the restarted agent sent again is the same bytes: same key, same message.
            assert all(raw == sum_message.raw for raw in coord.raw[TopicKind.SUM])
            assert "resuming as sum:sum_sent" in second.text()
        finally:
            assert second.terminate() == 0, second.text()


@pytest.mark.parametrize("kill_at", ["trained", "update_sent"])
async def test_sigkill_after_training_delivers_exactly_one_update(
    fleet: Fleet, mosquitto: Mosquitto, tmp_path: Path, kill_at: str
) -> None:
    config = fleet.device("dev-u", mosquitto, extra="[training]\nepochs = 1\n")
    db = fleet.root / "dev-u" / "state" / "agent.sqlite3"
    weights = LocalTrainer.shipped("mlp").get_weights()
    rid = 2
    summer, summer_sk, _, summer_raw = summer_entry(fleet, "summer-0", rid)
    async with StandIn(fleet, mosquitto) as coord:
        first = AgentProcess(config, tmp_path / "agent1.log")
        try:
            setup = await coord.start_round(rid, p_sum=0.0, p_update=1.0, weights=weights)
            if kill_at == "update_sent":
                await coord.publish_sums(rid, [summer_raw])
                sent = await coord.expect(TopicKind.UPDATE, wait_s=60)
            # Without the sum dictionary the updater trains and then waits in ``trained``;
            # with it, the update is journaled before it is published (no receipt comes).
            await wait_for_step(db, rid, kill_at, wait_s=60)
        finally:
            first.kill()
        await coord.wait_gone("dev-u", 10)
        assert "trained on" in first.text()
        if kill_at == "trained":
            assert coord.raw[TopicKind.UPDATE] == []
            await coord.publish_sums(rid, [summer_raw])
        second = AgentProcess(config, tmp_path / "agent2.log")
        try:
            update = await coord.expect(TopicKind.UPDATE, wait_s=60)
            if kill_at == "update_sent":
                # The same bytes again; the coordinator already holds them: "duplicate".
                assert update.raw == sent.raw
                await coord.receipt("dev-u", update, accepted=False, reason=Reason.DUPLICATE)
            else:
                await coord.receipt("dev-u", update)
            await wait_for_step(db, rid, "done", wait_s=30)
            assert f"resuming as update:{kill_at}" in second.text(), second.text()
            assert "trained on" not in second.text()  # the journaled delta, not a retraining
        finally:
            assert second.terminate() == 0, second.text()
    assert len({digest_of(raw) for raw in coord.raw[TopicKind.UPDATE]}) == 1
    # The one update is the delta trained before the kill: recompute it (same model,
    # shard and seed) and unmask it with the seed sealed to the summer.
    body = update.body
    assert isinstance(body, Update)
    seed = open_seed(body.sealed_seeds[summer.public_key], summer_sk)
    cfg = setup.params.mask
    n = setup.params.vector_length
    values, weight_sum = decode_aggregate(
        body.words - mask_stream(seed, update_words(n), 32), 1, cfg
    )
    split = holdout_split(load_dataset("digits", {"shard": 0, "shards": 4}), 0.2)
    local = LocalTrainer.shipped("mlp").local_update(
        weights, split.x_train, split.y_train, epochs=1, batch_size=32, seed=rid
    )
    weight = min(local.num_samples, 1000) / 1000
    assert weight_sum == pytest.approx(weight, abs=1e-5)
    bound = error_bound(1, weight_sum, cfg) * weight_sum
    assert np.max(np.abs(values - np.clip(local.delta, -1.0, 1.0) * weight)) <= bound + 1e-5


def digest_of(raw: bytes) -> bytes:
    return decode_message(raw, max_size=len(raw)).digest


def _recv_until(sock: socket.socket, done: object, wait_s: float = 15.0) -> list[str]:
    """Datagrams until ``done(messages)`` is true."""
    messages: list[str] = []
    deadline = time.monotonic() + wait_s
    while not done(messages):  # type: ignore[operator]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError as exc:
            raise AssertionError(f"sd_notify messages so far: {messages}") from exc
    return messages


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="mfl") as path:
        yield Path(path)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_and_watchdog(
    fleet: Fleet, mosquitto: Mosquitto, tmp_path: Path, short_dir: Path, abstract: bool
) -> None:
    config = fleet.device("dev-n", mosquitto)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"maskfl-test-{uuid.uuid4().hex}"
            server.bind(b"\0" + name.encode())
            address = "@" + name
        else:
            address = str(short_dir / "notify")
            server.bind(address)
        agent = AgentProcess(
            config,
            tmp_path / "agent.log",
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"},
        )
        try:
            messages = _recv_until(
                server,
                lambda ms: (
                    any("READY=1" in m for m in ms)
                    and sum(m == "WATCHDOG=1" for m in ms) >= 3
                    and any(m.startswith("STATUS=connected") for m in ms)
                ),
            )
            ready = next(m for m in messages if "READY=1" in m)
            assert ready.startswith("READY=1\nSTATUS=")
            agent.proc.send_signal(signal.SIGTERM)
            _recv_until(server, lambda ms: "STOPPING=1" in ms)
            assert agent.proc.wait(15) == 0, agent.text()
        finally:
            if agent.proc.poll() is None:
                agent.kill()
