"""The phase order and the count/time window: every branch of Window.decide."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.errors import ConfigError, LocalProtocolError
from maskfl.protocol.messages import PARTICIPANT_MESSAGES, MessageType
from maskfl.protocol.phases import Phase, PhaseWindow, Verdict, Window, precedes
from maskfl.protocol.round import TABLE, Event, move

# --- the table ---------------------------------------------------------------------------


def test_precedes_is_the_round_order() -> None:
    order = [Phase.IDLE, Phase.SUM, Phase.UPDATE, Phase.SUM2, Phase.UNMASK]
    order += [Phase.FAILURE, Phase.SHUTDOWN]
    for i, earlier in enumerate(order):
        for later in order:
            assert precedes(earlier, later) == (i < order.index(later))


def test_the_round_tables_happy_path_is_the_order_precedes_knows() -> None:
    """The phase order is stated once (protocol.phases: precedes) and walked by the round
    table (protocol.round): a phase or move added to one and not the other fails."""
    path, at = [Phase.IDLE], Phase.IDLE
    step = move(at, Event.STARTED)
    while step.target is not Phase.IDLE:
        assert step.target not in path, f"the table loops back to {step.target}"
        at = step.target
        path.append(at)
        step = TABLE.get((at, Event.CLOSED)) or move(at, Event.DONE)
    assert set(path) == set(Phase) - {Phase.FAILURE, Phase.SHUTDOWN}
    assert all(precedes(a, b) for a, b in itertools.pairwise(path))
    assert all(precedes(p, Phase.FAILURE) for p in path)


def test_participant_kinds_are_one_table() -> None:
    assert [k.phase for k in PARTICIPANT_MESSAGES] == [Phase.SUM, Phase.UPDATE, Phase.SUM2]
    for kind in PARTICIPANT_MESSAGES:
        assert kind.message_type.phase is kind.phase
        assert kind.message_type.topic_kind is kind.topic
        assert kind.topic.value == kind.phase.value
    others = set(MessageType) - {k.message_type for k in PARTICIPANT_MESSAGES}
    assert all(t.phase is None and t.topic_kind is None for t in others)


def test_phase_values_are_the_wire_names() -> None:
    assert [p.value for p in Phase] == [
        "idle",
        "sum",
        "update",
        "sum2",
        "unmask",
        "failure",
        "shutdown",
    ]
    assert Phase("sum2") is Phase.SUM2


# --- the window --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"count_min": 0}, "count_min"),
        ({"count_min": -3}, "count_min"),
        ({"count_min": 1.5}, "count_min"),
        ({"count_min": True}, "count_min"),
        ({"count_max": 2}, "count_max"),  # below count_min = 3
        ({"count_max": "9"}, "count_max"),
        ({"time_min_s": -1.0}, "time_min_s"),
        ({"time_min_s": math.nan}, "time_min_s"),
        ({"time_max_s": 4.0}, "time_max_s"),  # below time_min_s = 5
        ({"time_max_s": math.inf}, "time_max_s"),
        ({"time_max_s": None}, "time_max_s"),
    ],
)
def test_window_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {"count_min": 3, "count_max": 10, "time_min_s": 5.0, "time_max_s": 60}
    values.update(kwargs)
    with pytest.raises(ConfigError) as info:
        PhaseWindow(**values)
    assert info.value.field == field


def test_window_edges_are_valid() -> None:
    PhaseWindow(1, 1, 0, 0)
    PhaseWindow(5, 5, 2.5, 2.5)


# --- the timer: every branch -------------------------------------------------------------

WINDOW = PhaseWindow(count_min=3, count_max=5, time_min_s=10.0, time_max_s=60.0)
T0 = 1000.0


def _timer(count: int) -> Window:
    timer = Window(WINDOW, opened_at=T0)
    if count:
        timer.accepted(count)
    return timer


def test_open_before_time_min_even_with_count_min() -> None:
    assert _timer(0).decide(T0) is Verdict.OPEN
    assert _timer(3).decide(T0 + 9.999) is Verdict.OPEN
    assert _timer(4).decide(T0 + 5) is Verdict.OPEN


def test_close_at_count_max_at_once() -> None:
    assert _timer(5).decide(T0) is Verdict.CLOSE
    assert _timer(5).decide(T0 + 1000) is Verdict.CLOSE  # even past time_max


def test_close_at_time_min_with_count_min() -> None:
    assert _timer(3).decide(T0 + 10.0) is Verdict.CLOSE
    assert _timer(4).decide(T0 + 30.0) is Verdict.CLOSE


def test_open_between_time_min_and_time_max_below_count_min() -> None:
    assert _timer(2).decide(T0 + 10.0) is Verdict.OPEN
    assert _timer(0).decide(T0 + 59.999) is Verdict.OPEN


def test_fail_at_time_max_below_count_min() -> None:
    assert _timer(2).decide(T0 + 60.0) is Verdict.FAIL
    assert _timer(0).decide(T0 + 3600.0) is Verdict.FAIL


def test_count_min_reached_late_still_closes() -> None:
    timer = _timer(2)
    assert timer.decide(T0 + 45) is Verdict.OPEN
    timer.accepted()
    assert timer.decide(T0 + 45) is Verdict.CLOSE
    assert timer.decide(T0 + 61) is Verdict.CLOSE  # reached, so never FAIL


def test_a_clock_before_opening_counts_as_no_time() -> None:
    timer = _timer(3)
    assert timer.elapsed(T0 - 100) == 0.0
    assert timer.decide(T0 - 100) is Verdict.OPEN
    assert _timer(0).decide(T0 - 1e9) is Verdict.OPEN


def test_zero_length_window_decides_at_once() -> None:
    window = PhaseWindow(1, 2, 0, 0)
    assert Window(window, 0.0).decide(0.0) is Verdict.FAIL
    timer = Window(window, 0.0)
    timer.accepted()
    assert timer.decide(0.0) is Verdict.CLOSE


def test_accepted_counts_and_refuses_past_count_max() -> None:
    timer = _timer(0)
    assert timer.accepted() == 1
    assert timer.accepted(3) == 4
    assert not timer.full
    with pytest.raises(LocalProtocolError, match="count_max"):
        timer.accepted(2)
    assert timer.count == 4  # unchanged on error
    assert timer.accepted() == 5
    assert timer.full
    with pytest.raises(LocalProtocolError, match="count_max"):
        timer.accepted()
    assert timer.count == 5
    assert timer.accepted(0) == 5  # an empty batch changes nothing, even when full
    for bad in (-1, True, 1.0):
        with pytest.raises(LocalProtocolError):
            timer.accepted(bad)  # type: ignore[arg-type]


def test_wake_at_is_the_next_change_without_messages() -> None:
    assert _timer(2).wake_at() == T0 + 60.0
    assert _timer(3).wake_at() == T0 + 10.0
    timer = _timer(2)
    assert timer.decide(timer.wake_at() - 1e-6) is Verdict.OPEN
    assert timer.decide(timer.wake_at()) is Verdict.FAIL
    timer = _timer(3)
    assert timer.decide(timer.wake_at() - 1e-6) is Verdict.OPEN
    assert timer.decide(timer.wake_at()) is Verdict.CLOSE
    assert "count=3" in repr(timer)


windows = st.builds(
    lambda cmin, extra, tmin, textra: PhaseWindow(cmin, cmin + extra, tmin, tmin + textra),
    st.integers(1, 20),
    st.integers(0, 20),
    st.floats(0, 100),
    st.floats(0, 100),
)


@settings(max_examples=200)
@given(window=windows, count=st.integers(0, 40), t1=st.floats(0, 300), t2=st.floats(0, 300))
def test_verdicts_are_final_over_time(
    window: PhaseWindow, count: int, t1: float, t2: float
) -> None:
    timer = Window(window, 0.0)
    n = min(count, window.count_max)
    if n:
        timer.accepted(n)
    early, late = sorted((t1, t2))
    first, second = timer.decide(early), timer.decide(late)
    if first is not Verdict.OPEN:
        assert second is first  # CLOSE and FAIL never revert as time passes
    # FAIL only below count_min; CLOSE only at or above it.
    assert (second is Verdict.FAIL) <= (n < window.count_min)
    assert (second is Verdict.CLOSE) <= (n >= window.count_min)
    # By time_max the phase has always ended.
    assert timer.decide(window.time_max_s) is not Verdict.OPEN


# --- capacity and completion ------------------------------------------------------------


def test_room_counts_the_pending_messages_beside_the_committed_ones() -> None:
    assert _timer(0).has_room(4)
    assert not _timer(0).has_room(5)
    assert _timer(3).has_room(1)
    assert not _timer(3).has_room(2)
    assert not _timer(5).has_room(0)


def test_a_phase_that_is_not_ready_waits_past_time_min_until_time_max() -> None:
    timer = _timer(3)
    assert timer.decide(T0 + 10.0, ready=False) is Verdict.OPEN
    assert timer.wake_at(ready=False) == T0 + 60.0
    assert timer.decide(T0 + 59.999, ready=False) is Verdict.OPEN
    assert timer.decide(T0 + 60.0, ready=False) is Verdict.CLOSE  # the phase names what is missing
    assert _timer(5).decide(T0, ready=False) is Verdict.CLOSE  # full: nothing more can come
    assert _timer(2).decide(T0 + 60.0, ready=False) is Verdict.FAIL


def test_a_complete_phase_closes_before_time_min_once_count_min_is_in() -> None:
    assert _timer(3).decide(T0 + 1.0, complete=True) is Verdict.CLOSE
    assert _timer(2).decide(T0 + 1.0, complete=True) is Verdict.OPEN
    assert _timer(2).decide(T0 + 60.0, complete=True) is Verdict.FAIL
