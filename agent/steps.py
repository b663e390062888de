"""Where a round stands for this device: its steps and the one table of moves between them.

The agent *steps* through a round; every step is journaled (:mod:`maskfl.agent.state`)
before the agent acts on the network, so a restart resumes from the last one::

    summer:   new ─▶ sum_sent ─▶ seeds_received ─▶ sum2_sent ─▶ done
    updater:  new ─▶ waiting_sums ─▶ trained ─▶ update_sent ─▶ done
    any:      ─▶ sat_out (not selected, guards, budget, round moved on) | failed

:data:`STEP_TABLE` (step x :class:`Event` -> next step) is every allowed move;
:func:`next_step` is the only way a :class:`DeviceRound` changes step (its
:meth:`DeviceRound.move`), so a move outside the table is a bug that raises
:class:`LocalProtocolError` instead of being journaled.

The table is tied to the protocol's round table (:data:`PARTICIPANT_MESSAGES`): each
participant message kind has exactly one *sending* step (:data:`SENDS`), entered when
the signed message is journaled and left on its receipt; a task's sending steps come in
the order of the phases that take their messages, and a step that publishes may move
only to itself (a copy published, ``bytes_sent`` grows) or onwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, Self

from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import PARTICIPANT_BY_TYPE, MessageType, ParticipantKind
from maskfl.protocol.phases import precedes
from maskfl.protocol.sortition import Task

__all__ = [
    "SENDS",
    "STEP_TABLE",
    "TASK_MESSAGES",
    "DeviceRound",
    "Event",
    "Step",
    "next_step",
]


class Step(StrEnum):
    """Where a round stands for this device. Terminal steps: done, sat_out, failed.

    ``new`` is never journaled: a round is in the journal from its first real step on.
    """

    NEW = "new"
    SUM_SENT = "sum_sent"
    SEEDS_RECEIVED = "seeds_received"
    SUM2_SENT = "sum2_sent"
    WAITING_SUMS = "waiting_sums"
    TRAINED = "trained"
    UPDATE_SENT = "update_sent"
    DONE = "done"
    SAT_OUT = "sat_out"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def sends(self) -> ParticipantKind | None:
        """The participant message this step publishes (until its receipt), if any."""
        return SENDS.get(self)


_TERMINAL: Final = frozenset({Step.DONE, Step.SAT_OUT, Step.FAILED})


class Event(StrEnum):
    """What moves a round from one step to the next."""

    SUMMER = "selected as summer; sum message and ephemeral key journaled"
    UPDATER = "selected as updater; guards passed"
    SEEDS = "seed dictionary journaled"
    SUM2 = "aggregate mask journaled as the sum2 message"
    TRAINED = "training result journaled"
    UPDATE = "masked update journaled"
    PUBLISHED = "a copy of the journaled message published"
    ACCEPTED = "the coordinator accepted the message"
    SIT_OUT = "not selected, guards, budget, or the round moved on"
    FAIL = "rejected, or the round cannot go on"


TASK_MESSAGES: Final[Mapping[Task, tuple[MessageType, ...]]] = MappingProxyType(
    {
        Task.SUM: (MessageType.SUM, MessageType.SUM2),
        Task.UPDATE: (MessageType.UPDATE,),
        Task.NONE: (),
    }
)
"""What each task publishes, in the order of the phases that take it."""

SENDS: Final[Mapping[Step, ParticipantKind]] = MappingProxyType(
    {
        Step.SUM_SENT: PARTICIPANT_BY_TYPE[MessageType.SUM],
        Step.SUM2_SENT: PARTICIPANT_BY_TYPE[MessageType.SUM2],
        Step.UPDATE_SENT: PARTICIPANT_BY_TYPE[MessageType.UPDATE],
    }
)
"""The sending steps: one per participant message kind of the protocol's table."""

_PATHS: Final[Mapping[Task, tuple[tuple[Event, Step], ...]]] = MappingProxyType(
    {
        Task.SUM: (
            (Event.SUMMER, Step.SUM_SENT),
            (Event.SEEDS, Step.SEEDS_RECEIVED),
            (Event.SUM2, Step.SUM2_SENT),
            (Event.ACCEPTED, Step.DONE),
        ),
        Task.UPDATE: (
            (Event.UPDATER, Step.WAITING_SUMS),
            (Event.TRAINED, Step.TRAINED),
            (Event.UPDATE, Step.UPDATE_SENT),
            (Event.ACCEPTED, Step.DONE),
        ),
    }
)
"""Each task's happy path from ``new``: (event, step entered)."""


def _build() -> Mapping[tuple[Step, Event], Step]:
    table: dict[tuple[Step, Event], Step] = {}
    for path in _PATHS.values():
        step = Step.NEW
        for event, after in path:
            table[step, event] = after
            step = after
    for step in Step:
        if not step.terminal:
            table[step, Event.SIT_OUT] = Step.SAT_OUT
            table[step, Event.FAIL] = Step.FAILED
    for step in SENDS:
        table[step, Event.PUBLISHED] = step
    return MappingProxyType(table)


STEP_TABLE: Final = _build()
"""Every allowed move ``(step, event) -> next step``; anything else is a bug."""


def _check_against_protocol() -> None:
    """The table agrees with the protocol's: one sending step per participant message
    kind, and each task sends its kinds in round order (the phases that take them)."""
    if sorted(k.message_type for k in SENDS.values()) != sorted(PARTICIPANT_BY_TYPE):
        raise LocalProtocolError("the agent's sending steps differ from the protocol's kinds")
    for task, path in _PATHS.items():
        sent = tuple(kind.message_type for _, step in path if (kind := SENDS.get(step)))
        if sent != TASK_MESSAGES[task]:
            raise LocalProtocolError(f"{task} path sends {sent}, not {TASK_MESSAGES[task]}")
        phases = [PARTICIPANT_BY_TYPE[t].phase for t in sent]
        if any(not precedes(a, b) for a, b in itertools.pairwise(phases)):
            raise LocalProtocolError(f"{task} path sends out of the round's phase order")


_check_against_protocol()


def next_step(step: Step, event: Event) -> Step:
    """The step after ``event`` in ``step``; :class:`LocalProtocolError` if there is none."""
    try:
        return STEP_TABLE[step, event]
    except KeyError:
        raise LocalProtocolError(f"no move from step {step} on {event.name}") from None


@dataclass(frozen=True)
class DeviceRound:
    """One round as this device journals it (one row of the journal's ``rounds``)."""

    round_id: int
    task: Task
    step: Step
    params_digest: bytes | None = None
    ephemeral_sk: bytes | None = None
    ephemeral_pk: bytes | None = None
    bytes_sent: int = 0
    detail: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0

    def move(self, event: Event, detail: str = "", **changes: Any) -> Self:
        """This round after ``event``, in the step :data:`STEP_TABLE` names."""
        return replace(self, step=next_step(self.step, event), detail=detail, **changes)
