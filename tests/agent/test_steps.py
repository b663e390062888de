"""The agent's step table: every allowed move, every refused one, its tie to protocol.round."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from maskfl.agent.state import Journal
from maskfl.agent.steps import SENDS, STEP_TABLE, DeviceRound, Event, Step, next_step, path
from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import PARTICIPANT_BY_TYPE, MessageType
from maskfl.protocol.round import PARTICIPANT_STEPS, steps_for
from maskfl.protocol.sortition import Task

S, E = Step, Event

#: Written out by hand (not derived from the table): what the agent may do.
ALLOWED: dict[tuple[Step, Event], Step] = {
    (S.NEW, E.SUMMER): S.SUM_SENT,
    (S.SUM_SENT, E.SEEDS): S.SEEDS_RECEIVED,
    (S.SEEDS_RECEIVED, E.SUM2): S.SUM2_SENT,
    (S.SUM2_SENT, E.ACCEPTED): S.DONE,
    (S.NEW, E.UPDATER): S.WAITING_SUMS,
    (S.WAITING_SUMS, E.TRAINED): S.TRAINED,
    (S.TRAINED, E.UPDATE): S.UPDATE_SENT,
    (S.UPDATE_SENT, E.ACCEPTED): S.DONE,
    (S.SUM_SENT, E.PUBLISHED): S.SUM_SENT,
    (S.SUM2_SENT, E.PUBLISHED): S.SUM2_SENT,
    (S.UPDATE_SENT, E.PUBLISHED): S.UPDATE_SENT,
    **{(s, E.SIT_OUT): S.SAT_OUT for s in Step if s not in (S.DONE, S.SAT_OUT, S.FAILED)},
    **{(s, E.FAIL): S.FAILED for s in Step if s not in (S.DONE, S.SAT_OUT, S.FAILED)},
}


@pytest.mark.parametrize(("step", "event"), sorted(ALLOWED))
def test_every_allowed_move(step: Step, event: Event) -> None:
    assert next_step(step, event) is ALLOWED[step, event]
    moved = DeviceRound(1, Task.SUM, step, detail="before").move(event, "after")
    assert moved.step is ALLOWED[step, event] and moved.detail == "after"


REFUSED = sorted(set(itertools.product(Step, Event)) - set(ALLOWED))


@pytest.mark.parametrize(("step", "event"), REFUSED)
def test_every_other_move_is_refused(step: Step, event: Event) -> None:
    with pytest.raises(LocalProtocolError, match=f"no move from step {step}"):
        next_step(step, event)
    with pytest.raises(LocalProtocolError):
        DeviceRound(1, Task.UPDATE, step).move(event)


def test_the_table_is_exactly_the_allowed_moves() -> None:
    assert dict(STEP_TABLE) == ALLOWED
    assert len(REFUSED) == len(Step) * len(Event) - len(ALLOWED) > 60


def test_terminal_steps_have_no_way_out() -> None:
    for step in (S.DONE, S.SAT_OUT, S.FAILED):
        assert step.terminal
        assert not [e for e in Event if (step, e) in STEP_TABLE]
    assert not [s for s in Step if s.terminal and s not in (S.DONE, S.SAT_OUT, S.FAILED)]


def test_each_task_path_follows_the_protocols_participant_steps() -> None:
    """The paths are built from protocol.round: a summer sends SUM then SUM2, an
    updater UPDATE, in the round table's order; one sending step per message."""
    assert path(Task.SUM) == (
        (E.SUMMER, S.SUM_SENT),
        (E.SEEDS, S.SEEDS_RECEIVED),
        (E.SUM2, S.SUM2_SENT),
        (E.ACCEPTED, S.DONE),
    )
    assert path(Task.UPDATE) == (
        (E.UPDATER, S.WAITING_SUMS),
        (E.TRAINED, S.TRAINED),
        (E.UPDATE, S.UPDATE_SENT),
        (E.ACCEPTED, S.DONE),
    )
    assert path(Task.NONE) == ()
    for task in Task:
        sent = [SENDS[step].message_type for _, step in path(task) if step in SENDS]
        assert sent == [p.kind.message_type for p in steps_for(task)]
    assert {k.message_type for k in SENDS.values()} == {
        k.kind.message_type for k in PARTICIPANT_STEPS
    }
    assert [s for s in Step if s.sends is None] == [
        S.NEW,
        S.SEEDS_RECEIVED,
        S.WAITING_SUMS,
        S.TRAINED,
        S.DONE,
        S.SAT_OUT,
        S.FAILED,
    ]
    assert [t for t in (s.sends for s in (S.SUM_SENT, S.SUM2_SENT, S.UPDATE_SENT)) if t] == [
        PARTICIPANT_BY_TYPE[MessageType.SUM],
        PARTICIPANT_BY_TYPE[MessageType.SUM2],
        PARTICIPANT_BY_TYPE[MessageType.UPDATE],
    ]


async def test_the_journal_never_holds_step_new(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "agent.sqlite3") as journal:
        with pytest.raises(LocalProtocolError, match="never journaled"):
            await journal.save(DeviceRound(3, Task.NONE, S.NEW))
        assert await journal.load(3) is None
