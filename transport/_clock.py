"""The clock a service reads and waits on, injected so that a test can move it.

A :class:`Clock` is wall-clock seconds (``clock()``, as ``time.time``) and a wait
measured on them (``await clock.sleep(seconds)``). Production uses
:data:`SYSTEM_CLOCK`: ``time.time`` and :func:`asyncio.sleep`. A test's fake clock
(tests/support/harness.py) ends a sleep only when the test moves its time past it,
so a timer that shapes round behaviour (a receipt timeout, the heartbeat interval)
fires when the test says, never because a machine was slow. :func:`wait_for` is
:func:`asyncio.wait_for`'s contract on such a clock, without the cancel that Python
3.11's drops (``asyncio.wait_for`` itself is banned by ruff, TID251).

Link timers (reconnect back-off, waiting for the broker's acknowledgement) stay on
real time: they are the network's, and are tested against a real broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Final, Protocol, TypeVar

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "wait_for"]

_T = TypeVar("_T")


class Clock(Protocol):
    """Wall-clock seconds, and waiting on them."""

    def __call__(self) -> float:
        """Seconds since the epoch, as :func:`time.time`."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock (at once for 0 or less)."""
        ...


class SystemClock:
    """The real clock: :func:`time.time`, and :func:`asyncio.sleep` to wait."""

    def __call__(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


SYSTEM_CLOCK: Final = SystemClock()


async def wait_for(clock: Clock, awaitable: Awaitable[_T], seconds: float) -> _T:
    """``awaitable``'s result if it comes within ``seconds`` on ``clock``; else it is
    cancelled and :class:`TimeoutError` raised (:func:`asyncio.wait_for`'s contract;
    shield a future that must outlive the wait). A result that is there when the time
    is up wins over the timeout."""
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        timer.cancel()
        raise
    timer.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.wait({work})  # settled before we return (raises only our own cancel)
    raise TimeoutError
