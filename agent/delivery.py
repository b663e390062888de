"""Sending a journaled message until its receipt comes, and what a receipt means.

A message of ours is journaled (:class:`~maskfl.agent.state.SentMessage`) before it
is published. :class:`Delivery` publishes it and waits for the coordinator's receipt;
without one within ``limits.receipt_timeout_s`` (on the agent's clock, so a test moves
it) the *same bytes* are published again
(at most ``limits.upload_retries`` times, within the round's upload budget), then it
waits for the receipt for as long as the round lasts. :func:`classify_receipt` says
what a receipt means: ``duplicate`` is an acceptance (a redelivery counted before), and
a late-phase rejection of a *repeated* send proves nothing (a copy may have counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum

from maskfl.agent.config import AgentConfig
from maskfl.agent.guards import Guards
from maskfl.agent.state import Journal, ReceiptStatus, SentMessage
from maskfl.protocol.errors import Reason
from maskfl.protocol.messages import Receipt
from maskfl.protocol.topics import TopicKind
from maskfl.transport import Clock, wait_for

__all__ = ["Delivery", "Outcome", "classify_receipt", "receipt_text"]

log = logging.getLogger("maskfl.agent.round")

#: Rejections of a *repeated* message that do not prove the first copy was refused.
_AMBIGUOUS_ON_REPEAT = frozenset({Reason.PHASE_CLOSED, Reason.WRONG_PHASE, Reason.WRONG_ROUND})


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    AMBIGUOUS = "ambiguous"


def classify_receipt(receipt: Receipt, *, repeated: bool) -> Outcome:
    """What a receipt says about the message it answers: ``duplicate`` means the
    message counted (a redelivery after a coordinator crash, in whatever phase or
    round); a late-phase rejection of a *repeated* send proves nothing."""
    if receipt.accepted or receipt.reason is Reason.DUPLICATE:
        return Outcome.ACCEPTED
    if repeated and receipt.reason in _AMBIGUOUS_ON_REPEAT:
        return Outcome.AMBIGUOUS
    return Outcome.REJECTED


def receipt_status(outcome: Outcome) -> ReceiptStatus | None:
    """The journal's status for a receipt's outcome (None: ambiguous, keep waiting)."""
    match outcome:
        case Outcome.ACCEPTED:
            return ReceiptStatus.ACCEPTED
        case Outcome.REJECTED:
            return ReceiptStatus.REJECTED
        case _:
            return None


def receipt_text(receipt: Receipt | None) -> str:
    """A receipt's answer for a log line (None: the journal had it already)."""
    if receipt is None:
        return "(journaled earlier)"
    detail = f" ({receipt.detail})" if receipt.detail else ""
    return f"{receipt.reason or 'accepted'}{detail}"


class Delivery:
    """The sending side of one round: receipts as they come, and the resend loop.

    ``publish`` puts bytes on the wire; ``bytes_sent`` is the round's upload so far
    and ``published(size)`` journals one more copy of ``size`` bytes. The receipt
    timeout runs on ``clock``.
    """

    def __init__(
        self,
        round_id: int,
        *,
        config: AgentConfig,
        journal: Journal,
        guards: Guards,
        clock: Clock,
        publish: Callable[[str, bytes], Awaitable[None]],
        bytes_sent: Callable[[], int],
        published: Callable[[int], Awaitable[None]],
    ) -> None:
        self.round_id = round_id
        self._limits = config.limits
        self._journal = journal
        self._guards = guards
        self._clock = clock
        self._publish = publish
        self._bytes_sent = bytes_sent
        self._published = published
        self._receipts: dict[TopicKind, asyncio.Future[Receipt]] = {}

    def offer_receipt(self, kind: TopicKind, receipt: Receipt) -> None:
        """A verified receipt for our message ``kind`` of this round (the first counts)."""
        future = self._future(kind)
        if not future.done():
            future.set_result(receipt)

    def _future(self, kind: TopicKind) -> asyncio.Future[Receipt]:
        future = self._receipts.get(kind)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._receipts[kind] = future
        return future

    async def deliver(self, entry: SentMessage) -> tuple[Outcome, Receipt | None]:
        """Publish the journaled ``entry`` until its receipt arrives; journal the answer."""
        if entry.status is ReceiptStatus.ACCEPTED:
            return Outcome.ACCEPTED, None
        if entry.status is ReceiptStatus.REJECTED:
            return Outcome.REJECTED, None
        retries = self._limits.upload_retries
        future = self._future(entry.kind)
        attempts = 0
        receipt: Receipt | None = None
        while receipt is None:
            if attempts <= retries and not future.done():
                sent = await self._publish_copy(entry, attempts)
                attempts = attempts + 1 if sent else retries + 1
            receipt = await self._wait(entry.kind, future, last=attempts > retries)
        outcome = classify_receipt(receipt, repeated=attempts + entry.attempts > 1)
        status = receipt_status(outcome)
        if status is not None:
            reason = str(receipt.reason or "")
            await self._journal.mark_receipt(self.round_id, entry.kind, status, reason)
        if outcome is Outcome.REJECTED:
            log.warning(
                "round %d: %s rejected: %s", self.round_id, entry.kind, receipt_text(receipt)
            )
        return outcome, receipt

    async def _publish_copy(self, entry: SentMessage, attempts: int) -> bool:
        """Publish one copy, unless a resend would break the upload budget (False)."""
        rid, kind = self.round_id, entry.kind
        budget = self._guards.upload_allowed(len(entry.payload), self._bytes_sent())
        if not budget.allowed and attempts > 0:
            log.warning("round %d: not resending %s: %s", rid, kind, budget)
            return False
        if attempts or entry.attempts:
            n = entry.attempts + attempts + 1
            log.info("round %d: publishing %s again (attempt %d)", rid, kind, n)
        await self._publish(entry.topic, entry.payload)
        await self._journal.mark_attempt(rid, kind)
        await self._published(len(entry.payload))
        return True

    async def _wait(
        self, kind: TopicKind, future: asyncio.Future[Receipt], *, last: bool
    ) -> Receipt | None:
        """The receipt; None when it did not come within the receipt timeout (resend).
        After the ``last`` copy the wait has no limit (a new round ends it)."""
        if last:
            return await future
        timeout = self._limits.receipt_timeout_s
        try:
            return await wait_for(self._clock, asyncio.shield(future), timeout)
        except TimeoutError:
            log.warning("round %d: no receipt for %s after %.0f s", self.round_id, kind, timeout)
            return None
