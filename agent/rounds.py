"""One round from this device's point of view: sortition, then summer or updater duty.

A :class:`RoundDriver` is made for every round whose parameters the daemon accepted
(coordinator signature and certificate checked). It draws the device's task from its
tickets and then steps through the journal, every move by the step table of
:mod:`maskfl.agent.steps`. A summer journals its X25519 key and Sum message once the
guards and the sum2 upload budget pass, then publishes; its seed dictionary arrives;
the aggregate mask is journaled, then published. An updater trains (guards passed)
while the sum phase runs, masks its update for the verified sum dictionary, seals a
seed to every summer, journals, then publishes.

Every step is saved *before* the agent acts on the network, so a driver built
from the journal after a crash continues where the last one stopped: a summer
killed between sum and sum2 still opens its seeds with the journaled key.

Inputs arrive already verified by the daemon (``offer_*``). Outgoing messages are
sent by :class:`~maskfl.agent.delivery.Delivery` until their receipt comes. A
rejection is final for the round — except a late "phase closed" for a message we had
sent before (a copy may have been accepted already), which does not stop a summer
from waiting for its seeds. What the messages contain is :mod:`maskfl.agent.duties`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskfl.agent.config import AgentConfig
from maskfl.agent.delivery import Delivery, Outcome, receipt_text
from maskfl.agent.duties import (
    SatOutError,
    TaskFailedError,
    load_training,
    save_training,
    sum2_message,
    sum_message,
    update_message,
)
from maskfl.agent.guards import Guards
from maskfl.agent.identity import DeviceIdentity
from maskfl.agent.learning import Learner, TrainResult
from maskfl.agent.state import BlobKey, InboxKey, Journal, ReceiptStatus, SentMessage
from maskfl.agent.steps import DeviceRound, Event, Step
from maskfl.protocol.crypto import digest
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.masking import update_words
from maskfl.protocol.messages import (
    HEADER_SIZE,
    GlobalModel,
    Receipt,
    RoundParams,
    SeedDict,
    Sum,
)
from maskfl.protocol.sortition import Task, select_task
from maskfl.protocol.topics import TopicKind, Topics
from maskfl.transport import SYSTEM_CLOCK, Clock

__all__ = ["RoundContext", "RoundDriver"]

log = logging.getLogger("maskfl.agent.round")


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
    clock: Clock = SYSTEM_CLOCK
    """Wall-clock time, and the receipt timeout's wait."""


class RoundDriver:
    """Drives one round for this device. Create, then ``start()``; feed it with ``offer_*``."""

    def __init__(self, ctx: RoundContext, params: RoundParams, params_digest: bytes) -> None:
        self.ctx = ctx
        self.params = params
        self.params_digest = params_digest
        self.round_id = int(params.round_id)
        self.state: DeviceRound | None = None
        self._sums: asyncio.Future[tuple[Sum, ...]] = asyncio.get_running_loop().create_future()
        self._seeds: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._delivery = Delivery(
            self.round_id,
            config=ctx.config,
            journal=ctx.journal,
            guards=ctx.guards,
            clock=ctx.clock,
            publish=lambda topic, payload: ctx.publish(topic, payload, params.chunk_size),
            bytes_sent=lambda: 0 if self.state is None else self.state.bytes_sent,
            published=self._published,
        )
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

    def offer_receipt(self, kind: TopicKind, receipt: Receipt) -> None:
        self._delivery.offer_receipt(kind, receipt)

    @property
    def step(self) -> Step | None:
        return None if self.state is None else self.state.step

    @property
    def task(self) -> Task | None:
        return None if self.state is None else self.state.task

    def describe(self) -> str:
        if self.state is None:
            return f"round {self.round_id}: starting"
        return f"{self.state.task}:{self.state.step}"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"round {self.round_id}")
        self._task.add_done_callback(_log_crash)
        return self._task

    async def abandon(self, why: str) -> None:
        """The round is over for us (a newer round started, or shutdown is not this)."""
        await self.stop()
        if self.state is not None and not self.state.step.terminal:
            log.info("round %d: %s while %s; leaving it", self.round_id, why, self.describe())
            await self._save(self.state.move(Event.SIT_OUT, why))
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
            if self.state.task is Task.SUM:
                await self._summer()
            elif self.state.task is Task.UPDATE:
                await self._updater()
        except SatOutError as exc:
            log.info("round %d: sitting out: %s", rid, exc)
            await self._finish(Event.SIT_OUT, str(exc))
        except TaskFailedError as exc:
            log.warning("round %d: failed: %s", rid, exc)
            await self._finish(Event.FAIL, str(exc))
        except MaskflError as exc:
            log.error("round %d: failed: %s", rid, exc)
            await self._finish(Event.FAIL, f"{type(exc).__name__}: {exc}")
        finally:
            self.finished.set()

    async def _finish(self, event: Event, detail: str) -> None:
        if self.state is None:
            self.state = DeviceRound(self.round_id, Task.NONE, Step.NEW)
        await self._save(self.state.move(event, detail[:500]))
        if self.state.step is not Step.DONE:
            await self.ctx.journal.forget_secrets(self.round_id)

    async def _save(self, state: DeviceRound, sent: SentMessage | None = None) -> None:
        self.state = await self.ctx.journal.save(state, sent=sent)

    # -- sortition -----------------------------------------------------------------

    async def _begin(self) -> None:
        p = self.params
        ident = self.ctx.identity.identity
        task = select_task(p.seed, ident.public_key, p.p_sum, p.p_update)
        self.state = DeviceRound(self.round_id, task, Step.NEW, params_digest=self.params_digest)
        await self.ctx.journal.put_inbox(self.round_id, InboxKey.PARAMS_DIGEST, self.params_digest)
        if task is Task.NONE:
            raise SatOutError("not selected (neither ticket below its threshold)")
        log.info("round %d: selected as %s", self.round_id, _ROLE[task])
        # A summer expands U x (M + 1) mask words and uploads M + 1 of them: it
        # volunteers only when the guards allow work and its sum2 fits the budget
        # (see maskfl.agent.guards), since a summer that drops out hurts the round.
        verdict = await self.ctx.guards.may_work()
        if not verdict.allowed:
            raise SatOutError(f"guards: {verdict}")
        if task is Task.UPDATE:
            await self._save(self.state.move(Event.UPDATER))
            return
        keys, message = sum_message(self.ctx.identity, self.round_id)
        sum2_bytes = update_words(p.vector_length) * (p.mask.word_bits // 8)
        self._check_budget(len(message) + sum2_bytes, 0, "sum and sum2")
        entry = self._entry(
            TopicKind.SUM, self.ctx.topics.sum(self.round_id, ident.device_id), message
        )
        # The private key is durable before the Sum message can reach anyone.
        moved = self.state.move(
            Event.SUMMER, ephemeral_sk=keys.private_key, ephemeral_pk=keys.public_key
        )
        await self._save(moved, entry)

    # -- summer --------------------------------------------------------------------

    async def _summer(self) -> None:
        assert self.state is not None
        if self.state.step is Step.SUM_SENT:
            raw = await self._seeds_after_sum()
            await self.ctx.journal.put_inbox(self.round_id, InboxKey.SEEDS, raw)
            await self._save(self.state.move(Event.SEEDS))
        if self.state.step is Step.SEEDS_RECEIVED:
            await self._compose_sum2()
        if self.state.step is Step.SUM2_SENT:
            outcome, receipt = await self._deliver()
            if outcome is not Outcome.ACCEPTED:
                raise TaskFailedError(f"sum2 {outcome}: {receipt_text(receipt)}")
            await self._finish(Event.ACCEPTED, "sum2 accepted")
            await self.ctx.journal.forget_secrets(self.round_id)
            log.info("round %d: summer duty done", self.round_id)

    async def _seeds_after_sum(self) -> bytes:
        """Deliver the sum message and wait for this summer's seed dictionary.

        The seed dictionary also proves the sum was accepted, so whichever of the
        receipt and the seeds comes first moves on (a lost receipt costs nothing).
        """
        delivery = asyncio.create_task(self._deliver())
        try:
            waiting: set[asyncio.Future[Any]] = {delivery, self._seeds}
            done, _ = await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
            if delivery in done:
                outcome, receipt = delivery.result()
                if outcome is Outcome.REJECTED:
                    raise TaskFailedError(f"sum rejected: {receipt_text(receipt)}")
                log.info(
                    "round %d: sum %s; waiting for the seed dictionary", self.round_id, outcome
                )
            return await self._seeds
        finally:
            if not delivery.done():
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await delivery

    async def _compose_sum2(self) -> None:
        assert self.state is not None
        rid = self.round_id
        raw = await self.ctx.journal.inbox(rid, InboxKey.SEEDS)
        if raw is None or self.state.ephemeral_sk is None:
            raise TaskFailedError("journal lost the seed dictionary or the ephemeral key")
        composed = await sum2_message(self.ctx.identity, self.params, raw, self.state.ephemeral_sk)
        self._check_budget(len(composed.message), self.state.bytes_sent, "sum2")
        topic = self.ctx.topics.sum2(rid, self.ctx.identity.identity.device_id)
        entry = self._entry(TopicKind.SUM2, topic, composed.message)
        await self._save(self.state.move(Event.SUM2, composed.detail), entry)

    # -- updater -------------------------------------------------------------------

    async def _updater(self) -> None:
        assert self.state is not None
        if self.state.step is Step.WAITING_SUMS:
            result, sums = await self._train_while_summing()
            await self._compose_update(sums, result)
        elif self.state.step is Step.TRAINED:
            result = await load_training(self.ctx.journal, self.round_id)
            await self._compose_update(await self._sums, result)
        if self.state.step is Step.UPDATE_SENT:
            outcome, receipt = await self._deliver()
            if outcome is not Outcome.ACCEPTED:
                raise TaskFailedError(f"update {outcome}: {receipt_text(receipt)}")
            await self._finish(Event.ACCEPTED, "update accepted")
            log.info("round %d: update accepted", self.round_id)

    async def _train_while_summing(self) -> tuple[TrainResult, tuple[Sum, ...]]:
        """Train while the sum phase runs; a training error ends the wait at once."""
        training = asyncio.create_task(self._train())
        try:
            both: set[asyncio.Future[Any]] = {training, self._sums}
            await asyncio.wait(both, return_when="FIRST_EXCEPTION")
            result = await training
            return result, await self._sums
        finally:
            if not training.done():
                training.cancel()
                with contextlib.suppress(asyncio.CancelledError, MaskflError):
                    await training

    async def _train(self) -> TrainResult:
        p = self.params
        model = await self.ctx.model(p.model_id, p.model_version, p.model_digest)
        if model.weights.size != p.vector_length:
            raise TaskFailedError(
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
            raise TaskFailedError(
                f"local model has {result.delta.size} parameters, the round expects "
                f"{p.vector_length} (model {p.model_id!r} differs from the coordinator's)"
            )
        if result.num_samples < 1:
            raise SatOutError("no training samples")
        await save_training(self.ctx.journal, self.round_id, result)
        loss = "" if result.loss is None else f", loss {result.loss:.4f}"
        assert self.state is not None
        detail = f"{result.num_samples} samples in {result.seconds:.2f} s{loss}"
        await self._save(self.state.move(Event.TRAINED, detail))
        log.info("round %d: trained on %d samples%s", self.round_id, result.num_samples, loss)
        return result

    async def _compose_update(self, sums: tuple[Sum, ...], result: TrainResult) -> None:
        assert self.state is not None
        rid = self.round_id
        cap = self.ctx.config.training.sample_cap
        composed = await update_message(self.ctx.identity, self.params, sums, result, cap)
        self._check_budget(len(composed.message), self.state.bytes_sent, "update")
        topic = self.ctx.topics.update(rid, self.ctx.identity.identity.device_id)
        entry = self._entry(TopicKind.UPDATE, topic, composed.message)
        await self._save(self.state.move(Event.UPDATE, composed.detail), entry)
        await self.ctx.journal.put_blob(rid, BlobKey.DELTA, b"")

    # -- sending -------------------------------------------------------------------

    def _entry(self, kind: TopicKind, topic: str, message: bytes) -> SentMessage:
        return SentMessage(
            self.round_id,
            kind,
            topic,
            digest(message[:HEADER_SIZE]),
            message,
            ReceiptStatus.PENDING,
        )

    def _check_budget(self, size: int, already: int, what: str) -> None:
        verdict = self.ctx.guards.upload_allowed(size, already)
        if not verdict.allowed:
            raise SatOutError(f"{what}: {verdict}")

    async def _deliver(self) -> tuple[Outcome, Receipt | None]:
        """Send the message the current step sends (by the step table) until its receipt."""
        assert self.state is not None
        kind = self.state.step.sends
        assert kind is not None, f"step {self.state.step} sends nothing"
        entry = await self.ctx.journal.sent(self.round_id, kind.topic)
        if entry is None:
            raise TaskFailedError(f"journal has no {kind.topic} message")
        return await self._delivery.deliver(entry)

    async def _published(self, size: int) -> None:
        """One more copy of ``size`` bytes left: the round's upload grows."""
        assert self.state is not None
        state = self.state
        await self._save(
            state.move(Event.PUBLISHED, state.detail, bytes_sent=state.bytes_sent + size)
        )


_ROLE = {Task.SUM: "summer", Task.UPDATE: "updater"}


def _log_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("round task crashed: %r", exc, exc_info=exc)
