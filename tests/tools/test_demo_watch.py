"""What ``maskfl-demo`` watches the fleet with (tools/_demo_watch.py)."""

from __future__ import annotations

import asyncio

import pytest

from maskfl.tools._demo_watch import Event, SumsEvent, next_event


async def test_a_cancel_is_not_lost_to_an_event_arriving_at_the_same_moment() -> None:
    """Ctrl-C cancels the demo's main task; the round parameters the coordinator
    publishes as it becomes ready can arrive in the same loop iteration. The cancel
    must win (asyncio.wait_for on 3.11 returned the event and the demo ran on), and
    the event stays in the queue."""
    events: asyncio.Queue[Event] = asyncio.Queue()
    waiting = asyncio.create_task(next_event(events, 30.0))
    await asyncio.sleep(0)  # it waits on the queue now
    events.put_nowait(SumsEvent(1, ("dev-001",), 0.0))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert events.qsize() == 1


async def test_the_next_event_or_none_after_the_limit() -> None:
    events: asyncio.Queue[Event] = asyncio.Queue()
    assert await next_event(events, 0.01) is None
    event = SumsEvent(2, (), 0.0)
    events.put_nowait(event)
    assert await next_event(events, 30.0) is event
