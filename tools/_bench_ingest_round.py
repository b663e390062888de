"""The round ``maskfl-bench coordinator`` drives: the coordinator's config for one round of N
updates, the simulated summers, what the bench sees of the round on the broker (with
arrival times), and the N updates built before the clock starts (masking is the agents'
cost, not the coordinator's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.protocol.chunking import is_chunk, split_payload
from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    GlobalModel,
    Receipt,
    RoundParams,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.sortition import group_of
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import SimParticipant
from maskfl.tools._bench_publish import write_frames
from maskfl.tools._supervise import Supervisor
from maskfl.transport import MQTT_MAX_PACKET, MqttConfig, MqttTransport

CHUNK = 256 * 1024
P_SUM = 0.5


@dataclass(frozen=True)
class Setup:
    """The coordinator's config file and the round's participants."""

    config: Path
    http_port: int
    seed1: bytes
    summer_ids: list[Any]
    updater_ids: list[Any]
    n_max: int


def configure(
    fleet: SimFleet,
    work: Path,
    *,
    n: int,
    m: int,
    port: int,
    backend: str,
    storage: dict[str, Any],
    pet: dict[str, Any],
    groups: int,
) -> Setup:
    """Write the coordinator's config for one round of ``n`` updates and max(2, g) summers."""
    n_summers = max(2, groups)
    http_port = free_port()
    # update.count_max = N may not exceed masking.n_max (the config refuses it).
    n_max = max(1000, n)
    initial = np.zeros(m, dtype=np.float32)
    seed1 = first_round_seed(bytes(32), initial)
    summer_ids, updater_ids = fleet.identities_for_roles(
        seed1, p_sum=P_SUM, p_update=1.0, summers=n_summers, updaters=n, groups=groups
    )
    config = fleet.write_coordinator(
        work / "coordinator",
        port=port,
        length=m,
        initial=initial,
        overrides={
            "masking": {"bound": 1.0, "n_max": n_max, "word_bits": 32, "groups": groups},
            "aggregation": {"backend": backend},
            **({"storage": storage} if storage else {}),
            "pet": {
                **pet,
                "chunk_size": CHUNK,
                "max_rounds": 2,
                "round_pause_s": 600.0,
                # target only bounds groups here (prob sets p_sum)
                "sum": {
                    "prob": P_SUM,
                    "target": max(3, n_summers),
                    "count_min": n_summers,
                    "count_max": n_summers,
                    "time_max_s": 120.0,
                },
                "update": {"prob": 1.0, "count_min": n, "count_max": n, "time_max_s": 600.0},
                "sum2": {"count_min": n_summers, "count_max": n_summers, "time_max_s": 600.0},
            },
            # info: the unmask line with the coordinator's own timings (a few lines a round)
            "log": {"level": os.environ.get("MASKFL_BENCH_LOG", "info"), "format": "text"},
            # The privacy floor: 3 by default, 2 at the least (a round of 2 updaters).
            "privacy": {"min_updates": min(3, max(2, n))},
            "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        },
    )
    return Setup(config, http_port, seed1, summer_ids, updater_ids, n_max)


class Watch:
    """What the bench sees of the round on the broker, with arrival times: the round
    parameters, the sum dictionary, update and sum2 receipts, the global model."""

    def __init__(self, topics: Topics, port: int) -> None:
        self.topics = topics
        self.events: dict[str, float] = {}
        self.accepted: list[float] = []
        self.sum_dict: asyncio.Future[SumDict] = asyncio.get_running_loop().create_future()
        self.model_seen = asyncio.Event()
        self._model_frames: Reassembler[None] = Reassembler(16, 1 << 31, 600.0)
        self.observer = MqttTransport(
            MqttConfig(
                host="127.0.0.1",
                port=port,
                client_id="bench-observer",
                max_incoming_payload=MQTT_MAX_PACKET,  # a global model of M = 2.5e7 is 100 MB
                incoming_queue_size=100_000,
            )
        )

    async def connect(self) -> None:
        await self.observer.connect()
        p = self.topics.prefix
        await self.observer.subscribe(
            [f"{p}round", f"{p}round/+/sums", f"{p}receipts/+", f"{p}model/+/latest"]
        )

    async def observe(self) -> None:
        async for msg in self.observer.messages():
            if not msg.payload:
                continue
            now = time.time()  # the last frame's arrival, before decoding a large message
            payload = msg.payload
            if is_chunk(msg.payload):  # global models above the chunk size
                whole = self._model_frames.feed(msg.topic, msg.payload, now)
                if whole is None:
                    continue
                payload = whole.payload
            try:
                body = decode_message(payload, max_size=1 << 31).body
            except MaskflError as exc:
                print(f"maskfl-bench coordinator: observer: {msg.topic}: {exc}", file=sys.stderr)
                continue
            self._saw(body, now)

    def _saw(self, body: Any, now: float) -> None:
        events = self.events
        if isinstance(body, RoundParams) and body.round_id == 1:
            events.setdefault("round_params", now)
        elif isinstance(body, SumDict) and not self.sum_dict.done():
            self.sum_dict.set_result(body)
        elif isinstance(body, Receipt) and body.accepted and body.message_type is not None:
            if body.message_type.name == "UPDATE":
                self.accepted.append(now)
            elif body.message_type.name == "SUM2":
                events["last_sum2"] = now
        elif isinstance(body, GlobalModel) and body.version >= 1:
            events["model"] = now
            self.model_seen.set()


@contextlib.asynccontextmanager
async def watched_round(fleet: SimFleet, setup: Setup, port: int) -> AsyncIterator[Watch]:
    """The simulated summers running and the round watched, for the body's duration."""
    summers = [
        SimParticipant(i, ca_public_key=fleet.ca_public_key, host="127.0.0.1", port=port)
        for i in setup.summer_ids
    ]
    watch = Watch(Topics(fleet.fleet), port)
    await watch.connect()
    for s in summers:
        await s.start()
    watcher = asyncio.create_task(watch.observe())
    try:
        yield watch
    finally:
        watcher.cancel()
        for s in summers:
            await s.stop()
        await watch.observer.disconnect()


@dataclass(frozen=True)
class Built:
    """The round's updates, chunked and written to ``frames_file`` for the publishers."""

    frames_file: Path
    seconds: float
    total_bytes: int
    total_frames: int
    update_bytes: int
    frames_per_update: int


async def build_updates(
    fleet: SimFleet, setup: Setup, sums: SumDict, work: Path, *, m: int, groups: int
) -> Built:
    """Build every update before the clock starts (masking is the agents' cost)."""
    seed1 = setup.seed1
    topics = Topics(fleet.fleet)
    opened = open_sum_dict(
        sums,
        fleet=fleet.fleet,
        round_id=1,
        ca_public_key=fleet.ca_public_key,
        now=time.time(),
        revocations=None,
        groups=groups,
        round_seed=seed1,
    )
    cfg = MaskConfig(1.0, setup.n_max, 32)
    rng = np.random.default_rng(0)
    frames: list[tuple[str, list[bytes]]] = []
    build_started = time.perf_counter()

    def build(ident: Any) -> tuple[str, list[bytes]]:
        seeds = [new_seed() for _ in range(groups)]  # one per mask group
        delta = rng.uniform(-0.1, 0.1, m).astype(np.float32)
        words = mask_update(delta, 0.5, seeds, cfg)
        sealed = {
            s.certificate.public_key: seal_seed(
                seeds[group_of(seed1, s.certificate.public_key, groups)], s.ephemeral_pk
            )
            for s in opened
        }
        raw = encode_message(
            Update(ident.certificate, sealed, words),
            fleet=fleet.fleet,
            round_id=1,
            signing_key=ident.signing_key,
        )
        return topics.update(1, ident.device_id), split_payload(raw, CHUNK)

    for ident in setup.updater_ids:
        # In a thread: at M = 2.5e7 building takes seconds per update, and a blocked
        # loop misses the MQTT keepalives of the observer and the summers.
        frames.append(await asyncio.to_thread(build, ident))
    build_s = time.perf_counter() - build_started
    frames_file = work / "frames.bin"
    write_frames(frames_file, frames)
    return Built(
        frames_file=frames_file,
        seconds=build_s,
        total_bytes=sum(len(f) for _, fs in frames for f in fs),
        total_frames=sum(len(fs) for _, fs in frames),
        update_bytes=len(b"".join(frames[0][1])) if frames else 0,
        frames_per_update=len(frames[0][1]) if frames else 0,
    )


async def until_accepted(watch: Watch, n: int, sup: Supervisor) -> None:
    """Until the coordinator's receipts accepted ``n`` updates (600 s at most)."""
    deadline = time.monotonic() + 600
    while len(watch.accepted) < n:
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(watch.accepted)} of {n} updates accepted")
        await asyncio.sleep(0.005)
    print(f"maskfl-bench coordinator: {n} updates accepted", file=sys.stderr)
