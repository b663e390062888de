"""One round from this device's point of view: sortition, then summer or updater duty.

A :class:`RoundDriver` is made for every round whose parameters the daemon accepted
(coordinator signature and certificate checked). It draws the device's task from its
tickets and then steps through the journal (:mod:`maskfl.agent.state`)::

    summer:  ─▶ sum_sent ─▶ seeds_received ─▶ sum2_sent ─▶ done
             (guards and the sum2 upload budget pass; X25519 key and Sum message
             journaled, then published; the seed dictionary arrives; the aggregate
             mask is journaled, then published)
    updater: ─▶ waiting_sums ─▶ trained ─▶ update_sent ─▶ done
             (guards pass; training and the verified sum dictionary; the masked
             update, sealed to every summer, is journaled, then published)
    either:  ─▶ sat_out | failed

Every step is saved *before* the agent acts on the network, so a driver built
from the journal after a crash continues where the last one stopped: a summer
killed between sum and sum2 still opens its seeds with the journaled key.

Inputs arrive already verified by the daemon (``offer_*``). Outgoing messages wait
for their receipt; without one within ``limits.receipt_timeout_s`` the *same bytes*
are published again (at most ``limits.upload_retries`` times, within the round's
upload budget). A rejection is final for the round — except a late "phase closed"
for a message we had sent before (a copy may have been accepted already), which
does not stop a summer from waiting for its seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from maskfl.agent.config import AgentConfig
from maskfl.agent.guards import Guards
from maskfl.agent.identity import DeviceIdentity
from maskfl.agent.learning import Learner, TrainResult
from maskfl.agent.state import Journal, OutboxEntry, OutboxStatus, RoundState, Step, TaskKind
from maskfl.protocol.crypto import EphemeralKeyPair, digest, new_seed, open_seed, seal_seed
from maskfl.protocol.dp import masked_update
from maskfl.protocol.errors import CryptoError, MaskflError, Reason
from maskfl.protocol.masking import (
    NO_EVALUATION,
    EvalCounts,
    aggregate_mask,
    update_words,
)
from maskfl.protocol.messages import (
    HEADER_SIZE,
    GlobalModel,
    Receipt,
    RoundParams,
    SeedDict,
    Sum,
    Sum2,
    Update,
    decode_message,
    encode_message,
)
from maskfl.protocol.sortition import Task, select_task
from maskfl.protocol.topics import TopicKind, Topics

__all__ = ["Outcome", "RoundContext", "RoundDriver", "classify_receipt"]

log = logging.getLogger("maskfl.agent.round")

#: Rejections of a *repeated* message that do not prove the first copy was refused.
_AMBIGUOUS_ON_REPEAT = frozenset({Reason.PHASE_CLOSED, Reason.WRONG_PHASE, Reason.WRONG_ROUND})


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    AMBIGUOUS = "ambiguous"


@dataclass
class RoundContext:
    """What every round shares with the daemon."""

    config: AgentConfig
    identity: DeviceIdentity
    journal: Journal
    topics: Topics
    learner: Learner
    guards: Guards
    publish: Callable[[str, bytes, int], Awaitable[None]]
    """Publish a (possibly chunked) message at QoS 1: (topic, payload, chunk_size)."""
    model: Callable[[str, int, bytes], Awaitable[GlobalModel]]
    """Wait for the verified global model (model id, version, digest)."""
    clock: Callable[[], float] = time.time


class RoundFailedError(MaskflError):
    """This device cannot complete its task in this round (journaled as ``failed``)."""


class SatOutError(MaskflError):
    """This device does not take part in this round (journaled as ``sat_out``)."""


class RoundDriver:
    """Drives one round for this device. Create, then ``start()``; feed it with ``offer_*``."""

    def __init__(self, ctx: RoundContext, params: RoundParams, params_digest: bytes) -> None:
        self.ctx = ctx
        self.params = params
        self.params_digest = params_digest
        self.round_id = int(params.round_id)
        self.state: RoundState | None = None
        self._sums: asyncio.Future[tuple[Sum, ...]] = asyncio.get_running_loop().create_future()
        self._seeds: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._receipts: dict[str, asyncio.Future[Receipt]] = {}
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()

    # -- inputs from the daemon (already verified) ----------------------------------

    def offer_sums(self, sums: tuple[Sum, ...]) -> None:
        if not self._sums.done():
            self._sums.set_result(sums)

    def offer_seeds(self, raw_seed_dict: bytes, seed_dict: SeedDict) -> None:
        del seed_dict  # verified by the daemon; the raw bytes are journaled and reparsed
        if not self._seeds.done():
            self._seeds.set_result(raw_seed_dict)

    def offer_receipt(self, kind: str, receipt: Receipt) -> None:
        future = self._receipt_future(kind)
        if not future.done():
            future.set_result(receipt)

    @property
    def step(self) -> Step | None:
        return None if self.state is None else self.state.step

    @property
    def task(self) -> TaskKind | None:
        return None if self.state is None else self.state.task

    def describe(self) -> str:
        if self.state is None:
            return f"round {self.round_id}: starting"
        return f"{self.state.task}:{self.state.step}"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"round {self.round_id}")
        return self._task

    async def abandon(self, why: str) -> None:
        """The round is over for us (a newer round started, or shutdown is not this)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.state is not None and not self.state.step.terminal:
            log.info("round %d: %s while %s; leaving it", self.round_id, why, self.describe())
            await self._save(self.state.advance(Step.SAT_OUT, why))
            await self.ctx.journal.forget_secrets(self.round_id)

    async def stop(self) -> None:
        """Shutdown: stop without touching the journal, so the next start resumes."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        rid = self.round_id
        try:
            self.state = await self.ctx.journal.load(rid)
            if self.state is None:
                await self._begin()
            elif not self.state.step.terminal:
                log.info("round %d: resuming as %s from the journal", rid, self.describe())
            assert self.state is not None
            if self.state.step.terminal:
                return
            if self.state.task is TaskKind.SUM:
                await self._summer()
            elif self.state.task is TaskKind.UPDATE:
                await self._updater()
        except SatOutError as exc:
            log.info("round %d: sitting out: %s", rid, exc)
            await self._finish(Step.SAT_OUT, str(exc))
        except RoundFailedError as exc:
            log.warning("round %d: failed: %s", rid, exc)
            await self._finish(Step.FAILED, str(exc))
        except MaskflError as exc:
            log.error("round %d: failed: %s", rid, exc)
            await self._finish(Step.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            self.finished.set()

    async def _finish(self, step: Step, detail: str) -> None:
        if self.state is None:
            self.state = RoundState(self.round_id, TaskKind.NONE, step)
        await self._save(self.state.advance(step, detail[:500]))
        if step is not Step.DONE:
            await self.ctx.journal.forget_secrets(self.round_id)

    async def _save(self, state: RoundState, outbox: OutboxEntry | None = None) -> None:
        self.state = await self.ctx.journal.save(state, outbox=outbox)

    # -- sortition -----------------------------------------------------------------

    async def _begin(self) -> None:
        p = self.params
        ident = self.ctx.identity.identity
        task = select_task(p.seed, ident.public_key, p.p_sum, p.p_update)
        base = RoundState(
            self.round_id, TaskKind(task.value), Step.SAT_OUT, params_digest=self.params_digest
        )
        await self.ctx.journal.put_inbox(self.round_id, "params_digest", self.params_digest)
        if task is Task.NONE:
            self.state = base
            raise SatOutError("not selected (neither ticket below its threshold)")
        if task is Task.SUM:
            log.info("round %d: selected as summer", self.round_id)
            # A summer expands U x (M + 1) mask words and uploads M + 1 of them: it
            # volunteers only when the guards allow work and its sum2 fits the budget
            # (see maskfl.agent.guards), since a summer that drops out hurts the round.
            self.state = base
            verdict = await self.ctx.guards.may_work()
            if not verdict.allowed:
                raise SatOutError(f"guards: {verdict}")
            keys = EphemeralKeyPair.generate()
            message = encode_message(
                Sum(ident.certificate, keys.public_key),
                fleet=ident.fleet,
                round_id=self.round_id,
                signing_key=ident.signing_key,
            )
            sum2_words = update_words(p.vector_length) * (p.mask.word_bits // 8)
            self._check_budget(len(message) + sum2_words, 0, "sum and sum2")
            topic = self.ctx.topics.sum(self.round_id, ident.device_id)
            entry = self._entry(TopicKind.SUM, topic, message)
            # The private key is durable before the Sum message can reach anyone.
            await self._save(
                RoundState(
                    self.round_id,
                    TaskKind.SUM,
                    Step.SUM_SENT,
                    params_digest=self.params_digest,
                    ephemeral_sk=keys.private_key,
                    ephemeral_pk=keys.public_key,
                ),
                entry,
            )
            return
        log.info("round %d: selected as updater", self.round_id)
        self.state = base
        verdict = await self.ctx.guards.may_work()
        if not verdict.allowed:
            raise SatOutError(f"guards: {verdict}")
        await self._save(base.advance(Step.WAITING_SUMS))

    # -- summer --------------------------------------------------------------------

    async def _summer(self) -> None:
        assert self.state is not None
        rid = self.round_id
        if self.state.step is Step.SUM_SENT:
            # The seed dictionary also proves the sum was accepted, so whichever of the
            # receipt and the seeds comes first moves on (a lost receipt costs nothing).
            delivery = asyncio.create_task(self._deliver(TopicKind.SUM))
            try:
                waiting: set[asyncio.Future[Any]] = {delivery, self._seeds}
                done, _ = await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
                if delivery in done:
                    outcome, receipt = delivery.result()
                    if outcome is Outcome.REJECTED:
                        raise RoundFailedError(f"sum rejected: {_why(receipt)}")
                    log.info("round %d: sum %s; waiting for the seed dictionary", rid, outcome)
                raw = await self._seeds
            finally:
                if not delivery.done():
                    delivery.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await delivery
            await self.ctx.journal.put_inbox(rid, "seeds", raw)
            await self._save(self.state.advance(Step.SEEDS_RECEIVED))
        if self.state.step is Step.SEEDS_RECEIVED:
            await self._compute_sum2()
        if self.state.step is Step.SUM2_SENT:
            outcome, receipt = await self._deliver(TopicKind.SUM2)
            if outcome is not Outcome.ACCEPTED:
                raise RoundFailedError(f"sum2 {outcome}: {_why(receipt)}")
            await self._finish(Step.DONE, "sum2 accepted")
            await self.ctx.journal.forget_secrets(rid)
            log.info("round %d: summer duty done", rid)

    async def _compute_sum2(self) -> None:
        assert self.state is not None
        rid = self.round_id
        raw = await self.ctx.journal.inbox(rid, "seeds")
        if raw is None or self.state.ephemeral_sk is None:
            raise RoundFailedError("journal lost the seed dictionary or the ephemeral key")
        body = decode_message(raw, max_size=len(raw)).body
        if not isinstance(body, SeedDict):
            raise RoundFailedError("journaled seed dictionary is not a seed dictionary")
        sk = self.state.ephemeral_sk
        p = self.params
        group = p.group_of(self.ctx.identity.identity.public_key)
        if body.group != group:
            raise RoundFailedError(
                f"the seed dictionary names mask group {body.group}; this summer's ticket "
                f"puts it in group {group} of {p.groups}"
            )
        n_words = update_words(p.vector_length)
        seeds: list[bytes] = []
        failed: list[bytes] = []
        for update_digest, sealed in sorted(body.sealed_seeds.items()):
            try:
                seeds.append(open_seed(sealed, sk))
            except CryptoError:
                failed.append(update_digest)
        if failed:
            log.warning("round %d: %d sealed seeds did not open; reporting them", rid, len(failed))
        started = time.perf_counter()
        words = await asyncio.to_thread(aggregate_mask, seeds, n_words, p.mask.word_bits)
        log.info(
            "round %d: aggregate mask of %d seeds x %d words in %.3f s",
            rid,
            len(seeds),
            n_words,
            time.perf_counter() - started,
        )
        ident = self.ctx.identity.identity
        message = encode_message(
            Sum2(ident.certificate, words, tuple(sorted(failed))),
            fleet=ident.fleet,
            round_id=rid,
            signing_key=ident.signing_key,
        )
        self._check_budget(len(message), self.state.bytes_sent, "sum2")
        entry = self._entry(TopicKind.SUM2, self.ctx.topics.sum2(rid, ident.device_id), message)
        await self._save(
            self.state.advance(Step.SUM2_SENT, f"{len(seeds)} seeds, {len(failed)} failed"), entry
        )

    # -- updater -------------------------------------------------------------------

    async def _updater(self) -> None:
        assert self.state is not None
        rid = self.round_id
        if self.state.step is Step.WAITING_SUMS:
            training = asyncio.create_task(self._train())
            try:
                # Train while the sum phase runs; a training error ends the wait at once.
                both: set[asyncio.Future[Any]] = {training, self._sums}
                await asyncio.wait(both, return_when="FIRST_EXCEPTION")
                result = await training
                sums = await self._sums
            finally:
                if not training.done():
                    training.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MaskflError):
                        await training
            await self._compose_update(sums, result)
        elif self.state.step is Step.TRAINED:
            result = await self._load_training()
            await self._compose_update(await self._sums, result)
        if self.state.step is Step.UPDATE_SENT:
            outcome, receipt = await self._deliver(TopicKind.UPDATE)
            if outcome is not Outcome.ACCEPTED:
                raise RoundFailedError(f"update {outcome}: {_why(receipt)}")
            await self._finish(Step.DONE, "update accepted")
            log.info("round %d: update accepted", rid)

    async def _train(self) -> TrainResult:
        assert self.state is not None
        p = self.params
        model = await self.ctx.model(p.model_id, p.model_version, p.model_digest)
        if model.weights.size != p.vector_length:
            raise RoundFailedError(
                f"global model has {model.weights.size} weights, the round expects "
                f"{p.vector_length}"
            )
        result = await self.ctx.learner.train(
            p.model_id,
            np.array(model.weights, dtype=np.float32),
            round_id=self.round_id,
            max_eval_examples=p.mask.eval_max_examples,
        )
        if result.delta.size != p.vector_length:
            raise RoundFailedError(
                f"local model has {result.delta.size} parameters, the round expects "
                f"{p.vector_length} (model {p.model_id!r} differs from the coordinator's)"
            )
        if result.num_samples < 1:
            raise SatOutError("no training samples")
        await self.ctx.journal.put_blob(self.round_id, "delta", result.delta.tobytes())
        await self.ctx.journal.put_blob(
            self.round_id, "samples", result.num_samples.to_bytes(8, "little")
        )
        ev = result.evaluation
        await self.ctx.journal.put_blob(
            self.round_id, "evaluation", struct.pack("<QQd", ev.examples, ev.correct, ev.loss_sum)
        )
        loss = "" if result.loss is None else f", loss {result.loss:.4f}"
        await self._save(
            self.state.advance(
                Step.TRAINED, f"{result.num_samples} samples in {result.seconds:.2f} s{loss}"
            )
        )
        log.info("round %d: trained on %d samples%s", self.round_id, result.num_samples, loss)
        return result

    async def _load_training(self) -> TrainResult:
        delta = await self.ctx.journal.blob(self.round_id, "delta")
        samples = await self.ctx.journal.blob(self.round_id, "samples")
        evaluation = await self.ctx.journal.blob(self.round_id, "evaluation")
        if delta is None or samples is None:
            raise RoundFailedError("journal lost the training result")
        ev = NO_EVALUATION
        if evaluation is not None and len(evaluation) == struct.calcsize("<QQd"):
            examples, correct, loss = struct.unpack("<QQd", evaluation)
            ev = EvalCounts(examples, correct, loss)
        return TrainResult(
            np.frombuffer(delta, dtype=np.float32).copy(),
            int.from_bytes(samples, "little"),
            evaluation=ev,
        )

    async def _compose_update(self, sums: tuple[Sum, ...], result: TrainResult) -> None:
        assert self.state is not None
        rid = self.round_id
        if not sums:
            raise RoundFailedError("the sum dictionary is empty")
        p = self.params
        cap = self.ctx.config.training.sample_cap
        # With DP noise the weight is 1 (docs/protocol.md §7.9; masked_update sends 1).
        weight = 1.0 if p.noise_variance else min(result.num_samples, cap) / cap
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
        ident = self.ctx.identity.identity
        message = encode_message(
            Update(ident.certificate, sealed, words),
            fleet=ident.fleet,
            round_id=rid,
            signing_key=ident.signing_key,
        )
        self._check_budget(len(message), self.state.bytes_sent, "update")
        entry = self._entry(TopicKind.UPDATE, self.ctx.topics.update(rid, ident.device_id), message)
        await self._save(
            self.state.advance(
                Step.UPDATE_SENT, f"weight {weight:.4f}, sealed to {len(sealed)} summers"
            ),
            entry,
        )
        await self.ctx.journal.put_blob(rid, "delta", b"")

    # -- sending -------------------------------------------------------------------

    def _entry(self, kind: str, topic: str, message: bytes) -> OutboxEntry:
        return OutboxEntry(
            self.round_id,
            kind,
            topic,
            digest(message[:HEADER_SIZE]),
            message,
            OutboxStatus.PENDING,
        )

    def _check_budget(self, size: int, already: int, what: str) -> None:
        verdict = self.ctx.guards.upload_allowed(size, already)
        if not verdict.allowed:
            raise SatOutError(f"{what}: {verdict}")

    def _receipt_future(self, kind: str) -> asyncio.Future[Receipt]:
        future = self._receipts.get(kind)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._receipts[kind] = future
        return future

    async def _deliver(self, kind: str) -> tuple[Outcome, Receipt | None]:  # noqa: PLR0912 the resend loop: one branch per receipt outcome and budget
        """Publish the journaled message ``kind`` until its receipt arrives."""
        journal = self.ctx.journal
        entry = await journal.outbox(self.round_id, kind)
        if entry is None:
            raise RoundFailedError(f"journal has no {kind} message")
        if entry.status is OutboxStatus.ACCEPTED:
            return Outcome.ACCEPTED, None
        if entry.status is OutboxStatus.REJECTED:
            return Outcome.REJECTED, None
        limits = self.ctx.config.limits
        sent_before = entry.attempts
        attempts = 0
        future = self._receipt_future(kind)
        while True:
            if attempts <= limits.upload_retries and not future.done():
                assert self.state is not None
                budget = self.ctx.guards.upload_allowed(len(entry.payload), self.state.bytes_sent)
                if budget.allowed or attempts == 0:
                    if attempts or sent_before:
                        log.info(
                            "round %d: publishing %s again (attempt %d)",
                            self.round_id,
                            kind,
                            sent_before + attempts + 1,
                        )
                    await self.ctx.publish(entry.topic, entry.payload, self.params.chunk_size)
                    attempts += 1
                    await journal.mark_attempt(self.round_id, kind)
                    await self._save(
                        self.state.advance(
                            self.state.step,
                            self.state.detail,
                            bytes_sent=self.state.bytes_sent + len(entry.payload),
                        )
                    )
                else:
                    log.warning("round %d: not resending %s: %s", self.round_id, kind, budget)
                    attempts = limits.upload_retries + 1
            if attempts > limits.upload_retries:
                # Retries spent: the receipt may still come; a new round ends the wait.
                receipt = await future
            else:
                try:
                    receipt = await asyncio.wait_for(
                        asyncio.shield(future), limits.receipt_timeout_s
                    )
                except TimeoutError:
                    log.warning(
                        "round %d: no receipt for %s after %.0f s",
                        self.round_id,
                        kind,
                        limits.receipt_timeout_s,
                    )
                    continue
            outcome = classify_receipt(receipt, repeated=attempts + sent_before > 1)
            status = OutboxStatus.REJECTED if outcome is Outcome.REJECTED else OutboxStatus.ACCEPTED
            if outcome is not Outcome.AMBIGUOUS:
                await journal.mark_receipt(self.round_id, kind, status, str(receipt.reason or ""))
            if outcome is Outcome.REJECTED:
                log.warning("round %d: %s rejected: %s", self.round_id, kind, _why(receipt))
            return outcome, receipt


def classify_receipt(receipt: Receipt, *, repeated: bool) -> Outcome:
    """What a receipt says about the message it answers: ``duplicate`` means the
    message counted (a redelivery after a coordinator crash, in whatever phase or
    round); a late-phase rejection of a *repeated* send proves nothing."""
    if receipt.accepted or receipt.reason is Reason.DUPLICATE:
        return Outcome.ACCEPTED
    if repeated and receipt.reason in _AMBIGUOUS_ON_REPEAT:
        return Outcome.AMBIGUOUS
    return Outcome.REJECTED


def _why(receipt: Receipt | None) -> str:
    if receipt is None:
        return "(journaled earlier)"
    detail = f" ({receipt.detail})" if receipt.detail else ""
    return f"{receipt.reason or 'accepted'}{detail}"
