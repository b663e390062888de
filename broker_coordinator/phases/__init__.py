"""One class per phase of the round (one module each); the runner drives them.

=========  ==========================  ==========================================
phase      admits                      ends with (the table: protocol/round.py)
=========  ==========================  ==========================================
idle       nothing                     ``started`` and the new round, or ``stopped``
sum        SUM from summers            ``closed`` (the sum dictionary prepared)
update     UPDATE from updaters        ``closed``
sum2       SUM2 from summers           ``closed``
unmask     nothing                     ``done`` (model stored and published)
failure    nothing                     ``done`` (after the pause)
=========  ==========================  ==========================================

Any phase may end ``failed``; the runner then enters failure. What each move
publishes (round parameters, the sum dictionary, the seed dictionaries) is
published by the runner only once the database is in the new phase, and again
when a restart resumes it (:mod:`..retained`).
"""

from __future__ import annotations

from typing import Final

from maskfl.broker_coordinator.phases.base import MessagePhase, StepPhase
from maskfl.broker_coordinator.phases.failure import FailurePhase
from maskfl.broker_coordinator.phases.idle import IdlePhase
from maskfl.broker_coordinator.phases.sum import SumPhase
from maskfl.broker_coordinator.phases.sum2 import Sum2Phase
from maskfl.broker_coordinator.phases.unmask import UnmaskPhase
from maskfl.broker_coordinator.phases.update import UpdatePhase
from maskfl.protocol.phases import Phase

PHASE_CLASSES: Final[dict[Phase, type[MessagePhase] | type[StepPhase]]] = {
    Phase.IDLE: IdlePhase,
    Phase.SUM: SumPhase,
    Phase.UPDATE: UpdatePhase,
    Phase.SUM2: Sum2Phase,
    Phase.UNMASK: UnmaskPhase,
    Phase.FAILURE: FailurePhase,
}

__all__ = [
    "PHASE_CLASSES",
    "FailurePhase",
    "IdlePhase",
    "MessagePhase",
    "StepPhase",
    "Sum2Phase",
    "SumPhase",
    "UnmaskPhase",
    "UpdatePhase",
]
