"""Round-seed chain, tickets, thresholds, role selection and target probabilities."""

from __future__ import annotations

import hashlib
import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.errors import ConfigError, LocalProtocolError
from maskfl.protocol.sortition import (
    TICKET_SPACE,
    Task,
    next_round_seed,
    probabilities_for_targets,
    select_task,
    threshold,
    ticket,
)

b32 = st.binary(min_size=32, max_size=32)


def test_round_seed_is_the_documented_blake2b_chain() -> None:
    prev, model = bytes(range(32)), hashlib.sha256(b"model").digest()
    expected = hashlib.blake2b(
        prev + model + (7).to_bytes(8, "little"), digest_size=32, person=b"maskfl/seed/v1"
    ).digest()
    assert next_round_seed(prev, model, 7) == expected
    # Every input matters.
    assert next_round_seed(prev, model, 8) != expected
    assert next_round_seed(model, model, 7) != expected
    assert next_round_seed(prev, prev, 7) != expected


def test_round_seed_chain_is_auditable() -> None:
    seed = bytes(32)
    history = []
    for round_id in range(1, 6):
        model_digest = hashlib.sha256(f"model {round_id - 1}".encode()).digest()
        seed = next_round_seed(seed, model_digest, round_id)
        history.append((model_digest, seed))
    replay = bytes(32)
    for round_id, (model_digest, seed) in enumerate(history, start=1):
        replay = next_round_seed(replay, model_digest, round_id)
        assert replay == seed


def test_round_seed_rejects_bad_input() -> None:
    with pytest.raises(LocalProtocolError):
        next_round_seed(bytes(31), bytes(32), 1)
    with pytest.raises(LocalProtocolError):
        next_round_seed(bytes(32), bytes(33), 1)
    for bad in (-1, 2**64, True):
        with pytest.raises(LocalProtocolError):
            next_round_seed(bytes(32), bytes(32), bad)


def test_ticket_is_the_documented_hash() -> None:
    seed, pk = b"\x11" * 32, b"\x22" * 32
    for task in (Task.SUM, Task.UPDATE):
        h = hashlib.blake2b(
            seed + task.value.encode() + pk, digest_size=8, person=b"maskfl/ticket/v1"
        )
        assert ticket(seed, task, pk) == int.from_bytes(h.digest(), "little")
    assert ticket(seed, "sum", pk) == ticket(seed, Task.SUM, pk)
    assert ticket(seed, Task.SUM, pk) != ticket(seed, Task.UPDATE, pk)


@settings(max_examples=50)
@given(seed=b32, pk=b32)
def test_tickets_are_u64_and_depend_on_seed_and_key(seed: bytes, pk: bytes) -> None:
    value = ticket(seed, Task.SUM, pk)
    assert 0 <= value < TICKET_SPACE
    other_seed = bytes([seed[0] ^ 1]) + seed[1:]
    other_pk = bytes([pk[0] ^ 1]) + pk[1:]
    assert ticket(other_seed, Task.SUM, pk) != value
    assert ticket(seed, Task.SUM, other_pk) != value


def test_ticket_rejects_bad_input() -> None:
    with pytest.raises(LocalProtocolError):
        ticket(bytes(32), Task.NONE, bytes(32))
    with pytest.raises(LocalProtocolError):
        ticket(bytes(32), "train", bytes(32))
    with pytest.raises(LocalProtocolError):
        ticket(bytes(32), Task.SUM, bytes(31))
    with pytest.raises(LocalProtocolError):
        ticket(b"short", Task.SUM, bytes(32))


def test_threshold_is_exact_and_clamped() -> None:
    assert threshold(0.0) == 0
    assert threshold(1.0) == TICKET_SPACE
    assert threshold(0.5) == 2**63
    assert threshold(1 / 3) == math.floor(Fraction(1 / 3) * 2**64)
    assert threshold(-0.5) == 0
    assert threshold(7.0) == TICKET_SPACE
    assert threshold(math.inf) == TICKET_SPACE
    assert threshold(1) == TICKET_SPACE
    for bad in (math.nan, "0.5", None):
        with pytest.raises(ConfigError) as info:
            threshold(bad)  # type: ignore[arg-type]
        assert info.value.field == "p"


@settings(max_examples=100)
@given(p=st.floats(0.0, 1.0), q=st.floats(0.0, 1.0))
def test_threshold_is_monotone(p: float, q: float) -> None:
    if p <= q:
        assert threshold(p) <= threshold(q)


def test_select_task_extremes() -> None:
    seed = b"\x05" * 32
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(50)]
    assert {select_task(seed, k, 1.0, 1.0) for k in keys} == {Task.SUM}
    assert {select_task(seed, k, 0.0, 1.0) for k in keys} == {Task.UPDATE}
    assert {select_task(seed, k, 0.0, 0.0) for k in keys} == {Task.NONE}


def test_summers_never_update_and_rates_match() -> None:
    seed = hashlib.sha256(b"round").digest()
    keys = [hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(4000)]
    p_sum, p_update = 0.1, 0.5
    tasks = [select_task(seed, k, p_sum, p_update) for k in keys]
    for key, task in zip(keys, tasks, strict=True):
        is_summer = ticket(seed, Task.SUM, key) < threshold(p_sum)
        assert (task is Task.SUM) == is_summer  # a summer is never anything else
        if not is_summer:
            wins = ticket(seed, Task.UPDATE, key) < threshold(p_update)
            assert (task is Task.UPDATE) == wins
    summers = tasks.count(Task.SUM)
    updaters = tasks.count(Task.UPDATE)
    # Binomial, 6 standard deviations: fixed keys make this deterministic anyway.
    assert abs(summers - 400) < 6 * math.sqrt(4000 * 0.1 * 0.9)
    assert abs(updaters - 1800) < 6 * math.sqrt(3600 * 0.25)


def test_probabilities_for_a_large_fleet_hit_the_targets() -> None:
    p_sum, p_update = probabilities_for_targets(1000, 10, 100)
    assert p_sum == pytest.approx(0.01)
    assert 1000 * p_sum == pytest.approx(10)
    assert 1000 * (1 - p_sum) * p_update == pytest.approx(100)


def test_probabilities_aim_at_the_sum_target_whatever_the_update_target() -> None:
    # The case the independent check found: 10 alive, update target 20. p_sum was
    # 3/23 (no summer in 25 % of rounds); now 3/10 (no summer in 0.7^10 = 2.8 %).
    assert probabilities_for_targets(10, 3, 20, 3) == (0.3, 1.0)
    assert probabilities_for_targets(10, 3, 20) == (0.3, 1.0)
    assert probabilities_for_targets(10, 3, 5, 3) == (0.3, 5 / 7)
    # Room for the update floor first: 4 alive, 3 updates needed, one summer aimed at.
    assert probabilities_for_targets(4, 3, 10, 3) == (0.25, 1.0)
    assert probabilities_for_targets(2, 3, 10, 3) == (0.5, 1.0)  # too small: still one
    assert probabilities_for_targets(1, 3, 10, 3) == (1.0, 1.0)
    assert probabilities_for_targets(0, 3, 9) == (0.25, 1.0)  # nothing known yet
    assert probabilities_for_targets(100, 0, 0) == (0.0, 0.0)
    assert probabilities_for_targets(100, 5, 0) == (0.05, 0.0)
    assert probabilities_for_targets(100, 0, 5) == (0.0, 0.05)


@settings(max_examples=300)
@given(
    alive=st.integers(0, 10**6),
    summers=st.integers(0, 10**4),
    updaters=st.integers(0, 10**5),
    floor=st.integers(0, 100),
)
def test_probabilities_follow_the_documented_rule(
    alive: int, summers: int, updaters: int, floor: int
) -> None:
    p_sum, p_update = probabilities_for_targets(alive, summers, updaters, floor)
    assert 0.0 <= p_sum <= 1.0
    assert 0.0 <= p_update <= 1.0
    if alive == 0 or summers + updaters == 0:
        return
    s = min(summers, max(alive - floor, min(summers, 1)))
    assert alive * p_sum == pytest.approx(s)
    if alive > s:
        assert (alive - s) * p_update == pytest.approx(min(updaters, alive - s))
    if alive >= summers + floor:  # room for both: the sum target, whatever the update target
        assert alive * p_sum == pytest.approx(summers)


@settings(max_examples=100)
@given(summers=st.integers(1, 100), updaters=st.integers(1, 1000), floor=st.integers(0, 10))
def test_expected_summers_never_drop_as_the_fleet_grows(
    summers: int, updaters: int, floor: int
) -> None:
    expected = [
        n * probabilities_for_targets(n, summers, updaters, floor)[0] for n in range(1, 300)
    ]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(expected))


def _binomial_bounds(n: int, p: float, tail: float) -> tuple[int, int]:
    """The smallest ``low`` and ``high`` with P(X < low) < tail and P(X > high) < tail
    for X ~ Binomial(n, p) (the pmf in log space: no overflow for n in the thousands)."""
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(n + 1)
    ]
    pmf = [math.exp(v) for v in log_pmf]
    below, low = 0.0, 0
    while below + pmf[low] < tail:
        below += pmf[low]
        low += 1
    above, high = 0.0, n
    while above + pmf[high] < tail:
        above += pmf[high]
        high -= 1
    return low, high


def test_rounds_without_a_summer_follow_the_binomial_law() -> None:
    """10 alive devices, sum target 3, update target 20: over 4000 simulated rounds
    (chained seeds, fixed keys, select_task as devices and coordinator run it) the
    rounds without a summer stay within the binomial law of the documented
    P(no summer) = (1 - p_sum)^10, two-sided at a 1e-6 tail each way."""
    alive, rounds = 10, 4000
    p_sum, p_update = probabilities_for_targets(alive, 3, 20, 3)
    assert p_sum == pytest.approx(0.3)
    keys = [hashlib.sha256(b"device-%d" % k).digest() for k in range(alive)]
    seed, model = bytes(32), hashlib.sha256(b"model").digest()
    empty = 0
    for r in range(1, rounds + 1):
        seed = next_round_seed(seed, model, r)
        tasks = [select_task(seed, key, p_sum, p_update) for key in keys]
        empty += Task.SUM not in tasks
    q = (1 - p_sum) ** alive  # 0.0282
    low, high = _binomial_bounds(rounds, q, 1e-6)
    assert low <= empty <= high, (empty, low, high, rounds * q)
    # The old rule (p_sum = 3/23) leaves 4000 * 0.248 = 993 rounds without a summer.
    assert high < rounds * (1 - 3 / 23) ** alive


@pytest.mark.parametrize("field", ["alive", "target_summers", "target_updaters", "min_updaters"])
def test_probabilities_reject_negative_counts(field: str) -> None:
    args = {"alive": 10, "target_summers": 1, "target_updaters": 3, "min_updaters": 0, field: -1}
    with pytest.raises(ConfigError) as info:
        probabilities_for_targets(**args)
    assert info.value.field == field


@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_threshold_is_the_exact_floor_of_p_times_2_to_64(p: float) -> None:
    assert threshold(p) == math.floor(Fraction(p) * TICKET_SPACE)
