"""One off-loop helper for agent and coordinator: small payloads inline, big ones in a thread."""

from __future__ import annotations

import threading
import weakref

import nacl.signing
import numpy as np
import pytest

from maskfl.protocol.errors import RemoteProtocolError
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import GlobalModel, encode_message
from maskfl.transport import OFF_LOOP_BYTES, decode_off_loop, off_loop


def _where(_: bytes) -> int:
    return threading.get_ident()


async def test_below_the_threshold_runs_on_the_loop_from_it_in_a_thread() -> None:
    here = threading.get_ident()
    assert await off_loop(OFF_LOOP_BYTES - 1, _where, b"") == here
    assert await off_loop(OFF_LOOP_BYTES, _where, b"") != here


class _Result:
    """A stand-in for a decoded message (bytes cannot be weakly referenced)."""


async def test_a_result_from_the_thread_is_not_kept_alive_after_the_await() -> None:
    # A thread's return value stays referenced until the executor's next job; a
    # decoded 400 MB update must not outlive its caller's use of it.
    gone = weakref.ref(await off_loop(OFF_LOOP_BYTES, _Result))
    assert gone() is None


@pytest.mark.parametrize("n_weights", [1000, OFF_LOOP_BYTES // 4 + 1000])
async def test_decode_off_loop_is_decode_message(n_weights: int) -> None:
    key = nacl.signing.SigningKey.generate()
    weights = np.arange(n_weights, dtype=np.float32)
    payload = encode_message(
        GlobalModel("m", 1, RoundId(1), bytes(32), weights),
        fleet="f",
        round_id=1,
        signing_key=key,
    )
    assert (len(payload) >= OFF_LOOP_BYTES) == (n_weights > 1000)
    signed = await decode_off_loop(payload, max_size=len(payload))
    assert isinstance(signed.body, GlobalModel)
    assert np.array_equal(signed.body.weights, weights)
    with pytest.raises(RemoteProtocolError):  # errors come back from the thread as they are
        await decode_off_loop(payload, max_size=len(payload) - 1)
