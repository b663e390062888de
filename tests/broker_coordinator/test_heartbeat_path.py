"""Heartbeats stay off the path of round messages (issue 13, break 3): the coordinator
takes ``status/<device>`` off the transport (a tap) before the queue that updates,
sums and sum2 wait in, so a fleet's heartbeats never queue ahead of a round's
messages. Measured by ``maskfl-bench scale --parts idle``; this test shows the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maskfl.broker_coordinator.ingest import Ingest
from maskfl.protocol.topics import Topics
from maskfl.transport import Message
from tests.support.harness import harness

pytestmark = pytest.mark.timeout(60)


async def test_heartbeats_never_enter_the_queue_round_messages_wait_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued: list[str] = []
    handle = Ingest.handle

    async def spy(self: Ingest, message: Message) -> None:
        queued.append(message.topic)
        await handle(self, message)

    monkeypatch.setattr(Ingest, "handle", spy)
    async with harness(tmp_path, summers=3, updaters=5) as h:
        topics = Topics(h.setup.fleet.fleet)
        fleet = await h.client("fleet")
        coordinator = await h.start_coordinator()
        services = coordinator.services
        assert services is not None
        for i in range(50):
            await fleet.publish(topics.status(f"dev-{i:03d}"), b"hb", qos=0)
        await fleet.publish(topics.update(1, "dev-000"), os.urandom(200), qos=1)
        await h.until(lambda: services.alive_count() == 50, "50 devices alive")
        await h.until(lambda: topics.update(1, "dev-000") in queued, "the update queued")
        assert [t for t in queued if t.startswith(topics.status_prefix)] == []
