"""A hostile client attacks the coordinator's topics while an honest round runs.

Every bad message must get the right rejection receipt, the rejection must be
counted, the round must still publish exactly the weighted mean of the honest
updates, and floods of garbage and never-completed chunked messages must stay
within the configured bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from nacl.signing import SigningKey

from maskfl.protocol.chunking import CHUNK_HEADER_SIZE, split_payload
from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.identity import Identity
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    Receipt,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.sortition import Task, select_task
from maskfl.protocol.topics import Topics
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import Behaviour
from maskfl.transport import Transport
from tests.broker_coordinator.support import P_SUM, M, trained
from tests.broker_coordinator.test_round_harness import check_mean
from tests.support.harness import Harness, harness

pytestmark = pytest.mark.timeout(120)


def _summer_ticket_identity(fleet: SimFleet, seed: bytes, name: str, **kw: object) -> Identity:
    """An enrolled identity whose ticket makes it a summer (so its updates are not eligible)."""
    while True:
        key = SigningKey.generate()
        if select_task(seed, bytes(key.verify_key), P_SUM, 1.0) is Task.SUM:
            return fleet.identity(name, key=key, **kw)  # type: ignore[arg-type]


class Hostile:
    """One MQTT client that publishes anything anywhere and reads every receipt."""

    def __init__(self, transport: Transport, fleet: str) -> None:
        self.t = transport
        self.topics = Topics(fleet)
        self.receipts: dict[str, list[Receipt]] = {}
        self.updates: list[tuple[str, bytes]] = []
        self.sum_dicts: list[SumDict] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        p = self.topics.prefix
        await self.t.subscribe([f"{p}receipts/+", f"{p}round/+/update/+", f"{p}round/+/sums"])
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.t.messages():
            if not msg.payload:
                continue
            if "/receipts/" in msg.topic:
                body = decode_message(msg.payload, max_size=1 << 16).body
                assert isinstance(body, Receipt)
                self.receipts.setdefault(msg.topic.rsplit("/", 1)[1], []).append(body)
            elif msg.topic.endswith("/sums"):
                body = decode_message(msg.payload, max_size=1 << 20).body
                assert isinstance(body, SumDict)
                self.sum_dicts.append(body)
            else:
                self.updates.append((msg.topic, msg.payload))

    def reasons(self, device: str) -> dict[bytes, str]:
        return {
            r.message_digest: ("accepted" if r.accepted else str(r.reason))
            for r in self.receipts.get(device, [])
        }

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


def _update(
    ident: Identity, round_id: int, sums: SumDict, fleet: SimFleet, cfg: MaskConfig
) -> bytes:
    opened = open_sum_dict(
        sums,
        fleet=fleet.fleet,
        round_id=1,
        ca_public_key=fleet.ca_public_key,
        now=time.time(),
        revocations=None,
    )
    seed = new_seed()
    words = mask_update(np.full(M, 0.9, np.float32), 1.0, seed, cfg)
    sealed = {s.certificate.public_key: seal_seed(seed, s.ephemeral_pk) for s in opened}
    return encode_message(
        Update(ident.certificate, sealed, words),
        fleet=fleet.fleet,
        round_id=round_id,
        signing_key=ident.signing_key,
    )


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw[:152]).digest()


async def test_hostile_client_cannot_disturb_the_round(tmp_path: Path) -> None:
    async with harness(
        tmp_path,
        summers=3,
        updaters=5,
        pet={
            "update": {"time_min_s": 3.0},
            "message_memory_max_bytes": 4 << 20,
            "reassembly_max_messages": 8,
            "max_rounds": 2,
            "round_pause_s": 30.0,
        },
        extra={"fleet": {"revocations_file": "revocations.bin", "revocations_poll_s": 0.2}},
    ) as h:
        await _attack(h)


async def _attack(h: Harness) -> None:  # noqa: PLR0915 one attack after another on one round
    setup = h.setup
    fleet = setup.fleet
    seed1 = first_round_seed(bytes(32), setup.initial)
    evil = _summer_ticket_identity(fleet, seed1, "evil")
    expired = fleet.identity("evil-old", not_after=int(h.clock()) - 60)
    revoked = fleet.identity("evil-revoked")
    fleet.revocations(setup.config_path.parent / "revocations.bin", [revoked.certificate.serial], 1)
    stranger = SimFleet(fleet=fleet.fleet).identity("stranger")  # another CA, same fleet name

    # The last honest update is held back until the replay of the first accepted one
    # has its answer: the update phase (count_max = 5) is open for the replay, which
    # must be answered duplicate, not phase_closed. (On a real broker this was a race
    # that updates spaced 1 s apart only made unlikely.)
    last = asyncio.Event()
    summers, updaters = h.fleet({setup.updaters[-1].device_id: Behaviour(update_gate=last)})
    honest = summers + updaters
    hostile = Hostile(await h.client("hostile"), fleet.fleet)
    await hostile.start()
    await h.start(honest)
    cfg = MaskConfig(1.0, 100, 32)
    topics = Topics(fleet.fleet)
    try:
        coordinator = await h.start_coordinator()
        await h.until(lambda: bool(hostile.sum_dicts), "the sum dictionary")
        sums = hostile.sum_dicts[-1]
        rss0 = psutil.Process(os.getpid()).memory_info().rss
        expect: dict[str, dict[bytes, str]] = {}

        async def send(
            ident_name: str, topic: str, payload: bytes, digest: bytes, why: str
        ) -> None:
            await hostile.t.publish(topic, payload)
            expect.setdefault(ident_name, {})[digest] = why

        garbage = os.urandom(700)
        await send(
            "evil",
            topics.update(1, "evil"),
            garbage,
            hashlib.sha256(garbage).digest(),
            "malformed",
        )
        good_evil = _update(evil, 1, sums, fleet, cfg)
        await send("evil", topics.update(1, "evil"), good_evil, _digest(good_evil), "not_eligible")
        truncated = good_evil[: len(good_evil) - 100]
        await send(
            "evil",
            topics.update(1, "evil"),
            truncated,
            hashlib.sha256(truncated).digest(),
            "wrong_length",
        )
        big = os.urandom(100_000)
        await send("evil", topics.update(1, "evil"), big, hashlib.sha256(big).digest(), "oversize")
        wrong_round = _update(evil, 99, sums, fleet, cfg)
        await send(
            "evil", topics.update(99, "evil"), wrong_round, _digest(wrong_round), "wrong_round"
        )
        forged = bytearray(_update(evil, 1, sums, fleet, cfg))
        forged[160] ^= 0xFF  # inside the signature
        await send(
            "evil",
            topics.update(1, "evil"),
            bytes(forged),
            hashlib.sha256(forged).digest(),
            "bad_signature",
        )
        old = _update(expired, 1, sums, fleet, cfg)
        await send("evil-old", topics.update(1, "evil-old"), old, _digest(old), "expired")
        rev = _update(revoked, 1, sums, fleet, cfg)
        await send("evil-revoked", topics.update(1, "evil-revoked"), rev, _digest(rev), "revoked")
        unknown = _update(stranger, 1, sums, fleet, cfg)
        await send(
            "stranger", topics.update(1, "stranger"), unknown, _digest(unknown), "unenrolled"
        )
        # Floods: garbage, and first frames of chunked messages that never complete.
        for _ in range(300):
            await hostile.t.publish(topics.update(1, "evil"), os.urandom(200), qos=0)
        # (4,000 bytes: under the round's per-message limit, ~5.8 kB at M = 1,000, so
        # that they reach reassembly; 10,000 were all refused as oversize at once.)
        for _ in range(100):
            frames = split_payload(os.urandom(4_000), CHUNK_HEADER_SIZE + 1024)
            await hostile.t.publish(topics.update(1, "evil"), frames[0], qos=1)
        # One more piece of garbage after the floods: the coordinator takes its messages
        # in order, so once this one is judged every frame before it was taken in.
        await hostile.t.publish(topics.update(1, "evil"), os.urandom(200), qos=1)
        ingest = coordinator.ingest
        assert ingest is not None
        await h.until(
            lambda: coordinator.metrics.rejected_total().get("malformed", 0) >= 1 + 300 + 1,
            "both floods taken in",
        )
        r = ingest.chunks
        assert 0 < r.pending_messages <= 8 and r.reserved_bytes <= 4 << 20
        assert ingest.chunks.held <= 8 * 8
        # Replay an honest update once it is accepted.
        first = updaters[0]
        await h.until(lambda: bool(first.receipts), "the first honest update's receipt")
        topic, raw = next(
            (m.topic, m.payload) for m in first.transport.published if "/update/" in m.topic
        )
        victim = first.device
        await h.until(lambda: _digest(raw) in hostile.reasons(victim), "the update's receipt")
        assert hostile.reasons(victim) == {_digest(raw): "accepted"}
        await hostile.t.publish(topic, raw)
        await h.until(
            lambda: [r.reason for r in hostile.receipts.get(victim, [])][-1:] == ["duplicate"],
            "the replay's receipt",
        )
        last.set()
        await h.until(lambda: all(trained(p) for p in honest), "the global model")
        await h.until(
            lambda: all(set(v) <= set(hostile.reasons(k)) for k, v in expect.items()),
            "every rejection receipt",
        )
        assert psutil.Process(os.getpid()).memory_info().rss - rss0 < 100 * 2**20
        rejected = coordinator.metrics.rejected_total()
    finally:
        hostile.stop()
    for device, wanted in expect.items():
        got = hostile.reasons(device)
        assert {d: got[d] for d in wanted} == wanted, device
    for reason in (
        "malformed",
        "not_eligible",
        "wrong_length",
        "oversize",
        "wrong_round",
        "bad_signature",
        "expired",
        "revoked",
        "unenrolled",
        "duplicate",
    ):
        assert rejected.get(reason, 0) >= 1, (reason, rejected)
    assert rejected["malformed"] >= 300
    model = trained(honest[0])[0]
    metrics = dict(model.metrics)
    assert metrics["updates"] == 5
    check_mean(h, updaters, model)


async def test_a_flood_of_unfinished_uploads_is_refused_and_admitted_ones_stay(
    tmp_path: Path,
) -> None:
    """The coordinator's own reassembler (as ``Ingest`` configures it) refuses a new
    chunked message that finds no room and keeps the ones it admitted: evicting them
    instead is the livelock of issue 13 (each new upload pushes out an older one and
    none completes). The partials here never complete, from ten devices, against
    room for four and no spool."""
    async with harness(
        tmp_path,
        summers=3,
        updaters=5,
        pet={"reassembly_max_messages": 4, "reassembly_spool_max_bytes": 0},
    ) as h:
        topics = Topics(h.setup.fleet.fleet)
        hostile = Hostile(await h.client("hostile"), h.setup.fleet.fleet)
        await hostile.start()
        try:
            coordinator = await h.start_coordinator()
            for i in range(10):
                frames = split_payload(os.urandom(4_000), CHUNK_HEADER_SIZE + 1024)
                await hostile.t.publish(topics.update(1, f"evil-{i}"), frames[0], qos=1)
            # in order: once this one is judged, every frame before it was taken in
            await hostile.t.publish(topics.update(1, "evil-0"), os.urandom(200), qos=1)
            await h.until(
                lambda: coordinator.metrics.rejected_total().get("malformed", 0) >= 1,
                "the flood taken in",
            )
            ingest = coordinator.ingest
            assert ingest is not None
            chunks = ingest.chunks
            assert chunks.pending_messages == 4 and chunks.evicted == 0
            assert chunks.status()["refused"] == 6
        finally:
            hostile.stop()
