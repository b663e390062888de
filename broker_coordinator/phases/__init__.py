"""One class per phase of the round (one module each); the runner drives them.

=========  ==========================  ==================================  =========
phase      accepts                     publishes (after its row commits)   next
=========  ==========================  ==================================  =========
idle       nothing                     nothing (writes the round row)      sum
sum        SUM from summers            round parameters (retained)         update
update     UPDATE from updaters        sum dictionary (retained)           sum2
sum2       SUM2 from summers           one seed dictionary per summer      unmask
unmask     nothing                     the global model (retained)         idle
failure    nothing                     (clears the round's dictionaries)   idle
=========  ==========================  ==================================  =========

Every phase publishes what its participants need only once the database is
in that phase (the sum dictionary is committed with the move to update, the
seed dictionaries are the committed seeds rows), and publishes it again when
a restart resumes it.
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
