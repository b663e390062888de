"""idle: start a round. Derive the seed, pick probabilities, persist; the runner publishes.

Accepts no messages. The round row is written (phase ``sum``) *before* the
parameters are published, so a restart republishes exactly the same signed
bytes instead of inventing a second round with the same id.
"""

from __future__ import annotations

import asyncio
import logging

from maskfl.broker_coordinator.phases.base import StepPhase
from maskfl.broker_coordinator.store import RoundRecord
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import RoundParams
from maskfl.protocol.phases import Phase
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

    async def run(self) -> Phase:
        s = self.s
        pet = s.config.pet
        last = await s.store.last_round()
        if last is not None and pet.round_pause_s > 0:
            await asyncio.sleep(pet.round_pause_s)
        round_id = 1 if last is None else last.round_id + 1
        if pet.max_rounds and round_id > pet.max_rounds:
            log.info("max_rounds = %d reached; shutting down", pet.max_rounds)
            return Phase.SHUTDOWN
        dp, acc = s.dp, s.accountant
        if (
            dp is not None
            and acc is not None
            and dp.budget is not None
            and acc.would_exceed(dp.rho, dp.budget)
        ):
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
            return Phase.SHUTDOWN
        if last is not None:
            previous_seed = last.seed
        elif pet.initial_seed:
            previous_seed = bytes.fromhex(pet.initial_seed)
        else:
            previous_seed = bytes(32)
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
        raw = s.sign(params, round_id)
        now = s.clock()
        record = RoundRecord(
            round_id=round_id,
            phase=Phase.SUM,
            seed=seed,
            previous_seed=previous_seed,
            p_sum=p_sum,
            p_update=p_update,
            params=raw,
            started_at=now,
            phase_opened_at=now,
        )
        async with s.store.transaction() as tx:
            await tx.put_round(record)
        await asyncio.to_thread(s.checkpoints.prune)
        await asyncio.to_thread(s.update_log.prune)
        # The runner publishes the parameters once the sum phase admits messages
        # (Runner._transition): published here, the first sums could arrive while no
        # round is current yet and be turned away as wrong_round.
        log.info(
            "round %d started: p_sum=%.4f p_update=%.4f groups=%d alive=%d model v%d",
            round_id,
            p_sum,
            p_update,
            params.groups,
            s.alive_count(),
            s.model.version,
            extra={"round_id": round_id, "phase": "sum"},
        )
        return Phase.SUM
