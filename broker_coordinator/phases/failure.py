"""failure: the pause after a failed round, then the next one.

The runner entered this phase: it recorded the round's outcome ``failed`` (once,
with the reason) and cleared the round's retained dictionaries (the previous
global model stays published). This phase only waits ``pet.failure_pause_s`` on
the coordinator's clock and ends with ``done`` (the table moves it to idle).
"""

from __future__ import annotations

from maskfl.broker_coordinator.phases.base import StepPhase, Transition
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import Event


class FailurePhase(StepPhase):
    phase = Phase.FAILURE

    async def run(self) -> Transition:
        await self.s.clock.sleep(self.s.config.pet.failure_pause_s)
        return Transition(Event.DONE)
