"""The round table: every move, the derived transitions, the participant's view."""

from __future__ import annotations

import pytest

from maskfl.protocol.errors import LocalProtocolError
from maskfl.protocol.messages import MESSAGE_PHASES, PARTICIPANT_MESSAGES, MessageType
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import (
    PARTICIPANT_STEPS,
    TABLE,
    TRANSITIONS,
    Event,
    RoundOutcome,
    move,
    retained,
    steps_for,
)
from maskfl.protocol.sortition import Task

WORKING = [p for p in Phase if p not in {Phase.FAILURE, Phase.SHUTDOWN}]


def test_the_happy_path_is_a_cycle_of_table_moves() -> None:
    phase, seen = Phase.IDLE, [Phase.IDLE]
    for event in (Event.STARTED, Event.CLOSED, Event.CLOSED, Event.CLOSED, Event.DONE):
        phase = move(phase, event).target
        seen.append(phase)
    assert seen == [Phase.IDLE, Phase.SUM, Phase.UPDATE, Phase.SUM2, Phase.UNMASK, Phase.IDLE]
    assert move(Phase.FAILURE, Event.DONE).target is Phase.IDLE


def test_what_each_move_produces() -> None:
    assert move(Phase.IDLE, Event.STARTED).publishes == (MessageType.ROUND_PARAMS,)
    assert move(Phase.SUM, Event.CLOSED).publishes == (MessageType.SUM_DICT,)
    assert move(Phase.UPDATE, Event.CLOSED).publishes == (MessageType.SEED_DICT,)
    assert move(Phase.SUM2, Event.CLOSED).publishes == ()
    done = move(Phase.UNMASK, Event.DONE)
    assert done.publishes == (MessageType.GLOBAL_MODEL,)
    assert done.clears == (MessageType.SUM_DICT, MessageType.SEED_DICT)
    assert done.outcome is RoundOutcome.COMPLETED
    only_outcomes = {m.outcome for m in TABLE.values()} - {None}
    assert only_outcomes == {RoundOutcome.COMPLETED, RoundOutcome.FAILED}


@pytest.mark.parametrize("phase", WORKING)
def test_every_working_phase_fails_into_failure_which_records_and_clears(phase: Phase) -> None:
    failed = move(phase, Event.FAILED)
    assert failed.target is Phase.FAILURE
    assert failed.outcome is RoundOutcome.FAILED
    assert failed.clears == (MessageType.SUM_DICT, MessageType.SEED_DICT)


@pytest.mark.parametrize("phase", [p for p in Phase if p is not Phase.SHUTDOWN])
def test_every_phase_can_stop(phase: Phase) -> None:
    assert move(phase, Event.STOPPED).target is Phase.SHUTDOWN


def test_failure_cannot_fail_again_and_shutdown_is_terminal() -> None:
    with pytest.raises(LocalProtocolError) as info:
        move(Phase.FAILURE, Event.FAILED)
    assert info.value.phase == Phase.FAILURE
    for event in Event:
        with pytest.raises(LocalProtocolError):
            move(Phase.SHUTDOWN, event)


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (Phase.IDLE, Event.CLOSED),
        (Phase.IDLE, Event.DONE),
        (Phase.SUM, Event.STARTED),
        (Phase.SUM, Event.DONE),
        (Phase.UNMASK, Event.CLOSED),
        (Phase.FAILURE, Event.STARTED),
    ],
)
def test_an_event_a_phase_does_not_have_raises(phase: Phase, event: Event) -> None:
    assert (phase, event) not in TABLE
    with pytest.raises(LocalProtocolError, match=f"no move from {phase} on {event}"):
        move(phase, event)


def test_transitions_are_derived_from_the_table() -> None:
    out = {Phase.FAILURE, Phase.SHUTDOWN}
    assert dict(TRANSITIONS) == {
        Phase.IDLE: frozenset({Phase.SUM} | out),
        Phase.SUM: frozenset({Phase.UPDATE} | out),
        Phase.UPDATE: frozenset({Phase.SUM2} | out),
        Phase.SUM2: frozenset({Phase.UNMASK} | out),
        Phase.UNMASK: frozenset({Phase.IDLE} | out),
        Phase.FAILURE: frozenset({Phase.IDLE, Phase.SHUTDOWN}),
        Phase.SHUTDOWN: frozenset(),
    }


def test_retained_is_what_the_moves_into_a_phase_published() -> None:
    assert retained(Phase.IDLE) == ()
    assert retained(Phase.SUM) == (MessageType.ROUND_PARAMS,)
    assert retained(Phase.UPDATE) == (MessageType.ROUND_PARAMS, MessageType.SUM_DICT)
    in_sum2 = (MessageType.ROUND_PARAMS, MessageType.SUM_DICT, MessageType.SEED_DICT)
    assert retained(Phase.SUM2) == in_sum2
    assert retained(Phase.UNMASK) == in_sum2
    assert retained(Phase.FAILURE) == ()
    assert retained(Phase.SHUTDOWN) == ()


def test_the_participant_view_follows_the_table() -> None:
    assert [s.kind for s in PARTICIPANT_STEPS] == list(PARTICIPANT_MESSAGES)
    assert {s.kind.phase for s in PARTICIPANT_STEPS} == MESSAGE_PHASES
    view = {s.kind.message_type: (s.sender, s.prompt, s.then) for s in PARTICIPANT_STEPS}
    assert view == {
        MessageType.SUM: (Task.SUM, MessageType.ROUND_PARAMS, Phase.UPDATE),
        MessageType.UPDATE: (Task.UPDATE, MessageType.SUM_DICT, Phase.SUM2),
        MessageType.SUM2: (Task.SUM, MessageType.SEED_DICT, Phase.UNMASK),
    }
    for step in PARTICIPANT_STEPS:
        assert step.prompt in retained(step.kind.phase)
        assert move(step.kind.phase, Event.CLOSED).target is step.then


def test_steps_for_each_task() -> None:
    assert [s.kind.message_type for s in steps_for(Task.SUM)] == [MessageType.SUM, MessageType.SUM2]
    assert [s.kind.message_type for s in steps_for(Task.UPDATE)] == [MessageType.UPDATE]
    assert steps_for(Task.NONE) == ()
