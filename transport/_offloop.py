"""Work on a received payload off the event loop once it is big: one threshold for all.

Decoding a message hashes its body (SHA-256 over the whole payload) and checks a
signature; hashing a model graph is the same kind of work. Below
:data:`OFF_LOOP_BYTES` it runs inline; from there on in a worker thread, so that the
loop keeps reading, acking and sending heartbeats meanwhile.

Why 16 MiB, for coordinator and agent alike: a hop to a thread and back costs more
than it saves below megabytes (maskfl-bench coordinator, 2 vCPUs: 400 KB updates
took a third longer through a thread, 4 MB ones as long with more CPU, 40 KB ones
twice the CPU), and the caller waits for the result either way. Decoding 16 MiB
blocks the loop ~10 ms on the development machine (0.7 ms at 1 MiB; a thread hop
50-230 us), ~100 ms on a Raspberry-Pi-class device: far below the agent's heartbeat
interval and systemd watchdog, and a device's models are either well below (the
shipped ones are kilobytes) or far above (then the thread keeps the loop free).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

from maskfl.protocol.messages import SignedMessage, decode_message

__all__ = ["OFF_LOOP_BYTES", "decode_off_loop", "off_loop"]

OFF_LOOP_BYTES: Final = 16 << 20
"""Payloads of at least this many bytes are decoded (or hashed) in a worker thread."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


async def off_loop(size: int, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """``fn(*args, **kwargs)``, in a worker thread when ``size`` (the bytes it works
    on) is at least :data:`OFF_LOOP_BYTES`, else right here."""
    if size < OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    # The result comes back in a list, not as the thread's return value: that one stays
    # referenced after the await, until the default executor's next job (at M = 1e8 a
    # decoded 400 MB update stayed alive into the next phase).
    box: list[_R] = []
    await asyncio.to_thread(lambda: box.append(fn(*args, **kwargs)))
    return box.pop()


async def decode_off_loop(payload: bytes, *, max_size: int) -> SignedMessage:
    """:func:`decode_message`, off the event loop for a big payload."""
    return await off_loop(len(payload), decode_message, payload, max_size=max_size)
