"""The receipt outbox never drops a receipt and acks a message only after its receipt."""

from __future__ import annotations

import asyncio

from maskfl.broker_coordinator.metrics import Metrics
from maskfl.broker_coordinator.outbox import Outbox
from maskfl.protocol.chunking import split_payload
from maskfl.transport import PayloadTooLargeError, RefusedError


class SlowBroker:
    """A transport whose PUBACKs come only when the test says so."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.puback = asyncio.Event()
        self.attempted = asyncio.Event()
        """Set at the first publish: the outbox is sending (and waits for the PUBACK)."""
        self.refuse: set[str] = set()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        self.attempted.set()
        await self.puback.wait()
        if topic in self.refuse:
            raise RefusedError(
                "not authorized", packet="PUBACK", reason_code=135, reason="Not authorized"
            )
        self.published.append((topic, payload))


async def test_a_flood_of_receipts_waits_for_the_broker_and_none_is_dropped() -> None:
    broker = SlowBroker()
    metrics = Metrics()
    outbox = Outbox(broker, metrics)  # type: ignore[arg-type]
    acked: list[int] = []
    n = 10_000  # five times the old limit of 2,000 pending receipts
    for i in range(n):
        outbox.receipt(f"receipts/dev-{i}", b"r%d" % i, then=lambda i=i: acked.append(i))  # type: ignore[misc]
    outbox.resend_stored([(b"d" * 32, "receipts/dev-stored", b"stored")])
    async with asyncio.timeout(10):
        await broker.attempted.wait()  # sending, blocked on the PUBACK
    assert outbox.pending == n + 1
    assert acked == []  # no message is acked before the broker has its receipt
    assert outbox.take_sent() == []
    broker.puback.set()
    await outbox.wait_sent(10)
    assert outbox.pending == 0
    assert len(broker.published) == n + 1
    assert sorted(acked) == list(range(n))
    assert outbox.take_sent() == [b"d" * 32]  # its row may go now
    assert outbox.take_sent() == []


async def test_a_refused_receipt_is_counted_and_its_message_acked() -> None:
    broker = SlowBroker()
    broker.refuse.add("receipts/dev-1")
    broker.puback.set()
    metrics = Metrics()
    outbox = Outbox(broker, metrics)  # type: ignore[arg-type]
    acked: list[str] = []
    outbox.receipt("receipts/dev-1", b"x", then=lambda: acked.append("dev-1"))
    await outbox.wait_sent(5)
    assert acked == ["dev-1"]
    failed = metrics.registry.get_sample_value("maskfl_coordinator_receipts_failed_total")
    assert failed == 1


class SmallPacketBroker:
    """A transport whose broker takes no packet above ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.published: list[tuple[str, bytes, bool]] = []

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        if len(payload) > self.limit:
            raise PayloadTooLargeError("too large", size=len(payload), limit=self.limit)
        self.published.append((topic, payload, retain))


async def test_a_retained_message_too_large_for_the_broker_goes_in_frames_of_pet_chunk_size() -> (
    None
):
    """Every retained publish (graph, model, round messages) falls back to frames of the
    configured ``pet.chunk_size``, not of a size written at one call site."""
    broker = SmallPacketBroker(limit=10_000)
    outbox = Outbox(broker, Metrics(), chunk_size=8192)  # type: ignore[arg-type]
    payload = bytes(range(256)) * 80  # 20,480 bytes
    await outbox.state("model/m/latest", payload)
    assert [p for _, p, _ in broker.published] == split_payload(payload, 8192)
    assert len(broker.published) == 3
    assert not any(retain for _, _, retain in broker.published)
