"""The two shapes of a phase: one that runs to completion, one that collects messages.

A :class:`StepPhase` (idle, unmask, failure) does its work in :meth:`run` and
names the next phase. A :class:`MessagePhase` (sum, update, sum2) says which
message type it accepts, its :class:`~maskfl.protocol.phases.PhaseWindow`, how
to admit a message (every check; raise ``RemoteProtocolError`` to reject), how
to make a batch durable (the committer's protocol) and what to publish when it
closes. The runner owns the loop, the clock and the transitions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from maskfl.broker_coordinator.context import Contribution, Incoming, RoundState, Services
from maskfl.broker_coordinator.store import Transaction
from maskfl.protocol.phases import Phase, PhaseWindow


class StepPhase(ABC):
    phase: ClassVar[Phase]

    def __init__(self, services: Services, state: RoundState | None) -> None:
        self.s = services
        self.state = state

    @abstractmethod
    async def run(self) -> Phase:
        """Do the phase's work; return the next phase."""


class MessagePhase(ABC):
    phase: ClassVar[Phase]

    def __init__(self, services: Services, state: RoundState) -> None:
        self.s = services
        self.state = state

    @abstractmethod
    def window(self) -> PhaseWindow:
        """When this phase may close (from the config, maybe narrowed by the round)."""

    async def enter(self, resumed: bool) -> None:
        """Publish what participants need for this phase: called once the move to
        this phase is committed, and again after a restart that resumes it."""
        return None

    @abstractmethod
    async def admit(self, incoming: Incoming) -> Contribution:
        """All checks for one message; raise RemoteProtocolError to reject. Writes nothing."""

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

    @abstractmethod
    async def close(self) -> Phase:
        """Prepare the phase's outputs in ``state.record`` and return the next phase.

        Publishes nothing: the runner commits the outputs together with the move
        to the next phase, and that phase's :meth:`enter` publishes them. So a kill
        at any instant never leaves an output on the broker whose phase the
        database does not have."""
