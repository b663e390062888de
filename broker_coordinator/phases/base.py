"""The two shapes of a phase and the :class:`Transition` every phase's run returns.

A :class:`StepPhase` (idle, unmask, failure) does its work in ``run`` and returns
the event it ended with. A :class:`MessagePhase` (sum, update, sum2) decides
from its :class:`~maskfl.protocol.phases.Window` whether it ends (:meth:`run`,
pure), makes admitted batches durable (the committer's protocol) and prepares
its outputs when it closes. Admission is :func:`maskfl.broker_coordinator.admission.admit`.
No phase names a next phase: the runner looks the event up in the round table
(:mod:`maskfl.protocol.round`), commits the move and performs what it produces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from maskfl.broker_coordinator.context import Contribution, OpenRound, Services
from maskfl.broker_coordinator.errors import shortfall_reason
from maskfl.broker_coordinator.store import Transaction
from maskfl.protocol.phases import Phase, PhaseWindow, Verdict, Window
from maskfl.protocol.round import Event


@dataclass(frozen=True, slots=True)
class Transition:
    """How a phase ended: the table's event, why (for ``failed``) and, from idle's
    ``started``, the new round (its row is committed by the runner with the move)."""

    event: Event
    reason: str = ""
    round: OpenRound | None = None


class StepPhase(ABC):
    phase: ClassVar[Phase]

    def __init__(self, services: Services, state: OpenRound | None) -> None:
        self.s = services
        self.state = state

    @abstractmethod
    async def run(self) -> Transition:
        """Do the phase's work (its I/O included); return the event it ended with."""


class MessagePhase(ABC):
    phase: ClassVar[Phase]

    def __init__(self, services: Services, state: OpenRound) -> None:
        self.s = services
        self.state = state

    @abstractmethod
    def limits(self) -> PhaseWindow:
        """When this phase may close (from the config, maybe narrowed by the round)."""

    @abstractmethod
    def count(self) -> int:
        """This phase's messages committed so far (in the store and in memory)."""

    def open(self, opened_at: float, count: int) -> Window:
        """The phase's window, opened at ``opened_at`` with ``count`` messages already
        committed (a resumed phase)."""
        window = Window(self.limits(), opened_at)
        window.accepted(min(count, window.limits.count_max))
        return window

    def run(self, state: OpenRound, now: float) -> Transition | None:
        """Pure: ``closed`` or ``failed`` (with the reason in words) when the window
        says so at ``now``, None while it stays open."""
        window = state.window
        assert window is not None
        verdict = window.decide(now, ready=self.ready(), complete=self.complete())
        if verdict is Verdict.OPEN:
            return None
        if verdict is Verdict.CLOSE:
            return Transition(Event.CLOSED)
        limits = window.limits
        reason = shortfall_reason(self.phase, window.count, limits.count_min, limits.time_max_s)
        return Transition(Event.FAILED, reason)

    def wake_at(self, state: OpenRound) -> float:
        """When :meth:`run` may change its answer if no message arrives."""
        assert state.window is not None
        return state.window.wake_at(ready=self.ready())

    async def prepare(self, batch: list[Contribution]) -> None:
        """Durable work outside SQLite, before the batch's transaction."""
        return None

    @abstractmethod
    async def write(self, tx: Transaction, batch: list[Contribution]) -> None:
        """The batch's rows, inside the group-commit transaction."""

    @abstractmethod
    def committed(self, batch: list[Contribution]) -> None:
        """Bookkeeping once the batch is durable."""

    def failed(self, batch: list[Contribution]) -> None:
        """The batch could not be made durable: forget it."""
        for item in batch:
            self.state.pending.discard(item.incoming.device)

    def complete(self) -> bool:
        """True when nothing more can usefully arrive (e.g. every summer answered)."""
        return False

    def ready(self) -> bool:
        """False while the phase must not close at ``time_min`` although ``count_min``
        messages are in (sum: a mask group has no summer yet; sum2: a group has not
        answered yet); it then waits for more until ``time_max``."""
        return True

    async def close(self) -> None:
        """Prepare the phase's outputs in ``state.record`` (sum: the sum dictionary).

        Publishes nothing: the runner commits the outputs together with the move
        to the next phase and then publishes what the table says the move
        produces. So a kill at any instant never leaves an output on the broker
        whose phase the database does not have."""
        return None
