"""The coordinator's own error: a round that cannot go on (a subclass, not a new root)."""

from __future__ import annotations

from maskfl.protocol.errors import MaskflError


class RoundFailedError(MaskflError):
    """The round must be abandoned: a phase timed out below count_min, masks tied, ..."""

    def __init__(self, message: str, *, round_id: int | None = None, phase: str | None = None):
        super().__init__(message)
        self.round_id = round_id
        self.phase = phase
