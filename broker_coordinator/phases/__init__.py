"""One class per phase of the round (one module each); the runner drives them.

=========  ==========================  ==================================  =========
phase      accepts                     publishes                           next
=========  ==========================  ==================================  =========
idle       nothing                     round parameters (retained)         sum
sum        SUM from summers            sum dictionary (retained)           update
update     UPDATE from updaters        one seed dictionary per summer      sum2
sum2       SUM2 from summers           nothing                             unmask
unmask     nothing                     the global model (retained)         idle
failure    nothing                     (clears the round's dictionaries)   idle
=========  ==========================  ==================================  =========
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
