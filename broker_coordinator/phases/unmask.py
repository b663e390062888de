"""unmask: vote on the aggregate masks, unmask, decode, step the model, publish it.

In each mask group, the mask that the most of its summers sent wins (a tie
fails the round); the winners of the g groups are added (the sum of every
updater's g sub-masks). A group with no sum2 fails the round. If the
winning summers could not open some updates' seeds, those updates are dropped:
their masked words (from the update log) are added to the mask before it is
subtracted, so the aggregate then holds exactly the other updates, whose masks
the summers did add. Fewer than ``privacy.min_updates`` updates left (never
fewer than 2, whatever the configuration) fails the round before anything is
unmasked: the privacy floor. Decoding divides by the unmasked sum of weights; the
server optimizer turns that mean delta into the next global model, which is
stored in the registry (with the round's outcome, in one transaction) and
published signed and retained on ``model/<id>/latest``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import time
from dataclasses import dataclass

import numpy as np

from maskfl.aggregator_gpu import (
    DigestVote,
    MaskVoteTieError,
    WordsLike,
    plurality_of_digests,
)
from maskfl.broker_coordinator.config import MIN_UPDATES_FLOOR
from maskfl.broker_coordinator.context import ModelState
from maskfl.broker_coordinator.errors import RoundFailedError
from maskfl.broker_coordinator.optimizers import F32, F64
from maskfl.broker_coordinator.phases.base import StepPhase, Transition
from maskfl.broker_coordinator.store import ModelRecord, Sum2Record, UpdateRecord
from maskfl.protocol.errors import AggregationError, StorageError
from maskfl.protocol.ids import RoundId
from maskfl.protocol.masking import (
    FleetEvaluation,
    decode_evaluation,
    decode_values,
    decode_weight_sum,
    error_bound,
)
from maskfl.protocol.messages import GlobalModel, GlobalModelBuffer, weights_digest
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import Event, move

log = logging.getLogger("maskfl.coordinator.unmask")


@dataclass(frozen=True, slots=True)
class _Usage:
    """The process's totals at one instant: wall clock, CPU (user, system, all threads)
    and page faults (minor: a page mapped or zero-filled; major: read from disk)."""

    wall: float
    user: float
    system: float
    minor_faults: int
    major_faults: int

    @classmethod
    def now(cls) -> _Usage:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt, r.ru_majflt)

    def since(self, earlier: _Usage) -> _Usage:
        return _Usage(
            self.wall - earlier.wall,
            self.user - earlier.user,
            self.system - earlier.system,
            self.minor_faults - earlier.minor_faults,
            self.major_faults - earlier.major_faults,
        )


class _Steps:
    """What each step of the unmask path cost, in order (:class:`_Usage` differences),
    for the round's breakdown log line, which ``maskfl-bench coordinator`` reads."""

    def __init__(self) -> None:
        self.started = self._last = _Usage.now()
        self.steps: list[tuple[str, _Usage]] = []

    def mark(self, name: str) -> float:
        """End step ``name`` now; returns the wall clock (perf_counter)."""
        now = _Usage.now()
        self.steps.append((name, now.since(self._last)))
        self._last = now
        return now.wall

    def total(self) -> _Usage:
        """From the start to the end of the last step."""
        return self._last.since(self.started)

    def describe(self) -> str:
        return ", ".join(
            f"{name} {u.wall:.3f} {u.user:.3f}+{u.system:.3f} {u.minor_faults}/{u.major_faults}"
            for name, u in self.steps
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the round's log line says of the new model."""

    version: int
    metrics: tuple[tuple[str, float], ...]
    included: int
    dropped: int
    weight_sum: float


_NO_WEIGHTS: F32 = np.empty(0, np.float32)


class UnmaskPhase(StepPhase):
    phase = Phase.UNMASK

    async def run(self) -> Transition:
        """Vote on the masks, unmask, step the model, store it with the round's
        outcome, publish it: ``done``. A round that cannot be unmasked raises
        :class:`RoundFailedError` (the runner fails it)."""
        state = self.state
        assert state is not None and state.acc is not None
        steps = _Steps()
        winners, failed = self._vote()
        dropped = [u for u in state.updates.values() if u.digest in failed]
        mask = await self._mask(winners, dropped)
        steps.mark("mask")
        included = self._floor(state.acc.count - len(dropped), len(dropped))
        weight_sum, fleet = self._unmask(mask, included)
        del mask
        steps.mark("subtract")
        metrics = self._metrics(included, len(dropped), winners, weight_sum, fleet)
        outcome = _Outcome(self.s.model.version + 1, metrics, included, len(dropped), weight_sum)
        model = self._step(outcome)
        steps.mark("decode_step")
        await self._store_and_publish(model, outcome, steps)
        return Transition(Event.DONE)

    async def _mask(self, winners: list[DigestVote], dropped: list[UpdateRecord]) -> WordsLike:
        """The words to subtract from the aggregate: the winning mask of each group,
        plus the masked words of the updates whose seeds did not open (the aggregate
        holds them, the masks do not), added up in one buffer (words wrap modulo
        2^word_bits, as in the aggregate). The updates' words kept in memory are let go
        here: once the vote named the dropped updates, nothing reads them again."""
        s, state = self.s, self.state
        assert state is not None
        rid = state.round_id
        needed = {u.digest for u in dropped}
        kept = {d: w for d, w in state.words.items() if d in needed}
        self._release_words()
        dtype = np.dtype(s.mask.dtype)
        size = s.vector_words * dtype.itemsize
        # Mapped from the mask files, which the page cache holds: no 4·M-byte read into
        # fresh memory (see CheckpointFiles.map_mask).
        if not dropped and len(winners) == 1:
            return np.frombuffer(s.checkpoints.map_mask(rid, winners[0].digest, size), dtype)
        # Else one buffer, and the masks added into it from their files in slices: a
        # mapped mask counts in the RSS as it is read, as much as a buffer would.
        mask = np.zeros(s.vector_words, dtype)
        for vote in winners:
            await asyncio.to_thread(s.checkpoints.add_mask_into, rid, vote.digest, mask)
        for u in dropped:
            words = kept.pop(u.digest, None)
            if words is not None:
                np.add(mask, words, out=mask)
            elif u.log_offset >= 0:
                if u.log_length != mask.nbytes:
                    raise StorageError(
                        f"update from {u.device_id}: {u.log_length} bytes in the update log, "
                        f"not {mask.nbytes}"
                    )
                await asyncio.to_thread(s.update_log.add_into, rid, u.log_offset, mask)
            else:
                raise RoundFailedError(
                    f"update from {u.device_id} must be dropped (its seed did not open) but its "
                    "words were held in memory before a restart (storage.update_words = "
                    '"memory"); the round cannot be unmasked',
                    round_id=rid,
                )
            del words
        return mask

    def _release_words(self) -> None:
        """Forget the updates' words kept in memory (their messages' bytes go with them,
        and the message memory has that much more room)."""
        state = self.state
        assert state is not None
        state.words = {}
        state.words_bytes = 0

    def _floor(self, included: int, dropped: int) -> int:
        """``included`` if it reaches the privacy floor, else the round fails."""
        floor = max(MIN_UPDATES_FLOOR, self.s.config.privacy.min_updates)
        if included < floor:
            # The privacy floor, checked where it matters: whatever the phases let
            # through or the summers claim they could not open, an aggregate of fewer
            # updates is never unmasked, and this round publishes nothing.
            raise RoundFailedError(
                f"only {included} of the round's updates can be unmasked ({dropped} "
                f"dropped), below the privacy floor privacy.min_updates = {floor}: "
                "the aggregate stays masked and no model is published",
                round_id=None if self.state is None else self.state.round_id,
            )
        return included

    def _unmask(self, mask: WordsLike, included: int) -> tuple[float, FleetEvaluation | None]:
        """Subtract the mask from the aggregate: the unmasked sum of weights and the
        fleet evaluation."""
        s, state = self.s, self.state
        assert state is not None and state.acc is not None
        state.acc.subtract_mask(mask)
        weight_sum = decode_weight_sum(state.acc.plain(), included, s.mask)
        if not weight_sum > 0:
            raise RoundFailedError(f"sum of weights is {weight_sum}", round_id=state.round_id)
        return weight_sum, self._evaluation(included)

    def _step(self, outcome: _Outcome) -> GlobalModelBuffer:
        """The next GLOBAL_MODEL, unsigned: the mean delta decoded and the model stepped
        slice by slice straight into the message's buffer (scratch memory of a slice,
        not ~8 float64 copies of the model: 2.5e7 parameters took 5.6 s whole, see
        step_chunked; and no second 4·M-byte weights array to copy into the message).
        The aggregate is spent."""
        s, state = self.s, self.state
        assert state is not None and state.acc is not None
        previous = s.model.weights
        model = GlobalModelBuffer(
            GlobalModel(
                model_id=s.model.model_id,
                version=outcome.version,
                round_id=RoundId(state.round_id),
                previous_digest=s.model.digest,
                weights=_NO_WEIGHTS,
                metrics=outcome.metrics,
                graph_digest=s.graph_digest,
            ),
            previous.size,
        )
        plain = state.acc.plain()[: previous.size]
        n, weight_sum = outcome.included, outcome.weight_sum

        def mean_delta(part: slice) -> F64:
            values = decode_values(plain[part], n, s.mask)
            return np.divide(values, weight_sum, out=values)

        s.optimizer.step_chunked(previous, mean_delta, out=model.weights)
        # The aggregate is spent: its 4·M bytes go (when this returns, with ``plain``)
        # before the model is signed (from here a failure fails the round, which never
        # reads it again; a restart reads the checkpoint).
        state.acc = None
        return model

    def _metrics(
        self,
        included: int,
        dropped: int,
        winners: list[DigestVote],
        weight_sum: float,
        fleet: FleetEvaluation | None,
    ) -> tuple[tuple[str, float], ...]:
        """The GLOBAL_MODEL's metrics (protocol.md §8.2): counts, the error bound, the
        fleet evaluation and the privacy spent, when there are."""
        s, state = self.s, self.state
        assert state is not None
        metrics: tuple[tuple[str, float], ...] = (
            ("updates", float(included)),
            ("dropped", float(dropped)),
            ("summers", float(len(state.summers))),
            ("sum2", float(len(state.sum2))),
            ("mask_votes", float(sum(vote.votes for vote in winners))),
            ("weight_sum", float(weight_sum)),
            ("error_bound", float(error_bound(included, weight_sum, s.mask))),
            ("resolution", float(s.mask.resolution)),
        )
        if len(winners) > 1:
            metrics += (("groups", float(len(winners))),)
        if fleet is not None:
            # How good the model the updaters started from (this round's input,
            # version v) is on their held-out data: fleet totals only.
            metrics += (
                ("evaluated_version", float(s.model.version)),
                ("examples", float(fleet.examples)),
                ("accuracy", fleet.accuracy),
                ("loss", fleet.loss),
            )
            s.metrics.set_evaluation(s.model.version, fleet.accuracy, fleet.loss, fleet.examples)
        if s.dp is not None and s.accountant is not None:
            # The privacy this model cost, this round and all rounds so far (the signed
            # model carries both, and the running total the accountant resumes from).
            ledger, dp = s.accountant, s.dp
            metrics += (
                ("epsilon", ledger.epsilon(ledger.rho + dp.rho, ledger.rounds + 1)),
                ("epsilon_round", ledger.epsilon(dp.rho, 1)),
                ("delta", dp.delta),
                ("noise_multiplier", dp.noise_multiplier),
                ("clip_norm", dp.clip_norm),
                ("dp_rho_total", ledger.rho + dp.rho),
                ("dp_rho_round", dp.rho),
                ("dp_rounds", float(ledger.rounds + 1)),
            )
        return metrics

    async def _store_and_publish(
        self, model: GlobalModelBuffer, outcome: _Outcome, steps: _Steps
    ) -> None:
        """The next GLOBAL_MODEL: signed and stored with the round's outcome
        (:meth:`_store`), then published retained (nothing announces it before the
        commit), and logged."""
        s, state = self.s, self.state
        assert state is not None
        rid, version = state.round_id, outcome.version
        started, computed = steps.started.wall, steps.mark("metrics")
        raw, digest, signed = await self._store(model, outcome, steps)
        stored = steps.mark("commit")
        s.model = ModelState(s.model.model_id, version, model.weights, digest)
        del model
        s.metrics.model_version.set(version)
        s.metrics.unmask_seconds.observe(stored - started)
        await s.outbox.state(s.topics.model_latest(s.model.model_id), raw)
        published = steps.mark("publish")
        total = steps.total()
        log.info(
            "round %d completed: model v%d from %d updates (%d dropped), weight sum %.3f; "
            "unmask %.3f s (vote, decode, step %.3f, sign and files %.3f, commit %.3f), "
            "publish %.3f s, %.3f CPU-s in all",
            rid,
            version,
            outcome.included,
            outcome.dropped,
            outcome.weight_sum,
            stored - started,
            computed - started,
            signed - computed,
            stored - signed,
            published - stored,
            total.user + total.system,
            extra={"round_id": rid, "phase": "unmask", "model_version": version},
        )
        log.info(
            "round %d unmask steps (wall s, user+system CPU-s, minor/major page faults): %s",
            rid,
            steps.describe(),
            extra={"round_id": rid, "phase": "unmask"},
        )

    async def _store(
        self, model: GlobalModelBuffer, outcome: _Outcome, steps: _Steps
    ) -> tuple[bytearray, bytes, float]:
        """Sign the model and write its registry file, then commit it with the round's
        outcome (one transaction): the signed message, the weights' digest, and when the
        file was done (perf_counter)."""
        s, state = self.s, self.state
        assert state is not None
        rid = state.round_id

        # The two SHA-256 passes (the message body's, in the signature, and the weights'
        # for the registry: digests of different bytes) run in two threads (hashlib
        # releases the GIL), then the registry's one 4·M-byte file, the signed model (it
        # holds the weights), is written and fsynced off the event loop. add_model below
        # finds the file there; a crash before the commit leaves a file no row names,
        # deleted at the next start, and nothing announces the model before the commit.
        raw, digest = await asyncio.gather(
            asyncio.to_thread(s.sign_model, model, rid),
            asyncio.to_thread(weights_digest, model.weights),
        )
        steps.mark("sign")
        await asyncio.to_thread(s.store.files.put_message, raw)
        signed = steps.mark("file")
        await self._commit(raw, digest, model.weights, outcome)
        return raw, digest, signed

    async def _commit(self, raw: bytearray, digest: bytes, weights: F32, outcome: _Outcome) -> None:
        """The model and the round's outcome in one transaction; the privacy spent and
        the round's masks forgotten only after it."""
        s, state = self.s, self.state
        assert state is not None
        rid, version = state.round_id, outcome.version
        now = s.clock()
        done = move(Phase.UNMASK, Event.DONE)  # the model and the outcome in one commit
        assert done.outcome is not None
        record = dataclasses.replace(
            state.record,
            phase=done.target,
            outcome=done.outcome,
            finished_at=now,
            model_version=version,
        )
        async with s.store.transaction() as tx:
            await tx.add_model(
                ModelRecord(
                    model_id=s.model.model_id,
                    version=version,
                    round_id=rid,
                    digest=digest,
                    weights=weights.data.cast("B"),  # held by the message: not written
                    metrics=dict(outcome.metrics),
                    message=raw,
                    optimizer_state=s.optimizer.state_bytes(),
                    created_at=now,
                )
            )
            await tx.put_round(record)
            await tx.forget_round_bulk(rid)
        if s.dp is not None and s.accountant is not None:
            s.accountant.spend(s.dp.rho)  # after the commit: the store is the record
        s.checkpoints.prune_masks()  # the round's sum2 masks, now that it is over
        state.record = record

    def _vote(self) -> tuple[list[DigestVote], set[bytes]]:
        """One agreed aggregate mask per mask group (plurality of its summers' sum2 digests),
        and the updates whose seeds did not open, on which every group must agree.

        A group's mask leaves out exactly the updates its summers could not open; an
        update left out of one group's mask but in another's cannot be removed from
        the aggregate (nobody can expand the missing sub-mask), so the round fails.
        """
        state = self.state
        assert state is not None
        rid, params = state.round_id, state.params
        by_group: dict[int, list[Sum2Record]] = {j: [] for j in range(params.groups)}
        for record in state.sum2.values():
            by_group[params.group_of(state.summers[record.device_id].public_key)].append(record)
        winners: list[DigestVote] = []
        failed_sets: set[tuple[bytes, ...]] = set()
        label = "" if params.groups == 1 else " of mask group {j}"
        for j, masks in by_group.items():
            if not masks:
                raise RoundFailedError(
                    f"no summer of mask group {j} of {params.groups} sent its aggregate mask: "
                    "that group's seeds cannot be removed and the aggregate stays masked",
                    round_id=rid,
                )
            try:
                vote = plurality_of_digests(m.mask_digest for m in masks)
            except MaskVoteTieError as exc:
                raise RoundFailedError(
                    f"aggregate masks{label.format(j=j)} tie: {exc}", round_id=rid
                ) from exc
            agreed = {masks[i].failed for i in vote.voters}
            if len(agreed) != 1:
                raise RoundFailedError(
                    f"summers{label.format(j=j)} with the same mask disagree on the updates "
                    "they could not open",
                    round_id=rid,
                )
            failed_sets |= agreed
            winners.append(vote)
            if params.groups > 1:
                log.info(
                    "round %d: mask group %d: %d of %d summers agree",
                    rid,
                    j,
                    vote.votes,
                    vote.total,
                    extra={"round_id": rid, "phase": "unmask"},
                )
        if len(failed_sets) != 1:
            raise RoundFailedError(
                "mask groups disagree on the updates whose seeds did not open (an updater "
                "sealed a bad seed to one group only): no mask can leave that update out "
                "of every group, so the aggregate stays masked",
                round_id=rid,
            )
        return winners, set(next(iter(failed_sets)))

    def _evaluation(self, included: int) -> FleetEvaluation | None:
        """The fleet totals of the evaluation words (None when no updater evaluated, or
        when the totals are impossible: the model is published without them)."""
        s, state = self.s, self.state
        assert state is not None and state.acc is not None
        try:
            fleet = decode_evaluation(state.acc.plain(), included, s.mask)
        except AggregationError as exc:
            log.warning("round %d: fleet evaluation not published: %s", state.round_id, exc)
            return None
        return fleet if fleet.examples else None
