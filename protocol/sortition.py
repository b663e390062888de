"""Who does what in a round: the round-seed chain, tickets and role selection.

The round seed is a hash chain that anyone holding the history can audit::

    seed_r = BLAKE2b-256(person="maskfl/seed/v1",
                         seed_{r-1} (32 B) ‖ digest of global model r-1 (32 B) ‖ r (u64 LE))

A device's ticket for a task is a 64-bit number that only its key and the round
seed determine (Xaynet hashes an Ed25519 signature instead, which the signer can
re-randomise until it wins; a hash of the public key cannot be ground)::

    ticket = u64 LE of BLAKE2b-64(person="maskfl/ticket/v1", seed ‖ task ‖ public key)

with ``task`` the ASCII bytes ``b"sum"`` or ``b"update"`` (seed and key are both
32 bytes, so the concatenation is unambiguous). A device is a summer when its
sum ticket is below ``threshold(p_sum) = floor(p_sum·2^64)``, otherwise an
updater when its update ticket is below ``threshold(p_update)``; a summer never
also updates. The coordinator checks the very same function for every message.
It picks p_sum and p_update for each round from the devices alive
(:func:`probabilities_for_targets`) unless the configuration fixes them.

With ``g`` mask groups (round parameter ``groups``), a summer's group is a
second, domain-separated hash of the same two inputs, so neither the
coordinator nor the summer can choose it, and anyone can audit it::

    group = (u64 LE of BLAKE2b-64(person="maskfl/group/v1", seed ‖ public key)) mod g

(``g = 1``: every summer is in group 0; the bias of a 64-bit value modulo
``g <= 255`` is below 2^-56.)
"""

from __future__ import annotations

import hashlib
import math
from enum import StrEnum
from typing import Final

from maskfl.protocol.errors import ConfigError, LocalProtocolError

__all__ = [
    "MAX_GROUPS",
    "TICKET_SPACE",
    "Task",
    "default_groups",
    "group_of",
    "next_round_seed",
    "probabilities_for_targets",
    "select_task",
    "threshold",
    "ticket",
]

TICKET_SPACE: Final = 1 << 64
_SEED_PERSON: Final = b"maskfl/seed/v1"
_TICKET_PERSON: Final = b"maskfl/ticket/v1"
_GROUP_PERSON: Final = b"maskfl/group/v1"
MAX_GROUPS: Final = 255
"""The most mask groups a round may have (the group fits a u8; 255 groups need 255 summers)."""


class Task(StrEnum):
    """The role a device draws for a round."""

    SUM = "sum"
    UPDATE = "update"
    NONE = "none"


def _bytes32(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != 32:
        raise LocalProtocolError(f"{what} must be 32 bytes")
    return bytes(value)


def next_round_seed(prev_seed: bytes, prev_model_digest: bytes, round_id: int) -> bytes:
    """The seed of round ``round_id``: BLAKE2b-256 of the previous seed, model digest and id."""
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id < 1 << 64:
        raise LocalProtocolError(f"round id must be an integer in [0, 2^64), got {round_id!r}")
    h = hashlib.blake2b(digest_size=32, person=_SEED_PERSON)
    h.update(_bytes32(prev_seed, "the previous round seed"))
    h.update(_bytes32(prev_model_digest, "the previous model digest"))
    h.update(round_id.to_bytes(8, "little"))
    return h.digest()


def ticket(seed: bytes, task: Task | str, public_key: bytes) -> int:
    """The device's 64-bit ticket for ``task`` (sum or update) in the round of ``seed``."""
    try:
        kind = Task(task)
    except ValueError as exc:
        raise LocalProtocolError(f"no ticket for task {task!r}") from exc
    if kind is Task.NONE:
        raise LocalProtocolError("no ticket for task 'none'")
    h = hashlib.blake2b(digest_size=8, person=_TICKET_PERSON)
    h.update(_bytes32(seed, "the round seed"))
    h.update(kind.value.encode("ascii"))
    h.update(_bytes32(public_key, "the public key"))
    return int.from_bytes(h.digest(), "little")


def group_of(seed: bytes, public_key: bytes, groups: int) -> int:
    """The mask group (0 .. groups - 1) of the summer ``public_key`` in the round of ``seed``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_GROUPS:
        raise LocalProtocolError(f"groups must be an integer in [1, {MAX_GROUPS}], not {groups!r}")
    h = hashlib.blake2b(digest_size=8, person=_GROUP_PERSON)
    h.update(_bytes32(seed, "the round seed"))
    h.update(_bytes32(public_key, "the public key"))
    return int.from_bytes(h.digest(), "little") % groups


def default_groups(target_summers: int) -> int:
    """``masking.groups = "auto"``: ``max(1, target_summers // 3)``, at most MAX_GROUPS.

    Three summers per group in expectation, so a round at the target has at
    least two per group as a rule: a group's count is about Poisson(S/g), and
    one with none fails the round (about g·e^(-S/g) of rounds: 10 % for S = 6,
    g = 2; 15 % for S = 9, g = 3, against 27 % for S = 4, g = 2 with two per
    group). The default sum target (3) gives g = 1, today's protocol.
    """
    if isinstance(target_summers, bool) or not isinstance(target_summers, int):
        raise ConfigError(f"target_summers must be an integer, got {target_summers!r}")
    return min(MAX_GROUPS, max(1, target_summers // 3))


def threshold(p: float) -> int:
    """``floor(p·2^64)``, exact, with ``p`` clamped to [0, 1]: tickets below it win.

    ``p = 1`` gives ``2^64``, above every ticket; ``p = 0`` gives 0, below all.
    A probability that is not a number raises :class:`ConfigError`.
    """
    if isinstance(p, bool) or not isinstance(p, int | float) or math.isnan(p):
        raise ConfigError(f"a probability must be a number in [0, 1], got {p!r}", field="p")
    clamped = min(max(float(p), 0.0), 1.0)
    # Scaling a float by a power of two is exact (no rounding), and int() of the
    # product is its floor: the same as floor(Fraction(p) * 2^64), without the Fraction.
    return int(clamped * float(TICKET_SPACE))


def select_task(seed: bytes, public_key: bytes, p_sum: float, p_update: float) -> Task:
    """The device's role this round: sum first; only a non-summer can be an updater."""
    if ticket(seed, Task.SUM, public_key) < threshold(p_sum):
        return Task.SUM
    if ticket(seed, Task.UPDATE, public_key) < threshold(p_update):
        return Task.UPDATE
    return Task.NONE


def probabilities_for_targets(
    alive: int, target_summers: int, target_updaters: int, min_updaters: int = 0
) -> tuple[float, float]:
    """``(p_sum, p_update)`` for a round among the ``alive`` devices the coordinator knows.

    Summers are drawn first, from every device alive; updaters from the rest. With
    ``n = alive``, ``S = target_summers``, ``U = target_updaters`` and ``R =
    min_updaters`` (the updates the round cannot do without)::

        s        = min(S, n - R), but at least 1 (0 when S = 0)   # expected summers
        p_sum    = s / n
        u        = min(U, n - s)                                  # expected updaters
        p_update = u / (n - s)                                    # 1 when n = s

    So the expected number of summers is the sum target, whatever the update
    target, as long as the fleet leaves room for ``R`` updaters beside them; a
    fleet too small for that still draws one summer in expectation. Updaters
    aim at their target among the expected non-summers, all of them when fewer
    are alive. Examples: 10 alive, S = 3, U = 20, R = 3: p_sum = 0.3 (no summer
    in 0.7^10 = 2.8 % of rounds), p_update = 1; 1000 alive, S = 10, U = 100:
    p_sum = 0.01, p_update = 100/990.

    ``n = 0`` (no device heard from yet): every device takes part and the roles
    are split in proportion to the targets, ``p_sum = S / (S + U)``, ``p_update
    = 1``. Results are clamped to [0, 1]. The counts are binomial around these
    expectations: keep the targets above the phases' ``count_min`` with a margin.
    Negative inputs raise :class:`ConfigError`.
    """
    for name, value in (
        ("alive", alive),
        ("target_summers", target_summers),
        ("target_updaters", target_updaters),
        ("min_updaters", min_updaters),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}", field=name)
    wanted = target_summers + target_updaters
    if wanted == 0:
        return 0.0, 0.0
    if alive == 0:
        return _clamp(target_summers / wanted), 1.0
    summers = min(target_summers, max(alive - min_updaters, min(target_summers, 1)))
    rest = alive - summers
    if rest == 0:
        return _clamp(summers / alive), 1.0
    return _clamp(summers / alive), _clamp(min(target_updaters, rest) / rest)


def _clamp(p: float) -> float:
    return min(max(p, 0.0), 1.0)
