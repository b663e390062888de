"""Group commit: admitted messages become durable in batches, then are acknowledged.

The ingest path admits a message (all checks done, nothing written) and hands a
:class:`Contribution` to :meth:`Committer.submit`. The committer task takes up
to ``group_commit_max`` of them, or whatever arrived within ``group_commit_ms``
of the first (on the coordinator's clock), and asks the phase that admitted them to
make them durable:

1. ``phase.prepare(batch)``: the work outside SQLite (for updates: add the
   words to the accumulator, append them to the update log and fsync, write the
   next aggregate checkpoint generation: temp, fsync, rename);
2. one SQLite transaction: ``phase.write(tx, batch)`` plus the round row (which
   names the new checkpoint generation and the update log's committed size),
   plus each message's signed ``accepted`` receipt among the stored receipts
   (table ``receipt_outbox``; and the deletion of the rows whose receipts the broker has confirmed
   since the last commit);
3. ``phase.committed(batch)``: in-memory bookkeeping, the phase timer;
4. only now the receipts; each message's MQTT deliveries are acked once the
   broker has its receipt (see :mod:`.outbox`).

A crash anywhere before 2 completes leaves the database naming the previous
generation, with nothing acked: the broker redelivers and the messages are
admitted again. A crash after 2 leaves them durable with their receipts stored:
the restarted coordinator sends those receipts, and the broker
redelivers the unacked messages, which are recognised by their digest
(``duplicate``, in whatever phase or round the coordinator is by then).

If making a batch durable fails (disk full, I/O error), the batch is rejected
and acked with a ``phase_closed`` receipt and :attr:`Committer.error` is set:
the runner then fails the round, since its aggregate can no longer be trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from maskfl.broker_coordinator.context import Contribution, Services
from maskfl.broker_coordinator.store import Transaction
from maskfl.protocol.errors import MaskflError, Reason, StorageError
from maskfl.protocol.messages import Receipt
from maskfl.transport import wait_for

if TYPE_CHECKING:
    from maskfl.transport import Message

log = logging.getLogger("maskfl.coordinator.commit")


class Committing(Protocol):
    """What a message phase provides to the committer."""

    async def prepare(self, batch: list[Contribution]) -> None: ...

    async def write(self, tx: Transaction, batch: list[Contribution]) -> None: ...

    def committed(self, batch: list[Contribution]) -> None: ...

    def failed(self, batch: list[Contribution]) -> None: ...


Settle = Callable[[Contribution, Reason | None, str, bytes | None], None]
"""Send the receipt (then ack the deliveries): ``reason`` None means accepted, and
then the last argument is the signed receipt, already among the stored receipts."""


class Committer:
    def __init__(self, services: Services, settle: Settle, ack: Callable[[Message], None]) -> None:
        self._s = services
        self._settle = settle
        self._ack = ack
        self._queue: asyncio.Queue[tuple[Committing, Contribution]] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self.error: MaskflError | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, phase: Committing, item: Contribution) -> None:
        self._idle.clear()
        self._queue.put_nowait((phase, item))

    async def drain(self) -> None:
        """Return once everything submitted so far is committed (or rejected)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._commit_next()
            if self._queue.empty():
                self._idle.set()

    async def _commit_next(self) -> None:
        """Collect one group commit's batch and commit it. Its own frame: the batch (each
        message's whole payload, a model's size for a large update) is freed when this
        returns, not kept referenced by the loop until the next message arrives."""
        cfg, clock = self._s.config.storage, self._s.clock
        window = cfg.group_commit_ms / 1000.0
        phase, first = await self._queue.get()
        batch = [first]
        deadline = clock() + window
        while len(batch) < cfg.group_commit_max:
            if self._queue.empty():
                # On the coordinator's clock (a test's fake clock holds the batch open
                # until it is advanced); a clock set back never stretches it past one
                # window from now.
                remaining = min(deadline - clock(), window)
                if remaining <= 0:
                    break
                try:
                    nxt = await wait_for(clock, self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            if nxt[0] is not phase:
                # Never mix phases in one batch: commit this one first.
                await self._commit(phase, batch)
                phase, batch = nxt[0], [nxt[1]]
                continue
            batch.append(nxt[1])
        await self._commit(phase, batch)

    def _accepted_receipt(self, item: Contribution) -> tuple[bytes, str, bytes]:
        message = item.incoming.message
        header = message.header
        raw = self._s.sign(Receipt(message.digest, header.message_type, True), header.round_id)
        return message.digest, self._s.topics.receipts(item.incoming.device), raw

    async def _commit(self, phase: Committing, batch: list[Contribution]) -> None:
        started = time.perf_counter()
        delivered = self._s.outbox.take_sent()
        try:
            await phase.prepare(batch)
            prepared = time.perf_counter()
            receipts = [self._accepted_receipt(item) for item in batch]
            async with self._s.store.transaction() as tx:
                await phase.write(tx, batch)
                await tx.store_receipts(receipts)
                await tx.receipts_delivered(delivered)
        except Exception as exc:  # this loop must survive to settle the batch
            # A MaskflError (disk full, bad aggregate) or a bug: either way the batch
            # is not durable, its deliveries are settled, and the runner fails the round
            # instead of waiting forever for a drain that would never come.
            if not isinstance(exc, MaskflError):
                log.exception("group commit crashed")
            log.error("group commit of %d messages failed: %s", len(batch), exc)
            self.error = exc if isinstance(exc, MaskflError) else StorageError(str(exc))
            phase.failed(batch)
            for item in batch:
                self._settle(
                    item, Reason.PHASE_CLOSED, f"coordinator could not store it: {exc}", None
                )
            self._s.changed.set()
            return
        phase.committed(batch)
        elapsed = time.perf_counter() - started
        log.debug(
            "committed %d: prepare %.1f ms, sqlite %.1f ms, queued %d",
            len(batch),
            (prepared - started) * 1e3,
            (elapsed - (prepared - started)) * 1e3,
            self._queue.qsize(),
        )
        self._s.metrics.aggregation_seconds.observe(elapsed)
        self._s.metrics.batch_size.observe(len(batch))
        for item, (_, _, raw) in zip(batch, receipts, strict=True):
            self._settle(item, None, "", raw)
        self._s.changed.set()
