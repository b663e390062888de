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

The table is built from the protocol's round table (:mod:`maskfl.protocol.round`): a
task's path (:func:`path`) is, for each message the protocol's participant view has
that task send (``steps_for(task)``, in round order), the agent's steps that prepare
it and its *sending* step (:data:`SENDS`: one per participant message), entered when
the signed message is journaled. A sending step may move only to itself (a copy
published, ``bytes_sent`` grows), onwards, or out (sat_out, failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, Self

from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import MessageType, ParticipantKind
from maskfl.protocol.round import PARTICIPANT_STEPS, steps_for
from maskfl.protocol.sortition import Task

__all__ = [
    "SENDS",
    "STEP_TABLE",
    "DeviceRound",
    "Event",
    "Step",
    "next_step",
    "path",
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


_SENT: Final[Mapping[MessageType, tuple[Event, Step]]] = MappingProxyType(
    {
        MessageType.SUM: (Event.SUMMER, Step.SUM_SENT),
        MessageType.UPDATE: (Event.UPDATE, Step.UPDATE_SENT),
        MessageType.SUM2: (Event.SUM2, Step.SUM2_SENT),
    }
)
"""Per participant message: the event that journals it and the step that sends it."""

_BEFORE: Final[Mapping[MessageType, tuple[tuple[Event, Step], ...]]] = MappingProxyType(
    {
        MessageType.SUM: (),  # composed at once: its prompt is the round parameters
        MessageType.UPDATE: ((Event.UPDATER, Step.WAITING_SUMS), (Event.TRAINED, Step.TRAINED)),
        MessageType.SUM2: ((Event.SEEDS, Step.SEEDS_RECEIVED),),  # its prompt: SEED_DICT
    }
)
"""Per participant message: the agent's own steps before it can be composed."""

SENDS: Final[Mapping[Step, ParticipantKind]] = MappingProxyType(
    {_SENT[s.kind.message_type][1]: s.kind for s in PARTICIPANT_STEPS}
)
"""The sending steps: one per participant message of the protocol's round table."""


def path(task: Task) -> tuple[tuple[Event, Step], ...]:
    """A task's happy path from ``new``, as (event, step entered): for each message
    the protocol has the task send (:func:`~maskfl.protocol.round.steps_for`, in round
    order), the steps that prepare it and the step that sends it; the last one's
    receipt ends the round (``done``). An earlier message is left when the next
    one's prompt arrives (a summer's seed dictionary proves its sum counted)."""
    out: list[tuple[Event, Step]] = []
    for step in steps_for(task):
        out += [*_BEFORE[step.kind.message_type], _SENT[step.kind.message_type]]
    return (*out, (Event.ACCEPTED, Step.DONE)) if out else ()


def _build() -> Mapping[tuple[Step, Event], Step]:
    table: dict[tuple[Step, Event], Step] = {}
    for task in Task:
        step = Step.NEW
        for event, after in path(task):
            if table.setdefault((step, event), after) is not after:
                raise LocalProtocolError(f"{task}: {step} on {event.name} is ambiguous")
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

    def public(self) -> dict[str, Any]:
        """A JSON-friendly view without the private key (``maskfl-agent status``)."""
        data = asdict(self)
        data.pop("ephemeral_sk")
        for key in ("params_digest", "ephemeral_pk"):
            if data[key] is not None:
                data[key] = data[key].hex()
        data["task"] = str(self.task)
        data["step"] = str(self.step)
        return data
