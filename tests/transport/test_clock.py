"""The injected clock: waits end when its time passes, real or the harness's fake one."""

from __future__ import annotations

import asyncio
import time

import pytest

from maskfl.transport import SYSTEM_CLOCK, wait_for
from tests.support.harness import FakeClock


async def waiting(
    clock: FakeClock, seconds: float
) -> tuple[asyncio.Future[str], asyncio.Task[str]]:
    """A future and a :func:`wait_for` of it on ``clock``, its timer armed."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    wait = asyncio.create_task(wait_for(clock, future, seconds))
    await armed(clock, clock() + seconds)
    return future, wait


async def armed(clock: FakeClock, end: float, count: int = 1) -> None:
    """Until ``count`` sleeps on ``clock`` end at ``end`` (the clock says when one arms)."""
    changed = asyncio.Event()
    clock.on_change(changed.set)
    while clock.sleeps.count(end) < count:
        changed.clear()
        await changed.wait()


async def test_a_result_within_the_time_is_returned_and_the_timer_dropped() -> None:
    clock = FakeClock()
    future, wait = await waiting(clock, 10)
    clock.advance(9)
    future.set_result("receipt")
    assert await wait == "receipt"
    assert clock.sleeps == []


async def test_the_time_running_out_on_the_clock_times_out_and_cancels() -> None:
    clock = FakeClock()
    kept: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    bare, first = await waiting(clock, 10)
    second = asyncio.create_task(wait_for(clock, asyncio.shield(kept), 10))
    await armed(clock, clock() + 10, count=2)
    clock.advance(9.5)
    assert clock.sleeps == [clock() + 0.5] * 2  # not yet
    clock.advance(0.5)
    for wait in (first, second):
        with pytest.raises(TimeoutError):
            await wait
    assert bare.cancelled()  # as asyncio.wait_for: the awaited thing is cancelled ...
    assert not kept.done()  # ... unless shielded
    assert clock.sleeps == []


async def test_a_result_there_when_the_time_is_up_wins() -> None:
    clock = FakeClock()
    future, wait = await waiting(clock, 5)
    future.set_result("both")
    clock.advance(5)
    assert await wait == "both"


async def test_cancelling_the_wait_cancels_the_awaited_and_the_timer() -> None:
    clock = FakeClock()
    future, wait = await waiting(clock, 5)
    wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait
    assert future.cancelled()
    assert clock.sleeps == []


async def test_the_system_clock_is_time_and_asyncio() -> None:
    before = time.time()
    assert before <= SYSTEM_CLOCK() <= time.time()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await wait_for(SYSTEM_CLOCK, never, 0.02)
    assert time.monotonic() - started >= 0.02
    assert never.cancelled()
