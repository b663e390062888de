"""The round table: phase x event -> next phase and what the move produces (sans-IO).

This is the one statement of how a round moves. The coordinator's runner looks
every move up here (:func:`move`); nothing else names a next phase. The
participant-facing view (:data:`PARTICIPANT_STEPS`) is derived from the same
table, so an agent's step machine can be driven by it too.

==========  ==========  ==========  ==============================================
phase       event       next        the move produces
==========  ==========  ==========  ==============================================
idle        started     sum         ROUND_PARAMS published (retained)
idle        stopped     shutdown    (max_rounds reached, privacy budget spent)
sum         closed      update      SUM_DICT published (retained)
update      closed      sum2        one SEED_DICT per summer published (retained)
sum2        closed      unmask      nothing
unmask      done        idle        GLOBAL_MODEL published (retained); the round's
                                    SUM_DICT and SEED_DICTs cleared; outcome
                                    ``completed`` recorded
failure     done        idle        nothing (the pause after a failure is over)
any but     failed      failure     the round's SUM_DICT and SEED_DICTs cleared;
failure,                            outcome ``failed`` recorded (once)
shutdown
any but     stopped     shutdown    nothing
shutdown
==========  ==========  ==========  ==============================================

"Produces" is what the runner does *after* the move is committed to the store: a
retained output of a phase is published only once the database is in that phase
(a restart publishes it again, see :func:`retained`).

For participants: a message kind is admitted only in its phase
(:data:`~maskfl.protocol.messages.PARTICIPANT_MESSAGES`); it is prompted by the
retained message that the move into that phase published, and the phase that
follows is the ``closed`` entry. :data:`PARTICIPANT_STEPS` lists that, in round
order, with the task (sortition) that sends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import (
    PARTICIPANT_BY_TYPE,
    MessageType,
    ParticipantKind,
)
from maskfl.protocol.phases import Phase
from maskfl.protocol.sortition import Task

__all__ = [
    "PARTICIPANT_STEPS",
    "ROUND_DICTS",
    "TABLE",
    "TRANSITIONS",
    "Event",
    "Move",
    "ParticipantStep",
    "RoundOutcome",
    "move",
    "retained",
    "steps_for",
]


class Event(StrEnum):
    """What happened in a phase; with the phase it selects the move (:func:`move`)."""

    STARTED = "started"
    """idle made the next round (its row is written)."""
    STOPPED = "stopped"
    """No more rounds: max_rounds reached, privacy budget spent, or a stop request."""
    CLOSED = "closed"
    """A message phase's window closed with what it needs."""
    DONE = "done"
    """unmask stored and published the model; failure's pause is over."""
    FAILED = "failed"
    """The round cannot go on (a window ran out, a check failed, an error)."""


class RoundOutcome(StrEnum):
    """How a round ended: the round row's ``outcome`` holds the value, NULL while the
    round runs. (Not the agent's :class:`maskfl.agent.delivery.Outcome`, which is a
    receipt's verdict.)"""

    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Move:
    """One entry of the table: where the round goes and what the move produces.

    ``publishes``: retained coordinator messages published once the move is
    committed. ``clears``: the round's retained messages removed (the round is
    over). ``outcome``: recorded on the round row when the round ends here.
    """

    target: Phase
    publishes: tuple[MessageType, ...] = ()
    clears: tuple[MessageType, ...] = ()
    outcome: RoundOutcome | None = None


ROUND_DICTS: Final = (MessageType.SUM_DICT, MessageType.SEED_DICT)
"""What a round publishes for its own participants and clears when it ends."""

_FAIL: Final = Move(Phase.FAILURE, clears=ROUND_DICTS, outcome=RoundOutcome.FAILED)
_STOP: Final = Move(Phase.SHUTDOWN)

TABLE: Final[Mapping[tuple[Phase, Event], Move]] = MappingProxyType(
    {
        (Phase.IDLE, Event.STARTED): Move(Phase.SUM, publishes=(MessageType.ROUND_PARAMS,)),
        (Phase.SUM, Event.CLOSED): Move(Phase.UPDATE, publishes=(MessageType.SUM_DICT,)),
        (Phase.UPDATE, Event.CLOSED): Move(Phase.SUM2, publishes=(MessageType.SEED_DICT,)),
        (Phase.SUM2, Event.CLOSED): Move(Phase.UNMASK),
        (Phase.UNMASK, Event.DONE): Move(
            Phase.IDLE,
            publishes=(MessageType.GLOBAL_MODEL,),
            clears=ROUND_DICTS,
            outcome=RoundOutcome.COMPLETED,
        ),
        (Phase.FAILURE, Event.DONE): Move(Phase.IDLE),
    }
    | {(p, Event.FAILED): _FAIL for p in Phase if p not in (Phase.FAILURE, Phase.SHUTDOWN)}
    | {(p, Event.STOPPED): _STOP for p in Phase if p is not Phase.SHUTDOWN}
)
"""The round: every (phase, event) pair that is a move. Anything else is a bug."""


def move(phase: Phase, event: Event) -> Move:
    """The table's entry for ``event`` in ``phase``; :class:`LocalProtocolError` if none."""
    try:
        return TABLE[phase, event]
    except KeyError:
        raise LocalProtocolError(f"no move from {phase} on {event}", phase=phase) from None


TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = MappingProxyType(
    {p: frozenset(m.target for (q, _), m in TABLE.items() if q is p) for p in Phase}
)
"""The allowed moves ``from -> {to, ...}``, derived from :data:`TABLE`."""


def retained(phase: Phase) -> tuple[MessageType, ...]:
    """The round's retained messages that must be on the broker while it is in
    ``phase`` (what a restart, or a broker that lost its retained state, republishes):
    everything published by the moves from idle up to ``phase``, nothing once the
    round is over (idle, failure, shutdown)."""
    out: list[MessageType] = []
    at = Phase.IDLE
    event = Event.STARTED
    while at is not phase:
        step = TABLE.get((at, event))
        if step is None or step.clears:
            return ()
        out.extend(step.publishes)
        at, event = step.target, Event.CLOSED
    return tuple(out)


# --- the participant's view -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParticipantStep:
    """One message a participant sends in a round, as the table sees it.

    ``kind``: the message (its type, topic and the phase that admits it);
    ``sender``: the task that sends it; ``prompt``: the retained coordinator
    message, published on the move into ``kind.phase``, that the participant
    waits for before sending; ``then``: the phase the round moves to when the
    window closes (a message that arrives then is refused ``phase_closed``).
    """

    kind: ParticipantKind
    sender: Task
    prompt: MessageType
    then: Phase


def _prompt(phase: Phase) -> MessageType:
    (found,) = [m.publishes[0] for m in TABLE.values() if m.target is phase and m.publishes]
    return found


_SENDERS: Final[Mapping[MessageType, Task]] = {
    MessageType.SUM: Task.SUM,
    MessageType.UPDATE: Task.UPDATE,
    MessageType.SUM2: Task.SUM,
}

PARTICIPANT_STEPS: Final = tuple(
    ParticipantStep(
        kind,
        _SENDERS[kind.message_type],
        _prompt(kind.phase),
        move(kind.phase, Event.CLOSED).target,
    )
    for kind in PARTICIPANT_BY_TYPE.values()
)
"""Every participant message in round order: SUM (summers, prompted by ROUND_PARAMS),
UPDATE (updaters, by SUM_DICT), SUM2 (summers, by their SEED_DICT)."""


def steps_for(task: Task) -> tuple[ParticipantStep, ...]:
    """What a participant with ``task`` sends this round, in order (none for ``none``)."""
    return tuple(step for step in PARTICIPANT_STEPS if step.sender is task)
