"""The baseline of ``maskfl-bench round``: the same round with the updates in the clear.

The same N updaters, broker and signed message format, sending their float32 deltas
unmasked to a minimal aggregator process (verify, weighted sum, publish the model;
nothing durable), and the subscriber that times when a round's model is out (both
rounds use it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.protocol.chunking import is_chunk, split_payload
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.identity import Certificate, Identity
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.messages import (
    GlobalModel,
    MessageType,
    RoundParams,
    Update,
    decode_message,
    encode_message,
    verify_sender,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.topics import TopicKind, Topics, parse_topic
from maskfl.testing.fleet import SimFleet
from maskfl.tools._supervise import Child, Supervisor
from maskfl.transport import MqttConfig, MqttTransport

FLEET = "bench"
MAX_IN = 64 * 1024 * 1024
CHUNK = 256 * 1024


class _Subscriber:
    """A client that reads one subscription in a task of its own until stopped."""

    transport: MqttTransport
    subscription: str

    def __init__(self) -> None:
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.transport.connect()
        await self.transport.subscribe(self.subscription, qos=1)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.transport.disconnect()

    async def _read(self) -> None:
        raise NotImplementedError


class ModelWatcher(_Subscriber):
    """One subscriber to ``model/<id>/latest``: when the round's model is out.

    Participants do not subscribe to models here, so the delivery of the initial
    model (published as the coordinator starts) does not load the round, and the
    model's fan-out to every device — the same broker cost with or without masking —
    is left out of both rounds.
    """

    def __init__(self, port: int, fleet: str, model_id: str) -> None:
        super().__init__()
        self.subscription = Topics(fleet).model_latest(model_id)
        self.transport = MqttTransport(
            MqttConfig(
                host="127.0.0.1",
                port=port,
                client_id=f"watch-{fleet}",
                max_incoming_payload=MAX_IN,
            )
        )
        self.at: float | None = None
        self.model: GlobalModel | None = None
        self._reassembler: Reassembler[None] = Reassembler(4, MAX_IN, 600.0)

    async def _read(self) -> None:
        async for msg in self.transport.messages():
            payload = msg.payload
            if is_chunk(payload):
                whole = self._reassembler.feed(msg.topic, payload, time.monotonic())
                if whole is None:
                    continue
                payload = whole.payload
            if not payload:
                continue
            at = time.perf_counter()
            body = decode_message(payload, max_size=MAX_IN).body
            if isinstance(body, GlobalModel) and body.version >= 1 and self.at is None:
                self.at, self.model = at, body


class _PlainParticipant(_Subscriber):
    """Sends its float32 delta in the clear, signed, in the same message format."""

    def __init__(self, identity: Identity, port: int) -> None:
        super().__init__()
        self.identity = identity
        self.topics = Topics(identity.fleet)
        self.subscription = self.topics.round
        self.transport = MqttTransport(
            MqttConfig(
                host="127.0.0.1",
                port=port,
                client_id=identity.device_id,
                max_incoming_payload=MAX_IN,
                incoming_queue_size=10_000,
            )
        )
        self.params_at: float | None = None
        self.bytes_sent = 0

    async def _read(self) -> None:
        async for msg in self.transport.messages():
            if not msg.payload:
                continue
            kind = parse_topic(msg.topic).kind
            if kind is TopicKind.ROUND and self.params_at is None:
                self.params_at = time.perf_counter()
                params = decode_message(msg.payload, max_size=MAX_IN).body
                assert isinstance(params, RoundParams)
                await self._send(params)

    async def _send(self, params: RoundParams) -> None:
        m = params.vector_length
        rng = np.random.default_rng()
        delta = rng.uniform(-0.5, 0.5, m).astype(np.float32)
        words = np.empty(m + 1, dtype=np.uint32)
        words[:m] = delta.view(np.uint32)
        words[m] = np.float32(rng.uniform(0.2, 1.0)).view(np.uint32)
        ident = self.identity
        raw = encode_message(
            Update(ident.certificate, {}, words),
            fleet=ident.fleet,
            round_id=int(params.round_id),
            signing_key=ident.signing_key,
        )
        topic = self.topics.update(int(params.round_id), ident.device_id)
        for frame in split_payload(raw, params.chunk_size):
            await self.transport.publish(topic, frame, qos=1)
        self.bytes_sent += len(raw)


async def plain_round(
    root: Path, supervisor: Supervisor, port: int, *, n: int, m: int
) -> dict[str, Any]:
    fleet = SimFleet(fleet=FLEET + "-plain")
    config = fleet.write_coordinator(
        root / "plain",
        port=port,
        length=m,
        overrides={"pet": {"update": {"target": n, "count_max": 100}}},
    )
    participants = [_PlainParticipant(fleet.identity(f"plain-{i:03d}"), port) for i in range(n)]
    watcher = ModelWatcher(port, fleet.fleet, "bench")
    await watcher.start()
    await asyncio.gather(*(p.start() for p in participants))
    out = root / "plain" / "result.json"
    try:
        aggregator = supervisor.start(
            "plain-aggregator",
            [
                sys.executable,
                "-m",
                "maskfl.tools.bench_round",
                "plain-aggregator",
                "--config",
                str(config),
                "--n",
                str(n),
                "--out",
                str(out),
            ],
        )
        await _until_published(supervisor, aggregator, watcher)
    finally:
        await asyncio.gather(*(p.stop() for p in participants), return_exceptions=True)
        await watcher.stop()
    agg = json.loads(out.read_text())
    t0 = min(p.params_at for p in participants if p.params_at is not None)
    t_end = watcher.at
    assert t_end is not None  # _until_published returned
    return {
        "seconds": {
            "upload": round(agg["last_update_perf"] - t0, 4),
            "total": round(t_end - t0, 4),
        },
        "aggregator_seconds": agg["seconds"],
        "bytes_per_updater": int(np.mean([p.bytes_sent for p in participants])),
    }


async def _until_published(
    supervisor: Supervisor, aggregator: Child, watcher: ModelWatcher
) -> None:
    """Until the aggregator's model reaches the watcher (600 s at most); the aggregator
    exits after publishing it."""
    deadline = time.monotonic() + 600
    while watcher.at is None:
        code = aggregator.proc.poll()
        if code is not None:
            aggregator.expected_exit = True
            if code != 0:
                raise MaskflError(f"the plain aggregator failed ({code}): {aggregator.log_tail()}")
        supervisor.check()
        if time.monotonic() > deadline:
            raise MaskflError(f"the plain round did not finish; see {aggregator.log_path}")
        await asyncio.sleep(0.02)
    aggregator.expected_exit = True
    aggregator.proc.wait(30)


async def plain_aggregator(config_path: Path, n: int, out: Path) -> None:
    """The plain aggregator process: publish round parameters, verify and add ``n`` plain
    updates, publish their weighted mean as the model; its times into ``out``."""
    from maskfl.broker_coordinator.config import load_config
    from maskfl.broker_coordinator.service import load_identity

    config = load_config(config_path)
    ca, key, cert = load_identity(config)
    fleet = config.fleet.id
    m = config.model.length
    topics = Topics(fleet)
    transport = MqttTransport(
        MqttConfig(
            host=config.broker.host,
            port=config.broker.port,
            client_id="plain-aggregator",
            max_incoming_payload=MAX_IN,
            incoming_queue_size=10_000,
        )
    )
    await transport.connect()
    await transport.subscribe(f"{topics.prefix}round/+/update/+", qos=1)  # before the round
    total = _PlainSum(fleet, ca, m)
    t0 = time.perf_counter()
    await transport.publish(
        topics.round,
        encode_message(_plain_params(m, cert), fleet=fleet, round_id=1, signing_key=key),
        qos=1,
        retain=True,
    )
    first = await _add_updates(transport, total, n)
    last = time.perf_counter()
    model = GlobalModel(
        model_id="bench",
        version=1,
        round_id=1,  # type: ignore[arg-type]
        previous_digest=bytes(32),
        weights=total.mean(),
    )
    await transport.publish(
        topics.model_latest("bench"),
        encode_message(model, fleet=fleet, round_id=1, signing_key=key),
        qos=1,
        retain=True,
    )
    done = time.perf_counter()
    await transport.disconnect()
    await asyncio.to_thread(out.write_text, total.result(t0, first, last, done))


async def _add_updates(transport: MqttTransport, total: _PlainSum, n: int) -> float | None:
    """Receive, verify and add ``n`` updates; when the first arrived (reassembled)."""
    m = total.m
    reassembler: Reassembler[None] = Reassembler(
        4 * n + 8, 8 * (4 * m + 1_000_000) * n + (1 << 20), 600.0, max_per_key=2
    )
    first: float | None = None
    async for msg in transport.messages():
        payload = msg.payload
        if is_chunk(payload):
            whole = reassembler.feed(msg.topic, payload, time.monotonic())
            if whole is None:
                continue
            payload = whole.payload
        first = first or time.perf_counter()
        total.add(payload)
        if total.count >= n:
            break
    return first


def _plain_params(m: int, cert: Certificate) -> RoundParams:
    """Round 1's parameters: updates only, no summers."""
    return RoundParams(
        round_id=1,  # type: ignore[arg-type]
        seed=bytes(32),
        previous_seed=bytes(32),
        p_sum=0.0,
        p_update=1.0,
        sum_time_max_s=1.0,
        update_time_max_s=600.0,
        sum2_time_max_s=1.0,
        model_id="bench",
        model_version=0,
        model_digest=bytes(32),
        mask=MaskConfig(1.0, 100, 32),
        vector_length=m,
        chunk_size=CHUNK,
        certificate=cert,
    )


class _PlainSum:
    """The weighted sum of plain updates, with the time spent verifying and adding."""

    def __init__(self, fleet: str, ca: bytes, m: int) -> None:
        self.fleet, self.ca, self.m = fleet, ca, m
        self.acc = np.zeros(m, dtype=np.float64)
        self.weight_sum = 0.0
        self.count = 0
        self.verify_s = 0.0
        self.add_s = 0.0

    def add(self, payload: bytes) -> None:
        """Verify one signed plain update and add its clipped delta, weighted."""
        m, fleet = self.m, self.fleet
        a = time.perf_counter()
        signed = decode_message(payload, max_size=MAX_IN)
        signed.expect(fleet=fleet, round_id=1, types=(MessageType.UPDATE,))
        verify_sender(signed, ca_public_key=self.ca, fleet=fleet, now=time.time(), revocations=None)
        body = signed.body
        assert isinstance(body, Update)
        b = time.perf_counter()
        words: npt.NDArray[np.uint32] = np.asarray(body.words)
        weight = float(words[m:].view(np.float32)[0])
        self.acc += weight * np.clip(words[:m].view(np.float32), -1.0, 1.0)
        self.weight_sum += weight
        self.count += 1
        self.add_s += time.perf_counter() - b
        self.verify_s += b - a

    def mean(self) -> npt.NDArray[np.float32]:
        return (self.acc / self.weight_sum).astype(np.float32)

    def result(self, t0: float, first: float | None, last: float, done: float) -> str:
        """The aggregator's times as JSON: from the round parameters (``t0``) to the first
        and the last update, and the model published (``done``)."""
        return json.dumps(
            {
                "seconds": {
                    "wait_first_update": round((first or last) - t0, 4),
                    "receive_all": round(last - t0, 4),
                    "verify": round(self.verify_s, 4),
                    "add": round(self.add_s, 4),
                    "publish_model": round(done - last, 4),
                },
                "last_update_perf": last,  # CLOCK_MONOTONIC: comparable across processes
            }
        )
