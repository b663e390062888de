"""Sortition probabilities follow the devices seen alive through status heartbeats.

The coordinator takes liveness from the topic (the broker authenticated the sender
and its ACL pins ``status/<device>`` to that device): a signed heartbeat and any
other non-empty payload both count, an empty one (the last will) removes the device.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from maskfl.protocol.messages import Heartbeat, RoundParams, decode_message, encode_message
from maskfl.protocol.topics import Topics
from tests.support.harness import harness

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "opaque"])
async def test_probabilities_aim_at_the_targets(tmp_path: Path, signed: bool) -> None:
    pet = {
        "sum": {"prob": None, "target": 2, "count_min": 1, "time_min_s": 0.5, "time_max_s": 1.0},
        "update": {"prob": None, "target": 20},  # more than are alive
        "max_rounds": 3,
    }
    async with harness(tmp_path, summers=1, updaters=1, pet=pet) as h:
        fleet = h.setup.fleet
        topics = Topics(fleet.fleet)
        devices = [fleet.identity(f"alive-{k}") for k in range(12)]
        client = await h.client("hb")
        seen: list[RoundParams] = []

        async def watch() -> None:
            async for msg in client.messages():
                body = decode_message(msg.payload, max_size=1 << 20).body
                if isinstance(body, RoundParams):
                    seen.append(body)

        await client.subscribe(topics.round)
        reader = asyncio.create_task(watch())
        try:
            await h.start_coordinator()
            await h.until(lambda: bool(seen), "round 1")
            # Nobody heard from yet: the roles split in proportion to the targets.
            assert (seen[0].p_sum, seen[0].p_update) == (pytest.approx(2 / 22), 1.0)
            for ident in devices:
                hb = Heartbeat(ident.certificate, "idle", 1.0)
                raw = encode_message(
                    hb, fleet=fleet.fleet, round_id=0, signing_key=ident.signing_key
                )
                await client.publish(topics.status(ident.device_id), raw if signed else b"up")
            for ident in devices[:2]:  # their last will: gone
                await client.publish(topics.status(ident.device_id), b"")
            # Round 1 fails at time_max (nobody sends sum messages); round 2 sees ten
            # devices alive.
            h.advance(1.0)
            await h.until(lambda: any(p.round_id >= 2 for p in seen), "round 2")
        finally:
            reader.cancel()
        params = next(p for p in seen if p.round_id >= 2)
        # Ten alive: two summers expected whatever the update target (it was 2/22,
        # with no summer in 39 % of rounds), every other device an updater.
        assert params.p_sum == pytest.approx(2 / 10)
        assert params.p_update == 1.0
