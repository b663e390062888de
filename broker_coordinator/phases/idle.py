"""idle: pause, then plan the next round (or stop) and hand it to the runner.

Accepts no messages. Idle decides and signs: the round's seed (chained from the
last one), the sortition probabilities, the signed parameters and the round row;
it returns them as the new :class:`OpenRound` with the ``started`` event, and the
runner commits the row with the move to ``sum`` *before* the parameters are
published, so a restart republishes exactly the same signed bytes instead of
inventing a second round with the same id. ``stopped`` when ``max_rounds`` is
reached or the privacy budget is spent. The pause between rounds
(``pet.round_pause_s``) runs on the coordinator's clock.
"""

from __future__ import annotations

import asyncio
import logging

from maskfl.broker_coordinator.context import OpenRound
from maskfl.broker_coordinator.phases.base import StepPhase, Transition
from maskfl.broker_coordinator.store import RoundRecord
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import RoundParams
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import Event, move
from maskfl.protocol.sortition import next_round_seed, probabilities_for_targets

log = logging.getLogger("maskfl.coordinator.idle")


class IdlePhase(StepPhase):
    phase = Phase.IDLE

    def probabilities(self) -> tuple[float, float]:
        pet = self.s.config.pet
        alive = self.s.alive_count()
        p_sum, p_update = probabilities_for_targets(
            alive, pet.sum.target, pet.update.target, pet.update.count_min
        )
        if pet.sum.prob is not None:
            p_sum = pet.sum.prob
        if pet.update.prob is not None:
            p_update = pet.update.prob
        return p_sum, p_update

    async def run(self) -> Transition:
        s = self.s
        last = await s.store.last_round()
        if last is not None:
            await s.clock.sleep(s.config.pet.round_pause_s)
        round_id = 1 if last is None else last.round_id + 1
        stop = self.stop_reason(round_id)
        if stop is not None:
            return Transition(Event.STOPPED, stop)
        if last is not None:
            previous_seed = last.seed
        elif s.config.pet.initial_seed:
            previous_seed = bytes.fromhex(s.config.pet.initial_seed)
        else:
            previous_seed = bytes(32)
        state = self.plan(round_id, previous_seed)
        await asyncio.to_thread(s.checkpoints.prune)
        await asyncio.to_thread(s.update_log.prune)
        params = state.params
        log.info(
            "round %d started: p_sum=%.4f p_update=%.4f groups=%d alive=%d model v%d",
            round_id,
            params.p_sum,
            params.p_update,
            params.groups,
            s.alive_count(),
            s.model.version,
            extra={"round_id": round_id, "phase": str(move(Phase.IDLE, Event.STARTED).target)},
        )
        return Transition(Event.STARTED, round=state)

    def stop_reason(self, round_id: int) -> str | None:
        """Why no round ``round_id`` starts (logged), or None."""
        s, pet = self.s, self.s.config.pet
        if pet.max_rounds and round_id > pet.max_rounds:
            log.info("max_rounds = %d reached; shutting down", pet.max_rounds)
            return f"max_rounds = {pet.max_rounds} reached"
        dp, acc = s.dp, s.accountant
        if (
            dp is None
            or acc is None
            or dp.budget is None
            or not acc.would_exceed(dp.rho, dp.budget)
        ):
            return None
        log.warning(
            "privacy budget spent: epsilon %.4g of privacy.budget %g at delta %g after "
            "%d rounds, and one more round would cost %.4g more; training stops "
            "(raise privacy.budget or start a new model.id to go on)",
            acc.epsilon(),
            dp.budget,
            dp.delta,
            acc.rounds,
            acc.epsilon(acc.rho + dp.rho, acc.rounds + 1) - acc.epsilon(),
        )
        return "privacy budget spent"

    def plan(self, round_id: int, previous_seed: bytes) -> OpenRound:
        """Round ``round_id``: its signed parameters and its row, not yet written (the
        runner writes it in the phase the table's ``started`` move enters), and an
        empty aggregate."""
        s, pet = self.s, self.s.config.pet
        seed = next_round_seed(previous_seed, s.model.digest, round_id)
        p_sum, p_update = self.probabilities()
        params = RoundParams(
            round_id=RoundId(round_id),
            seed=seed,
            previous_seed=previous_seed,
            p_sum=p_sum,
            p_update=p_update,
            sum_time_max_s=pet.sum.time_max_s,
            update_time_max_s=pet.update.time_max_s,
            sum2_time_max_s=pet.sum2.time_max_s,
            model_id=s.model.model_id,
            model_version=s.model.version,
            model_digest=s.model.digest,
            mask=s.mask,
            vector_length=s.config.model.length,
            chunk_size=pet.chunk_size,
            certificate=s.certificate,
            groups=s.config.mask_groups,
            clip_norm=0.0 if s.dp is None else s.dp.clip_norm,
            noise_variance=0 if s.dp is None else s.dp.variance,
        )
        now = s.clock()
        record = RoundRecord(
            round_id=round_id,
            phase=Phase.IDLE,  # the runner's commit sets the move's target
            seed=seed,
            previous_seed=previous_seed,
            p_sum=p_sum,
            p_update=p_update,
            params=s.sign(params, round_id),
            started_at=now,
            phase_opened_at=now,
        )
        acc = s.backend.accumulator(s.vector_words, s.mask.word_bits)
        return OpenRound(record=record, params=params, acc=acc)
