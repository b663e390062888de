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
import time
from dataclasses import dataclass

import numpy as np

from maskfl.aggregator_gpu import (
    DigestVote,
    MaskVoteTieError,
    Words,
    WordsLike,
    plurality_of_digests,
)
from maskfl.broker_coordinator.config import MIN_UPDATES_FLOOR
from maskfl.broker_coordinator.context import ModelState
from maskfl.broker_coordinator.errors import RoundFailedError
from maskfl.broker_coordinator.optimizers import F32
from maskfl.broker_coordinator.phases.base import StepPhase, Transition
from maskfl.broker_coordinator.store import ModelRecord, Sum2Record, UpdateRecord
from maskfl.protocol.errors import AggregationError
from maskfl.protocol.ids import RoundId
from maskfl.protocol.masking import (
    FleetEvaluation,
    decode_evaluation,
    decode_values,
    decode_weight_sum,
    error_bound,
)
from maskfl.protocol.messages import GlobalModel, weights_digest
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import Event, move

log = logging.getLogger("maskfl.coordinator.unmask")


@dataclass(frozen=True, slots=True)
class _Started:
    wall: float
    cpu: float


@dataclass(slots=True)
class _Model:
    """The stepped model and what the round's log line says of it. :meth:`_store` takes
    the weights out (the signed message then holds the only copy)."""

    weights: F32
    metrics: tuple[tuple[str, float], ...]
    included: int
    dropped: int
    weight_sum: float


class UnmaskPhase(StepPhase):
    phase = Phase.UNMASK

    async def run(self) -> Transition:
        """Vote on the masks, unmask, step the model, store it with the round's
        outcome, publish it: ``done``. A round that cannot be unmasked raises
        :class:`RoundFailedError` (the runner fails it)."""
        state = self.state
        assert state is not None and state.acc is not None
        started = _Started(time.perf_counter(), time.process_time())
        winners, failed = self._vote()
        dropped = [u for u in state.updates.values() if u.digest in failed]
        mask = await self._mask(winners, dropped)
        included = self._floor(state.acc.count - len(dropped), len(dropped))
        weights, weight_sum, fleet = self._step(mask, included)
        del mask
        metrics = self._metrics(included, len(dropped), winners, weight_sum, fleet)
        result = _Model(weights, metrics, included, len(dropped), weight_sum)
        del weights
        await self._store_and_publish(result, started)
        return Transition(Event.DONE)

    async def _mask(self, winners: list[DigestVote], dropped: list[UpdateRecord]) -> WordsLike:
        """The words to subtract from the aggregate: the winning mask of each group,
        plus the masked words of the updates whose seeds did not open (the aggregate
        holds them, the masks do not)."""
        s, state = self.s, self.state
        assert state is not None
        rid = state.round_id
        # Masks are read into this buffer, ours: a 4·M-byte result returned from a worker
        # thread stays referenced by the executor until its next job (at M = 1e8 that
        # kept a 400 MB mask alive through the step).
        mask = np.empty(s.vector_words, dtype=s.mask.dtype)
        await asyncio.to_thread(s.checkpoints.read_mask, rid, winners[0].digest, mask.data)
        if not dropped and len(winners) == 1:
            return mask
        combined = s.backend.accumulator(s.vector_words, s.mask.word_bits)
        combined.add(mask)
        for vote in winners[1:]:
            await asyncio.to_thread(s.checkpoints.read_mask, rid, vote.digest, mask.data)
            combined.add(mask)
        for u in dropped:
            words = state.words.get(u.digest)
            if words is not None:
                combined.add(words)
            elif u.log_offset >= 0:
                combined.add(s.update_log.read(rid, u.log_offset, u.log_length))
            else:
                raise RoundFailedError(
                    f"update from {u.device_id} must be dropped (its seed did not open) but its "
                    "words were held in memory before a restart (storage.update_words = "
                    '"memory"); the round cannot be unmasked',
                    round_id=rid,
                )
        return combined.total()

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

    def _step(self, mask: WordsLike, included: int) -> tuple[F32, float, FleetEvaluation | None]:
        """Unmask the aggregate, decode the mean delta, step the model: the new weights,
        the unmasked sum of weights and the fleet evaluation. The aggregate is spent."""
        s, state = self.s, self.state
        assert state is not None and state.acc is not None
        acc = state.acc
        acc.subtract_mask(mask)
        plain = acc.plain()
        weight_sum = decode_weight_sum(plain, included, s.mask)
        if not weight_sum > 0:
            raise RoundFailedError(f"sum of weights is {weight_sum}", round_id=state.round_id)
        fleet = self._evaluation(included)
        weights = self._next_weights(plain, included, weight_sum)
        # The aggregate is spent: its 4·M bytes go before the model is encoded (from here
        # a failure fails the round, which never reads it again; a restart reads the
        # checkpoint).
        del plain, acc
        state.acc = None
        return weights, weight_sum, fleet

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

    async def _store_and_publish(self, result: _Model, started: _Started) -> None:
        """The next GLOBAL_MODEL: stored with the round's outcome (:meth:`_store`), then
        published retained (nothing announces it before the commit), and logged."""
        s, state = self.s, self.state
        assert state is not None
        rid = state.round_id
        version = s.model.version + 1
        computed = time.perf_counter()
        raw, digest, weights, signed = await self._store(result, version)
        stored = time.perf_counter()
        s.model = ModelState(s.model.model_id, version, weights, digest)
        s.metrics.model_version.set(version)
        s.metrics.unmask_seconds.observe(stored - started.wall)
        await s.outbox.state(s.topics.model_latest(s.model.model_id), raw)
        published = time.perf_counter()
        log.info(
            "round %d completed: model v%d from %d updates (%d dropped), weight sum %.3f; "
            "unmask %.3f s (vote, decode, step %.3f, sign and files %.3f, commit %.3f), "
            "publish %.3f s, %.3f CPU-s in all",
            rid,
            version,
            result.included,
            result.dropped,
            result.weight_sum,
            stored - started.wall,
            computed - started.wall,
            signed - computed,
            stored - signed,
            published - stored,
            time.process_time() - started.cpu,
            extra={"round_id": rid, "phase": "unmask", "model_version": version},
        )

    async def _store(self, result: _Model, version: int) -> tuple[bytes, bytes, F32, float]:
        """Sign the model and write its registry file, then commit it with the round's
        outcome (one transaction): the signed bytes, the weights' digest, the weights as
        a view of the signed bytes, and when the file was done (perf_counter)."""
        s, state = self.s, self.state
        assert state is not None
        rid, metrics, size = state.round_id, result.metrics, result.weights.size
        body = GlobalModel(
            model_id=s.model.model_id,
            version=version,
            round_id=RoundId(rid),
            previous_digest=s.model.digest,
            weights=result.weights,
            metrics=metrics,
            graph_digest=s.graph_digest,
        )
        result.weights = np.empty(0, np.float32)  # the body holds them, nothing else

        def sign_and_file(body: GlobalModel) -> bytes:
            raw = s.sign(body, rid)
            s.store.files.put_message(raw)
            return raw

        # The registry's one 4·M-byte file, the signed model (it holds the weights), is
        # written and fsynced off the event loop right after its SHA-256 pass, while a
        # second thread hashes the weights for the registry's digest (hashlib and I/O
        # release the GIL). add_model below finds the file there; a crash before the
        # commit leaves a file no row names, deleted at the next start, and nothing
        # announces the model before the commit.
        raw, digest = await asyncio.gather(
            asyncio.to_thread(sign_and_file, body), asyncio.to_thread(weights_digest, body.weights)
        )
        # The signed message ends with the weights (wire-format.md): keep the model as a
        # view of it, not as a second 4·M-byte array beside it.
        del body
        weights = np.frombuffer(raw, "<f4", size, len(raw) - 4 * size)
        signed = time.perf_counter()
        await self._commit(raw, digest, weights, version, metrics)
        return raw, digest, weights, signed

    async def _commit(
        self,
        raw: bytes,
        digest: bytes,
        weights: F32,
        version: int,
        metrics: tuple[tuple[str, float], ...],
    ) -> None:
        """The model and the round's outcome in one transaction; the privacy spent and
        the round's masks forgotten only after it."""
        s, state = self.s, self.state
        assert state is not None
        rid = state.round_id
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
                    metrics=dict(metrics),
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

    def _next_weights(self, plain: Words, included: int, weight_sum: float) -> F32:
        """Slice by slice: decode, divide, step (scratch memory of a slice, not ~8 float64
        copies of the model; 2.5e7 parameters took 5.6 s whole, see step_chunked)."""
        s = self.s
        model = plain[: s.model.weights.size]
        return s.optimizer.step_chunked(
            s.model.weights,
            lambda part: np.divide(decode_values(model[part], included, s.mask), weight_sum),
        )

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
