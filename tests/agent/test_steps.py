"""The agent's step table: every allowed move, every refused one, and its tie to the protocol."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from maskfl.agent.state import Journal
from maskfl.agent.steps import SENDS, STEP_TABLE, DeviceRound, Event, Step, next_step
from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import PARTICIPANT_MESSAGES, MessageType
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


def test_each_participant_message_has_one_sending_step_in_round_order() -> None:
    """The steps that publish are the protocol's participant kinds, and a summer's
    sends (sum, then sum2) follow the protocol's round order."""
    assert {k.message_type for k in SENDS.values()} == {
        k.message_type for k in PARTICIPANT_MESSAGES
    }
    assert S.SUM_SENT.sends is not None and S.SUM_SENT.sends.message_type is MessageType.SUM
    assert S.SUM2_SENT.sends is not None and S.SUM2_SENT.sends.message_type is MessageType.SUM2
    assert S.UPDATE_SENT.sends is not None
    assert S.UPDATE_SENT.sends.message_type is MessageType.UPDATE
    order = [k.message_type for k in PARTICIPANT_MESSAGES]
    assert order.index(MessageType.SUM) < order.index(MessageType.SUM2)
    assert [s for s in Step if s.sends is None] == [
        S.NEW,
        S.SEEDS_RECEIVED,
        S.WAITING_SUMS,
        S.TRAINED,
        S.DONE,
        S.SAT_OUT,
        S.FAILED,
    ]


async def test_the_journal_never_holds_step_new(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "agent.sqlite3") as journal:
        with pytest.raises(LocalProtocolError, match="never journaled"):
            await journal.save(DeviceRound(3, Task.NONE, S.NEW))
        assert await journal.load(3) is None
