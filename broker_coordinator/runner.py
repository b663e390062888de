"""The one loop that drives the phases with messages and the clock.

::

    resume (from the database) ─> idle ─> sum ─> update ─> sum2 ─> unmask ─> idle ...
                                    any MaskflError in a phase ─> failure ─> idle

Message phases are driven here: the runner builds the phase's
:class:`~maskfl.protocol.phases.PhaseTimer` (opened at the wall-clock time
stored in the round row, so a restart keeps the deadlines), waits for commits
or the timer's next deadline, and on ``CLOSE`` stops admitting, drains the
group commit, lets the phase prepare its outputs (the sum dictionary) and
commits them *together with* the move to the next phase, in one transaction;
only then does the next phase publish them (:meth:`MessagePhase.enter`), and
after a restart it publishes them again. So nothing of a phase leaves the
coordinator before the database is in that phase: a kill right after the sum
dictionary or a seed dictionary reaches the broker resumes in update or sum2,
and the messages it prompted are admitted, never turned away as
``wrong_phase``. On ``FAIL`` the round goes to ``failure``. Admission
(:meth:`Runner.offer`) and closing take one lock, so a message is never
admitted into a phase that is closing, and the next phase is in force before
any message for it is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Final

from maskfl.aggregator_gpu import Snapshot
from maskfl.broker_coordinator.committer import Committer
from maskfl.broker_coordinator.context import Incoming, RoundState, Services
from maskfl.broker_coordinator.errors import RoundFailedError, shortfall_reason
from maskfl.broker_coordinator.phases import PHASE_CLASSES
from maskfl.broker_coordinator.phases.base import MessagePhase, StepPhase
from maskfl.broker_coordinator.phases.failure import FailurePhase
from maskfl.broker_coordinator.phases.idle import IdlePhase
from maskfl.broker_coordinator.phases.unmask import UnmaskPhase
from maskfl.broker_coordinator.phases.update import publish_seed_dicts
from maskfl.broker_coordinator.store import RoundOutcome, RoundRecord
from maskfl.protocol.errors import MaskflError, Reason, RemoteProtocolError
from maskfl.protocol.messages import MESSAGE_PHASES, RoundParams, decode_message
from maskfl.protocol.phases import Phase, PhaseTimer, Verdict, precedes
from maskfl.protocol.round import check_transition

log = logging.getLogger("maskfl.coordinator.runner")

_MAX_WAIT_S: Final = 1.0


class Runner:
    """Owns the round: the current phase object and the round state."""

    def __init__(self, services: Services, committer: Committer) -> None:
        self.s = services
        self.committer = committer
        self.phase = Phase.IDLE
        self.state: RoundState | None = None
        self.current: MessagePhase | StepPhase | None = None
        self.lock = asyncio.Lock()
        self.rounds_completed = 0
        self.finished_round: int | None = None
        self.last_ingest: dict[str, float | int | None] = {}
        """When the last completed round's first update arrived and its last was committed."""
        self._ready = False
        self._resumed = False
        self.rounds_failed = 0
        self.last_failure: tuple[int | None, str] | None = None
        """The round id and reason of the latest failed round (for /status)."""

    # -- state ---------------------------------------------------------------

    async def load_state(self, record: RoundRecord) -> RoundState:
        """Rebuild the round in progress from the database and its checkpoint."""
        s = self.s
        params = decode_message(record.params, max_size=1 << 20).body
        assert isinstance(params, RoundParams)
        state = RoundState(record=record, params=params)
        rid = record.round_id
        for summer in await s.store.summers(rid):
            state.summers[summer.device_id] = summer
            state.summer_devices[summer.public_key] = summer.device_id
            state.accepted_digests.add(summer.digest)
        for update in await s.store.updates(rid):
            state.updates[update.device_id] = update
            state.update_digests.add(update.digest)
            state.accepted_digests.add(update.digest)
        for sum2 in await s.store.sum2s(rid):
            state.sum2[sum2.device_id] = sum2
            state.accepted_digests.add(sum2.digest)
        if record.checkpoint_gen:
            image = await asyncio.to_thread(s.checkpoints.read, rid, record.checkpoint_gen)
            state.acc = s.backend.restore(Snapshot.from_bytes(image))
            if state.acc.count != len(state.updates):
                raise RoundFailedError(
                    f"checkpoint holds {state.acc.count} updates, the database "
                    f"{len(state.updates)}",
                    round_id=rid,
                )
        else:
            state.acc = s.backend.accumulator(s.vector_words, s.mask.word_bits)
        await asyncio.to_thread(s.checkpoints.prune, rid, record.checkpoint_gen or None)
        await asyncio.to_thread(s.update_log.prune, rid)
        s.metrics.round_id.set(rid)
        s.metrics.participants.labels(role="summers").set(len(state.summers))
        s.metrics.participants.labels(role="updaters").set(len(state.updates))
        s.metrics.participants.labels(role="sum2").set(len(state.sum2))
        return state

    def _count(self, phase: Phase) -> int:
        assert self.state is not None
        match phase:
            case Phase.SUM:
                return len(self.state.summers)
            case Phase.UPDATE:
                return len(self.state.updates)
            case Phase.SUM2:
                return len(self.state.sum2)
            case _:
                return 0

    # -- admission (called by ingest) ----------------------------------------

    async def offer(self, incoming: Incoming) -> None:
        """Admit one message into the current phase and submit it for commit.

        Raises :class:`RemoteProtocolError` with the receipt's reason.
        """
        header = incoming.message.header
        async with self.lock:
            state = self.state
            if state is None and header.round_id == self.finished_round:
                raise RemoteProtocolError(Reason.PHASE_CLOSED, f"round {header.round_id} is over")
            if state is None or header.round_id != state.round_id:
                current = "none" if state is None else str(state.round_id)
                raise RemoteProtocolError(
                    Reason.WRONG_ROUND,
                    f"message for round {header.round_id}, current round is {current}",
                )
            wanted = header.message_type.phase
            if wanted is None:
                raise RemoteProtocolError(
                    Reason.MALFORMED, f"{header.message_type.name} is not a participant message"
                )
            phase = self.current
            if not isinstance(phase, MessagePhase) or phase.phase != wanted or state.closing:
                if precedes(wanted, self.phase) or (wanted == self.phase and state.closing):
                    raise RemoteProtocolError(
                        Reason.PHASE_CLOSED, f"the {wanted} phase of round {state.round_id} closed"
                    )
                raise RemoteProtocolError(
                    Reason.WRONG_PHASE,
                    f"{header.message_type.name} not accepted in the {self.phase} phase",
                )
            item = await phase.admit(incoming)
            state.pending.add(incoming.device)
            self.committer.submit(phase, item)

    # -- the loop -------------------------------------------------------------

    async def resume(self) -> None:
        """Load the round in progress (if any) and open its phase, before any message
        is offered: ingest must not see a half-started coordinator."""
        s = self.s
        last = await s.store.last_round()
        self._resumed = False
        self.phase = Phase.IDLE
        self.state = None
        self.current = None
        if last is not None and last.outcome is None:
            try:
                self.state = await self.load_state(last)
                self.phase = last.phase
                self._resumed = True
                if self.phase in MESSAGE_PHASES:
                    async with self.lock:
                        self._open()
                log.info(
                    "resuming round %d in phase %s",
                    last.round_id,
                    last.phase,
                    extra={"round_id": last.round_id, "phase": last.phase},
                )
                await s.outbox.state(s.topics.round, last.params)
            except MaskflError as exc:
                log.error("cannot resume round %d: %s", last.round_id, exc)
                self.state = None
                self.phase = Phase.FAILURE
                await self._fail_record(last, f"resume failed: {exc}")
        elif last is not None:
            # The last round is over. A kill may have come between its final commit
            # and the clearing of its retained dictionaries: clear them (again).
            self.finished_round = last.round_id
            await self._clear_finished(last.round_id)
        self._ready = True

    async def _clear_finished(self, round_id: int) -> None:
        s = self.s
        try:
            await s.outbox.clear(s.topics.sums(round_id))
            for summer in await s.store.summers(round_id):
                await s.outbox.clear(s.topics.seeds(round_id, summer.device_id))
        except MaskflError as exc:
            log.warning("could not clear retained round topics: %s", exc)

    async def run(self) -> None:
        """Resume (unless :meth:`resume` ran) and drive rounds until shutdown."""
        s = self.s
        if not self._ready:
            await self.resume()
        self._ready = False
        resumed = self._resumed
        while self.phase is not Phase.SHUTDOWN:
            s.metrics.set_phase(self.phase)
            try:
                nxt = await self._step(resumed)
            except MaskflError as exc:
                nxt = Phase.FAILURE
                # A round that could not go on says why in words; anything else names its type.
                reason = str(exc)
                if not isinstance(exc, RoundFailedError):
                    reason = f"{type(exc).__name__}: {exc}"
                self.last_failure = (self.state.round_id if self.state else None, reason)
                await self._leave_message_phase()
                if self.state is None:
                    # Failed in idle after the round row was written: close that row.
                    last = await s.store.last_round()
                    if last is not None and last.outcome is None:
                        await self._fail_record(last, reason)
                self.current = FailurePhase(s, self.state, reason)
                self.phase = Phase.FAILURE
                self.rounds_failed += 1
                s.metrics.rounds.labels(outcome=RoundOutcome.FAILED).inc()
                s.metrics.set_phase(Phase.FAILURE)
                await self._clear_round_topics()
                nxt = await self.current.run()
                self.finished_round = None if self.state is None else self.state.round_id
                self.state = None
            resumed = False
            if nxt is not self.phase:
                await self._transition(nxt)

    async def _fail_record(self, record: RoundRecord, reason: str) -> None:
        async with self.s.store.transaction() as tx:
            await tx.put_round(
                dataclasses.replace(
                    record,
                    phase=Phase.FAILURE,
                    outcome=RoundOutcome.FAILED,
                    detail=reason[:500],
                    finished_at=self.s.clock(),
                )
            )

    async def _step(self, resumed: bool) -> Phase:
        s = self.s
        match self.phase:
            case Phase.IDLE:
                idle = IdlePhase(s, None)
                self.current = idle
                return await idle.run()
            case Phase.FAILURE:
                self.current = FailurePhase(s, self.state, "resumed in failure")
                self.state = None
                return await self.current.run()
            case Phase.UNMASK:
                unmask = UnmaskPhase(s, self.state)
                self.current = unmask
                nxt = await unmask.run()
                self.rounds_completed += 1
                s.metrics.rounds.labels(outcome=RoundOutcome.COMPLETED).inc()
                await self._clear_round_topics()
                self.finished_round = None if self.state is None else self.state.round_id
                if self.state is not None:
                    self.last_ingest = {
                        "round_id": self.state.round_id,
                        "updates": len(self.state.updates),
                        "first_update_at": self.state.first_update_at,
                        "last_update_commit_at": self.state.last_update_commit_at,
                    }
                self.state = None
                return nxt
            case _:
                return await self._message_phase(resumed)

    def _open(self) -> MessagePhase:
        """Make the phase object and timer of ``self.phase`` current (call with the lock)."""
        s, state = self.s, self.state
        assert state is not None
        cls = PHASE_CLASSES[self.phase]
        assert issubclass(cls, MessagePhase)
        phase = cls(s, state)
        timer = PhaseTimer(phase.window(), state.record.phase_opened_at)
        count = min(self._count(self.phase), timer.window.count_max)
        if count:
            timer.accepted(count)
        state.timer = timer
        state.closing = False
        self.current = phase
        return phase

    async def _message_phase(self, resumed: bool) -> Phase:
        s, state = self.s, self.state
        assert state is not None
        async with self.lock:
            current = self.current
            if isinstance(current, MessagePhase) and current.phase == self.phase:
                phase = current
            else:
                phase = self._open()
        timer = state.timer
        assert timer is not None
        await phase.enter(resumed)
        while True:
            if self.committer.error is not None:
                err, self.committer.error = self.committer.error, None
                raise err
            verdict = self._verdict(phase, timer)
            if verdict is Verdict.OPEN:
                s.changed.clear()
                wake = (
                    timer.wake_at() if phase.ready() else timer.opened_at + timer.window.time_max_s
                )
                wait = max(0.0, min(wake - s.clock(), _MAX_WAIT_S))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s.changed.wait(), wait)
                continue
            async with self.lock:
                state.closing = True
                await self.committer.drain()
                if self.committer.error is not None:
                    continue
                verdict = self._verdict(phase, timer)
                if verdict is Verdict.OPEN:
                    state.closing = False
                    continue
                if verdict is Verdict.FAIL:
                    raise RoundFailedError(
                        shortfall_reason(
                            str(self.phase),
                            timer.count,
                            timer.window.count_min,
                            timer.window.time_max_s,
                        ),
                        round_id=state.round_id,
                        phase=self.phase,
                    )
                log.info(
                    "round %d: %s phase closes with %d messages",
                    state.round_id,
                    self.phase,
                    timer.count,
                    extra={"round_id": state.round_id, "phase": str(self.phase)},
                )
                nxt = await phase.close()  # outputs into state.record, nothing published
                await self._transition(nxt, locked=True)  # committed with the new phase
                return nxt

    def _verdict(self, phase: MessagePhase, timer: PhaseTimer) -> Verdict:
        now = self.s.clock()
        verdict = timer.decide(now)
        if verdict is Verdict.OPEN and phase.complete() and timer.count >= timer.window.count_min:
            return Verdict.CLOSE
        if verdict is Verdict.CLOSE and not timer.full and not phase.ready():
            # Enough messages, but not the right ones yet (sum2: a mask group without
            # an answer): keep waiting until time_max, then close and let the phase
            # that needs them say what is missing.
            return Verdict.CLOSE if timer.elapsed(now) >= timer.window.time_max_s else Verdict.OPEN
        return verdict

    async def _leave_message_phase(self) -> None:
        """Before failing: stop admitting, let pending commits finish."""
        async with self.lock:
            if self.state is not None:
                self.state.closing = True
            self.current = None
        await self.committer.drain()
        self.committer.error = None

    async def _transition(self, nxt: Phase, *, locked: bool = False) -> None:
        """Record ``self.phase -> nxt``; a message phase is opened at once (under the
        lock, when the caller holds it) so that no message for it is turned away."""
        check_transition(self.phase, nxt)
        s = self.s
        starting = nxt is Phase.SUM and self.state is None
        if starting:
            last = await s.store.last_round()
            assert last is not None
            self.state = await self.load_state(last)
        elif self.state is not None and nxt in MESSAGE_PHASES | {Phase.UNMASK}:
            # The closing phase's outputs (state.record.sum_dict) go in this same
            # transaction as the new phase: both or neither survive a kill.
            record = dataclasses.replace(self.state.record, phase=nxt, phase_opened_at=s.clock())
            async with s.store.transaction() as tx:
                await tx.put_round(record)
            self.state.record = record
        self.phase = nxt
        s.metrics.set_phase(nxt)
        if nxt in MESSAGE_PHASES:
            if locked:
                self._open()
            else:
                async with self.lock:
                    self._open()
        else:
            self.current = None
        if starting and self.state is not None:
            # Publish the round only now that its sum phase admits messages.
            await s.outbox.state(s.topics.round, self.state.record.params)

    async def republish(self) -> None:
        """Publish the current round's retained state again (after the broker lost it)."""
        state, s = self.state, self.s
        if state is None:
            return
        await s.outbox.state(s.topics.round, state.record.params)
        if state.record.sum_dict is not None:
            await s.outbox.state(s.topics.sums(state.round_id), state.record.sum_dict)
        if self.phase in (Phase.SUM2, Phase.UNMASK):
            await publish_seed_dicts(self.s, state)

    async def _clear_round_topics(self) -> None:
        """Remove the finished round's retained sum and seed dictionaries."""
        state, s = self.state, self.s
        if state is None:
            return
        try:
            await s.outbox.clear(s.topics.sums(state.round_id))
            for summer in state.summers.values():
                await s.outbox.clear(s.topics.seeds(state.round_id, summer.device_id))
        except MaskflError as exc:
            log.warning("could not clear retained round topics: %s", exc)
