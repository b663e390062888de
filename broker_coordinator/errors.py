"""The coordinator's own error: a round that cannot go on (a subclass, not a new root)."""

from __future__ import annotations

from maskfl.protocol.errors import MaskflError
from maskfl.protocol.phases import Phase


class RoundFailedError(MaskflError):
    """The round must be abandoned: a phase timed out below count_min, masks tied, ..."""

    def __init__(self, message: str, *, round_id: int | None = None, phase: Phase | None = None):
        super().__init__(message)
        self.round_id = round_id
        self.phase = phase


def shortfall_reason(phase: Phase, got: int, need: int, time_max_s: float) -> str:
    """Why a message phase failed, in the operator's words (log, status, demo output).

    ``got`` messages were accepted of the ``need`` (count_min) the phase asks for
    before its time_max of ``time_max_s`` seconds; the numbers follow in parentheses.
    """
    numbers = f"{phase} phase: {got} of at least {need} messages in {time_max_s:g} s"
    match phase, got:
        case Phase.SUM, 0:
            words = "no device drew the summer task this round"
        case Phase.SUM, _:
            words = f"only {got} of the {need} required summers answered"
        case Phase.UPDATE, 0:
            words = (
                "no update arrived (no device drew the update task, or none finished "
                "training in time)"
            )
        case Phase.UPDATE, _:
            words = f"only {got} of the {need} required updates arrived"
        case Phase.SUM2, _:
            words = f"only {got} of the {need} required summers sent their aggregated masks"
        case _:
            words = f"only {got} of the {need} required {phase} messages arrived"
    return f"{words} ({numbers})"
