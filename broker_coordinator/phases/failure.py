"""failure: abandon the round, record why, pause, then start the next one.

The previous global model stays published. The round's retained sum and seed
dictionaries are cleared so that devices do not act on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from maskfl.broker_coordinator.context import RoundState, Services
from maskfl.broker_coordinator.phases.base import StepPhase
from maskfl.broker_coordinator.store import RoundOutcome
from maskfl.protocol.phases import Phase

log = logging.getLogger("maskfl.coordinator.failure")


class FailurePhase(StepPhase):
    phase = Phase.FAILURE

    def __init__(self, services: Services, state: RoundState | None, reason: str) -> None:
        super().__init__(services, state)
        self.reason = reason

    async def run(self) -> Phase:
        s, state = self.s, self.state
        if state is not None:
            record = dataclasses.replace(
                state.record,
                phase=Phase.FAILURE,
                outcome=RoundOutcome.FAILED,
                detail=self.reason[:500],
                finished_at=s.clock(),
            )
            async with s.store.transaction() as tx:
                await tx.put_round(record)
                await tx.forget_round_bulk(state.round_id)
            state.record = record
            log.warning(
                "round %d failed: %s",
                state.round_id,
                self.reason,
                extra={"round_id": state.round_id, "phase": "failure"},
            )
        else:
            log.warning("round failed before it started: %s", self.reason)
        await asyncio.sleep(s.config.pet.failure_pause_s)
        return Phase.IDLE
