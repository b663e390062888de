"""The one loop that drives the round: phases decide, the table moves, the runner acts.

::

    resume (from the database) ─> idle ─> sum ─> update ─> sum2 ─> unmask ─> idle ...
                   any error or a window that ran out ─> failure ─> idle

Each phase ends with a :class:`~maskfl.broker_coordinator.phases.base.Transition`
(an event of the round table, :mod:`maskfl.protocol.round`); the runner looks the
move up, commits it to the store, makes the next phase current and then performs
what the move produces (:mod:`.retained`: publish the round's retained messages,
clear them when the round ended). No phase names its successor, and only the
runner enters ``failure``: it records the outcome ``failed`` once, clears the
round's dictionaries, and the failure phase pauses.

Message phases are driven here: the phase's window (opened at the wall-clock
time stored in the round row, so a restart keeps the deadlines) decides, the
runner waits for commits or the window's next deadline, and on ``closed`` stops
admitting, drains the group commit, lets the phase prepare its outputs (the sum
dictionary) and commits them *together with* the move to the next phase, in one
transaction; only then are they published, and after a restart they are
published again. So nothing of a phase leaves the coordinator before the
database is in that phase: a kill right after the sum dictionary or a seed
dictionary reaches the broker resumes in update or sum2, and the messages it
prompted are admitted, never turned away as ``wrong_phase``. Admission
(:meth:`Runner.offer`, the rules in :mod:`.admission`) and closing take one lock,
so a message is never admitted into a phase that is closing, and the next phase
is in force before any message for it is seen. Every wait (the window, the
pauses of idle and failure) is on the injected clock.

Heartbeats are read in every phase but the round's heavy message phases
(:data:`NO_HEARTBEATS_IN`): :meth:`Runner._enter`, which every phase change goes
through (resume, moves, failure), tells the status subscription
(:class:`~.liveness.StatusSubscription`) whether to listen, so the coordinator
unsubscribes from ``status/+`` as update opens and subscribes again when the round
leaves sum2, whichever way (unmask, failure, a restart in another phase).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Final

from maskfl.aggregator_gpu import Snapshot
from maskfl.broker_coordinator import retained as outputs
from maskfl.broker_coordinator.admission import Admission, Refusal, RoundView, admit
from maskfl.broker_coordinator.committer import Committer
from maskfl.broker_coordinator.context import Contribution, Incoming, OpenRound, Services
from maskfl.broker_coordinator.errors import RoundFailedError
from maskfl.broker_coordinator.liveness import StatusSubscription
from maskfl.broker_coordinator.phases import PHASE_CLASSES
from maskfl.broker_coordinator.phases.base import MessagePhase, StepPhase, Transition
from maskfl.broker_coordinator.store import RoundRecord
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.messages import MESSAGE_PHASES, MessageType, RoundParams, decode_message
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import ROUND_DICTS, Event, Move, RoundOutcome, move, retained
from maskfl.transport import wait_for

log = logging.getLogger("maskfl.coordinator.runner")

NO_HEARTBEATS_IN: Final = frozenset({Phase.UPDATE, Phase.SUM2})
"""The phases in which the coordinator does not read heartbeats: their updates and
sum2 messages share its one MQTT connection with the fleet's heartbeats (100k devices
at 30 s: 14 % of its core), and liveness is only read when a round starts and for the
status page. The alive window does not run meanwhile (:meth:`.Liveness.pause`)."""


class Runner:
    """Owns the round: the current phase object and the open round."""

    def __init__(
        self, services: Services, committer: Committer, status: StatusSubscription
    ) -> None:
        self.s = services
        self.committer = committer
        self.status = status
        self.admission = Admission(services.fleet, services.enrollment)
        self.phase = Phase.IDLE
        self.state: OpenRound | None = None
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

    async def load_state(self, record: RoundRecord) -> OpenRound:
        """Rebuild the round in progress from the database and its checkpoint."""
        s = self.s
        params = decode_message(record.params, max_size=1 << 20).body
        assert isinstance(params, RoundParams)
        state = OpenRound(record=record, params=params)
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
        self._gauges(state)
        return state

    def _gauges(self, state: OpenRound) -> None:
        m = self.s.metrics
        m.round_id.set(state.round_id)
        m.participants.labels(role="summers").set(len(state.summers))
        m.participants.labels(role="updaters").set(len(state.updates))
        m.participants.labels(role="sum2").set(len(state.sum2))

    def view(self) -> RoundView:
        """Where the round stands, for :func:`~.admission.admit`."""
        return RoundView(self.phase, self.state, self.finished_round)

    # -- admission (called by ingest) ----------------------------------------

    async def offer(self, incoming: Incoming) -> Contribution | Refusal:
        """Admit one message into the current phase and submit it for commit, or say
        why not (:func:`~.admission.admit`: every rule is there)."""
        async with self.lock:
            result = admit(self.admission, self.view(), incoming, incoming.received_at)
            if isinstance(result, Contribution):
                phase, state = self.current, self.state
                assert isinstance(phase, MessagePhase) and state is not None
                state.pending.add(incoming.device)
                self.committer.submit(phase, result)
            return result

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
                state = await self.load_state(last)
                self.state = state
                async with self.lock:
                    self._enter(last.phase)
                self._resumed = True
                log.info(
                    "resuming round %d in phase %s",
                    last.round_id,
                    last.phase,
                    extra={"round_id": last.round_id, "phase": last.phase},
                )
                await outputs.publish(s, state, retained(self.phase))
            except MaskflError as exc:
                log.error("cannot resume round %d: %s", last.round_id, exc)
                self.state = None
                await self._fail(f"resume failed: {exc}", record=last)
        elif last is not None:
            # The last round is over. A kill may have come between its final commit
            # and the clearing of its retained dictionaries: clear them (again).
            self.finished_round = last.round_id
            await self._clear(last.round_id, None, ROUND_DICTS)
        if self.phase is Phase.IDLE:
            async with self.lock:
                self._enter(Phase.IDLE)
        self._ready = True

    async def run(self) -> None:
        """Resume (unless :meth:`resume` ran) and drive rounds until shutdown."""
        if not self._ready:
            await self.resume()
        self._ready = False
        while self.phase is not Phase.SHUTDOWN:
            self.s.metrics.set_phase(self.phase)
            failed: Transition | None = None
            try:
                transition = await self._run_phase()
                if transition is not None and transition.event is Event.FAILED:
                    failed = transition
                elif transition is not None:
                    state = transition.round or self.state  # the round the move is about
                    await self._produce(await self._commit(transition), state)
            except MaskflError as exc:
                # A round that could not go on says why in words; anything else names its type.
                reason = str(exc)
                if not isinstance(exc, RoundFailedError):
                    reason = f"{type(exc).__name__}: {exc}"
                failed = Transition(Event.FAILED, reason)
            if failed is not None:
                await self._fail(failed.reason)

    async def _run_phase(self) -> Transition | None:
        """Run the current phase to its end: its transition, or None when it already
        made its move (a message phase commits it under the lock)."""
        current = self.current
        if isinstance(current, MessagePhase):
            return await self._message_phase(current)
        assert isinstance(current, StepPhase)
        return await current.run()

    def _enter(self, phase: Phase) -> None:
        """Make ``phase`` current (call with the lock): its phase object and, for a
        message phase, its window, so that no message for it is turned away."""
        s, state = self.s, self.state
        self.phase = phase
        s.metrics.set_phase(phase)
        rid = None if state is None else state.round_id
        if phase is Phase.FAILURE:
            rid = self.finished_round  # the round that failed (its state already cleared)
        where = str(phase) if rid is None else f"round {rid} in {phase}"
        self.status.want(phase not in NO_HEARTBEATS_IN, where)
        cls = PHASE_CLASSES.get(phase)
        self.current = None if cls is None else cls(s, state)  # type: ignore[arg-type]
        if state is None:
            return
        state.window = None
        if isinstance(self.current, MessagePhase):
            state.window = self.current.open(state.record.phase_opened_at, self.current.count())
            state.closing = False

    async def _commit(self, transition: Transition, *, locked: bool = False) -> Move:
        """Look ``transition`` up in the table, commit the move and enter its target.

        A round that goes on writes its row in the new phase (with the closing
        phase's outputs, e.g. the sum dictionary, in the same transaction: both or
        neither survive a kill); idle's new round is written here, its first row;
        unmask committed the outcome with the model itself."""
        s = self.s
        step = move(self.phase, transition.event)
        state = transition.round or self.state
        if state is not None and step.target in MESSAGE_PHASES | {Phase.UNMASK}:
            record = dataclasses.replace(state.record, phase=step.target, phase_opened_at=s.clock())
            async with s.store.transaction() as tx:
                await tx.put_round(record)
            state.record = record
            if transition.round is not None:
                self.state = transition.round
                self._gauges(transition.round)
        if step.outcome is RoundOutcome.COMPLETED and state is not None:
            self._completed(state)
        if locked:
            self._enter(step.target)
        else:
            async with self.lock:
                self._enter(step.target)
        return step

    async def _produce(self, step: Move, state: OpenRound | None) -> None:
        """What a committed move produces: publish the open round's retained messages,
        or clear those of a round that ended."""
        if state is None:
            return
        if step.clears:
            await self._clear(state.round_id, list(state.summers), step.clears)
        elif step.publishes:
            await outputs.publish(self.s, state, step.publishes)

    def _completed(self, state: OpenRound) -> None:
        self.rounds_completed += 1
        self.s.metrics.rounds.labels(outcome=RoundOutcome.COMPLETED).inc()
        self.finished_round = state.round_id
        self.last_ingest = {
            "round_id": state.round_id,
            "updates": len(state.updates),
            "first_update_at": state.first_update_at,
            "last_update_commit_at": state.last_update_commit_at,
        }
        self.state = None

    async def _message_phase(self, phase: MessagePhase) -> Transition | None:
        s, state = self.s, self.state
        assert state is not None
        while True:
            if self.committer.error is not None:
                err, self.committer.error = self.committer.error, None
                raise err
            if phase.run(state, s.clock()) is None:
                s.changed.clear()
                # transport.wait_for, not asyncio's: on the injected clock, and 3.11's
                # asyncio.wait_for can swallow a cancel that lands as the event is set
                # (the service's stop then hangs).
                with contextlib.suppress(TimeoutError):
                    await wait_for(s.clock, s.changed.wait(), phase.wake_at(state) - s.clock())
                continue
            async with self.lock:
                state.closing = True
                await self.committer.drain()
                if self.committer.error is not None:
                    continue
                transition = phase.run(state, s.clock())
                if transition is None:
                    state.closing = False
                    continue
                if transition.event is Event.FAILED:
                    return transition  # still closing: nothing more is admitted
                assert state.window is not None
                log.info(
                    "round %d: %s phase closes with %d messages",
                    state.round_id,
                    self.phase,
                    state.window.count,
                    extra={"round_id": state.round_id, "phase": str(self.phase)},
                )
                await phase.close()  # outputs into state.record, nothing published
                step = await self._commit(transition, locked=True)  # with the new phase
            await self._produce(step, state)
            return None

    # -- failure --------------------------------------------------------------

    async def _fail(self, reason: str, *, record: RoundRecord | None = None) -> None:
        """The table's ``failed`` move, from wherever the round is: stop admitting,
        record the outcome once, clear the round's retained messages, enter failure."""
        s = self.s
        step = move(self.phase, Event.FAILED)
        state = self.state
        if state is not None:
            record = state.record
        round_id = None if record is None else record.round_id
        self.last_failure = (round_id, reason)
        await self._leave_message_phase()
        if record is not None:
            assert step.outcome is not None
            failed = dataclasses.replace(
                record,
                phase=step.target,
                outcome=step.outcome,
                detail=reason[:500],
                finished_at=s.clock(),
            )
            async with s.store.transaction() as tx:
                await tx.put_round(failed)
                await tx.forget_round_bulk(failed.round_id)
            log.warning(
                "round %d failed: %s",
                failed.round_id,
                reason,
                extra={"round_id": failed.round_id, "phase": "failure"},
            )
        else:
            log.warning("round failed before it started: %s", reason)
        self.rounds_failed += 1
        s.metrics.rounds.labels(outcome=RoundOutcome.FAILED).inc()
        self.state = None
        self.finished_round = round_id
        async with self.lock:
            self._enter(step.target)
        if round_id is not None:
            await self._clear(round_id, None if state is None else list(state.summers), step.clears)

    async def _leave_message_phase(self) -> None:
        """Before failing: stop admitting, let pending commits finish."""
        async with self.lock:
            if self.state is not None:
                self.state.closing = True
            self.current = None
        await self.committer.drain()
        self.committer.error = None

    # -- retained outputs -----------------------------------------------------

    async def _clear(
        self, round_id: int, summers: list[str] | None, kinds: tuple[MessageType, ...]
    ) -> None:
        """Clear a finished round's retained dictionaries (its summers from the store
        when the round is not in memory)."""
        if summers is None:
            try:
                summers = [r.device_id for r in await self.s.store.summers(round_id)]
            except MaskflError as exc:
                log.warning("could not clear retained round topics: %s", exc)
                return
        await outputs.clear(self.s, round_id, summers, kinds)

    async def republish(self) -> None:
        """Publish the open round's retained state again (after the broker lost it)."""
        if self.state is not None:
            await outputs.publish(self.s, self.state, retained(self.phase))
