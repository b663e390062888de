"""The phases of a round, their order, and the count/time window of a message phase.

::

    ──> idle ──> sum ──> update ──> sum2 ──> unmask ──> idle ...
         any phase ──> failure ──> idle;  any phase ──> shutdown

Which event moves a phase where, and what the move produces, is the round table
(:mod:`maskfl.protocol.round`); this module names the phases, their order
(:func:`precedes`) and the window. ``sum``, ``update`` and ``sum2`` are driven
by messages: each has a :class:`PhaseWindow` ``(count_min, count_max,
time_min_s, time_max_s)`` and a :class:`Window` that decides when it ends:

* ``CLOSE`` as soon as ``count_max`` messages were accepted;
* ``CLOSE`` once ``time_min_s`` has passed and ``count_min`` were accepted;
* ``FAIL`` once ``time_max_s`` has passed with fewer than ``count_min``;
* ``OPEN`` otherwise.

(Xaynet waits out ``time_min`` even when ``count_max`` is reached early; we
close at once, because more messages would be refused anyway.) The timer is
pure: the caller passes the clock in (monotonic seconds), so a phase can be
replayed in a test without sleeping. This is the only place this logic lives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from maskfl.protocol.errors import ConfigError, LocalProtocolError

__all__ = [
    "Phase",
    "PhaseWindow",
    "Verdict",
    "Window",
    "precedes",
]


class Phase(StrEnum):
    """Where the coordinator's round is."""

    IDLE = "idle"
    SUM = "sum"
    UPDATE = "update"
    SUM2 = "sum2"
    UNMASK = "unmask"
    FAILURE = "failure"
    SHUTDOWN = "shutdown"


_ROUND: Final = (Phase.IDLE, Phase.SUM, Phase.UPDATE, Phase.SUM2, Phase.UNMASK)
"""The one statement of the phase order: a round's phases, after the last the next round."""

_RANK: Final[Mapping[Phase, int]] = MappingProxyType(
    {phase: i for i, phase in enumerate((*_ROUND, Phase.FAILURE, Phase.SHUTDOWN))}
)


def precedes(earlier: Phase, later: Phase) -> bool:
    """Whether ``earlier`` comes before ``later`` in a round (failure, shutdown last)."""
    return _RANK[earlier] < _RANK[later]


class Verdict(StrEnum):
    """What a message phase should do now."""

    OPEN = "open"
    CLOSE = "close"
    FAIL = "fail"


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field} must be a number of seconds, got {value!r}", field=field)
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be finite, got {value!r}", field=field)
    return float(value)


@dataclass(frozen=True, slots=True)
class PhaseWindow:
    """When a message phase may close. Valid: ``0 < count_min <= count_max``,
    ``0 <= time_min_s <= time_max_s``.

    Times are seconds from the phase's opening. Invalid values raise
    :class:`ConfigError` naming the field.
    """

    count_min: int
    count_max: int
    time_min_s: float
    time_max_s: float

    def __post_init__(self) -> None:
        for name in ("count_min", "count_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}", field=name)
        if self.count_min < 1:
            raise ConfigError(f"count_min must be >= 1, got {self.count_min}", field="count_min")
        if self.count_max < self.count_min:
            raise ConfigError(
                f"count_max ({self.count_max}) must be >= count_min ({self.count_min})",
                field="count_max",
            )
        time_min = _number(self.time_min_s, "time_min_s")
        time_max = _number(self.time_max_s, "time_max_s")
        if time_min < 0:
            raise ConfigError(f"time_min_s must be >= 0, got {time_min}", field="time_min_s")
        if time_max < time_min:
            raise ConfigError(
                f"time_max_s ({time_max}) must be >= time_min_s ({time_min})",
                field="time_max_s",
            )


class Window:
    """One message phase's window: the timer, the capacity and the completion rule.

    Counts accepted messages and decides, given the time, whether the phase ends.
    Pure: it never reads a clock. ``opened_at`` and every ``now`` are seconds on
    one clock chosen by the caller; a ``now`` before ``opened_at`` counts as no
    time elapsed. What only the phase knows comes in as arguments: how many
    admitted messages are still pending their commit (capacity), whether the
    phase has what it needs to close (``ready``: every mask group has a summer or
    an answer) and whether nothing more can usefully arrive (``complete``).
    """

    __slots__ = ("_count", "limits", "opened_at")

    def __init__(self, limits: PhaseWindow, opened_at: float) -> None:
        self.limits = limits
        self.opened_at = float(opened_at)
        self._count = 0

    @property
    def count(self) -> int:
        """Messages accepted (committed) so far."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether ``count_max`` is reached: further messages must be refused."""
        return self._count >= self.limits.count_max

    def has_room(self, pending: int) -> bool:
        """Whether one more message fits beside the count and ``pending`` admitted ones
        not yet committed (else it is refused ``phase_closed``)."""
        return self._count + pending < self.limits.count_max

    def accepted(self, n: int = 1) -> int:
        """Record ``n`` accepted messages and return the new count.

        ``n = 0`` (an empty batch) changes nothing. Raises
        :class:`LocalProtocolError`, leaving the count unchanged, if that would pass
        ``count_max`` (check :meth:`has_room` before admitting) or ``n < 0``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise LocalProtocolError(f"accepted() needs an integer n >= 0, got {n!r}")
        if self._count + n > self.limits.count_max:
            raise LocalProtocolError(
                f"accepting {n} more would pass count_max ({self.limits.count_max})"
            )
        self._count += n
        return self._count

    def elapsed(self, now: float) -> float:
        """Seconds since the phase opened (never negative)."""
        return max(0.0, now - self.opened_at)

    def decide(self, now: float, *, ready: bool = True, complete: bool = False) -> Verdict:
        """``CLOSE`` at ``count_max``, or at ``time_min`` with ``count_min``, or at once
        with ``count_min`` when ``complete``; ``FAIL`` at ``time_max`` below
        ``count_min``; ``OPEN`` otherwise. While not ``ready`` (below ``count_max``)
        it waits past ``time_min`` until ``time_max`` and then closes, so that the
        phase that needs the missing messages says what is missing (sum: a mask
        group without a summer; sum2: a group without an answer)."""
        limits = self.limits
        if self.full:
            return Verdict.CLOSE
        elapsed = self.elapsed(now)
        enough = self._count >= limits.count_min
        if enough and elapsed >= limits.time_min_s:
            return Verdict.CLOSE if ready or elapsed >= limits.time_max_s else Verdict.OPEN
        if elapsed >= limits.time_max_s:
            return Verdict.FAIL
        if enough and complete:
            return Verdict.CLOSE
        return Verdict.OPEN

    def wake_at(self, *, ready: bool = True) -> float:
        """The clock value at which :meth:`decide` changes if no message arrives.

        ``opened_at + time_min_s`` once ``count_min`` is reached (and ``ready``),
        else ``opened_at + time_max_s``: the caller sleeps until then (or until the
        next message) and asks again.
        """
        if self._count >= self.limits.count_min and ready:
            return self.opened_at + self.limits.time_min_s
        return self.opened_at + self.limits.time_max_s

    def __repr__(self) -> str:
        return f"Window(limits={self.limits!r}, opened_at={self.opened_at}, count={self._count})"
