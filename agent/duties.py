"""What a summer and an updater compute: their signed messages and the training result.

Each function builds one message from inputs the round driver (:mod:`maskfl.agent.rounds`)
has journaled; none of them touches the network or moves a step. Errors are
:class:`TaskFailedError` (this device cannot do its task in this round) and
:class:`SatOutError` (it should not take part).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass

import numpy as np

from maskfl.agent.identity import DeviceIdentity
from maskfl.agent.learning import TrainResult
from maskfl.agent.state import BlobKey, Journal
from maskfl.protocol.crypto import EphemeralKeyPair, new_seed, open_seed, seal_seed
from maskfl.protocol.dp import masked_update
from maskfl.protocol.errors import CryptoError, MaskflError
from maskfl.protocol.masking import NO_EVALUATION, EvalCounts, aggregate_mask, update_words
from maskfl.protocol.messages import (
    RoundParams,
    SeedDict,
    Sum,
    Sum2,
    Update,
    decode_message,
    encode_message,
)

__all__ = [
    "Composed",
    "SatOutError",
    "TaskFailedError",
    "load_training",
    "save_training",
    "sum2_message",
    "sum_message",
    "update_message",
]

log = logging.getLogger("maskfl.agent.round")

_EVALUATION = struct.Struct("<QQd")


class TaskFailedError(MaskflError):
    """This device cannot complete its task in this round (journaled as ``failed``)."""


class SatOutError(MaskflError):
    """This device does not take part in this round (journaled as ``sat_out``)."""


@dataclass(frozen=True)
class Composed:
    """A signed message ready to journal, and what to say about it."""

    message: bytes
    detail: str = ""


def sum_message(identity: DeviceIdentity, round_id: int) -> tuple[EphemeralKeyPair, bytes]:
    """A fresh ephemeral X25519 key pair and the signed Sum message announcing it."""
    ident = identity.identity
    keys = EphemeralKeyPair.generate()
    message = encode_message(
        Sum(ident.certificate, keys.public_key),
        fleet=ident.fleet,
        round_id=round_id,
        signing_key=ident.signing_key,
    )
    return keys, message


async def sum2_message(
    identity: DeviceIdentity, params: RoundParams, raw_seeds: bytes, private_key: bytes
) -> Composed:
    """Open this summer's sealed seeds and sign the aggregate mask as a Sum2 message
    (seeds that do not open are reported by their update's digest)."""
    rid = int(params.round_id)
    body = decode_message(raw_seeds, max_size=len(raw_seeds)).body
    if not isinstance(body, SeedDict):
        raise TaskFailedError("journaled seed dictionary is not a seed dictionary")
    group = params.group_of(identity.identity.public_key)
    if body.group != group:
        raise TaskFailedError(
            f"the seed dictionary names mask group {body.group}; this summer's ticket "
            f"puts it in group {group} of {params.groups}"
        )
    seeds: list[bytes] = []
    failed: list[bytes] = []
    for update_digest, sealed in sorted(body.sealed_seeds.items()):
        try:
            seeds.append(open_seed(sealed, private_key))
        except CryptoError:
            failed.append(update_digest)
    if failed:
        log.warning("round %d: %d sealed seeds did not open; reporting them", rid, len(failed))
    n_words = update_words(params.vector_length)
    started = time.perf_counter()
    words = await asyncio.to_thread(aggregate_mask, seeds, n_words, params.mask.word_bits)
    elapsed = time.perf_counter() - started
    log.info(
        "round %d: aggregate mask of %d seeds x %d words in %.3f s",
        rid,
        len(seeds),
        n_words,
        elapsed,
    )
    ident = identity.identity
    message = encode_message(
        Sum2(ident.certificate, words, tuple(sorted(failed))),
        fleet=ident.fleet,
        round_id=rid,
        signing_key=ident.signing_key,
    )
    return Composed(message, f"{len(seeds)} seeds, {len(failed)} failed")


async def update_message(
    identity: DeviceIdentity,
    params: RoundParams,
    sums: tuple[Sum, ...],
    result: TrainResult,
    sample_cap: int,
) -> Composed:
    """Mask the training result with one fresh seed per mask group, seal each summer
    its group's seed, and sign it all as an Update message."""
    if not sums:
        raise TaskFailedError("the sum dictionary is empty")
    p = params
    # With DP noise the weight is 1 (docs/protocol.md §7.9; masked_update sends 1).
    weight = 1.0 if p.noise_variance else min(result.num_samples, sample_cap) / sample_cap
    # One fresh seed per mask group; a summer gets only its own group's seed, so
    # no one summer can remove this update's mask (the sum of the g sub-masks).
    seeds = [new_seed() for _ in range(p.groups)]
    words = await asyncio.to_thread(
        masked_update, p, result.delta, weight, seeds, result.evaluation
    )
    sealed = {
        s.certificate.public_key: seal_seed(
            seeds[p.group_of(s.certificate.public_key)], s.ephemeral_pk
        )
        for s in sums
    }
    del seeds
    ident = identity.identity
    message = encode_message(
        Update(ident.certificate, sealed, words),
        fleet=ident.fleet,
        round_id=int(p.round_id),
        signing_key=ident.signing_key,
    )
    return Composed(message, f"weight {weight:.4f}, sealed to {len(sealed)} summers")


async def save_training(journal: Journal, round_id: int, result: TrainResult) -> None:
    """Journal a training result, so a restart does not train again."""
    await journal.put_blob(round_id, BlobKey.DELTA, result.delta.tobytes())
    await journal.put_blob(round_id, BlobKey.SAMPLES, result.num_samples.to_bytes(8, "little"))
    ev = result.evaluation
    await journal.put_blob(
        round_id, BlobKey.EVALUATION, _EVALUATION.pack(ev.examples, ev.correct, ev.loss_sum)
    )


async def load_training(journal: Journal, round_id: int) -> TrainResult:
    """The training result :func:`save_training` journaled."""
    delta = await journal.blob(round_id, BlobKey.DELTA)
    samples = await journal.blob(round_id, BlobKey.SAMPLES)
    evaluation = await journal.blob(round_id, BlobKey.EVALUATION)
    if delta is None or samples is None:
        raise TaskFailedError("journal lost the training result")
    ev = NO_EVALUATION
    if evaluation is not None and len(evaluation) == _EVALUATION.size:
        ev = EvalCounts(*_EVALUATION.unpack(evaluation))
    return TrainResult(
        np.frombuffer(delta, dtype=np.float32).copy(),
        int.from_bytes(samples, "little"),
        evaluation=ev,
    )
