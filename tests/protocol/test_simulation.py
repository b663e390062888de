"""A whole PET round in process, with only the protocol core: no broker, no coordinator.

3 summers and 50 updaters are drawn by sortition; every updater masks a clipped,
weighted update of M = 100,000 elements and seals its seed to every summer; the
"coordinator" adds the masked words; one summer drops out before sum2; the other
two send the aggregate mask; the coordinator takes the mask most summers agree
on, unmasks, decodes and recovers the weighted mean within ``error_bound``.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from maskfl.protocol.crypto import EphemeralKeyPair, digest, open_seed, seal_seed
from maskfl.protocol.masking import (
    MaskConfig,
    WordBits,
    Words,
    add_words,
    aggregate_mask,
    decode_aggregate,
    error_bound,
    mask_update,
    unmask,
    update_words,
)
from maskfl.protocol.phases import Phase, PhaseWindow, Verdict, Window
from maskfl.protocol.round import Event, move
from maskfl.protocol.sortition import Task, next_round_seed, select_task

M = 100_000
SUMMERS = 3
UPDATERS = 50
P_SUM, P_UPDATE = 0.05, 1.0


def _h(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


@dataclass
class Updater:
    public_key: bytes
    delta: npt.NDArray[np.float32]
    weight: float
    seed: bytes


def _draw_roles(round_seed: bytes) -> tuple[list[bytes], list[bytes]]:
    """Device keys, in order, until sortition gave 3 summers and 50 updaters."""
    summers: list[bytes] = []
    updaters: list[bytes] = []
    i = 0
    while len(summers) < SUMMERS or len(updaters) < UPDATERS:
        pk = _h("device", i)
        i += 1
        task = select_task(round_seed, pk, P_SUM, P_UPDATE)
        if task is Task.SUM and len(summers) < SUMMERS:
            summers.append(pk)
        elif task is Task.UPDATE and len(updaters) < UPDATERS:
            updaters.append(pk)
    return summers, updaters


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, seconds: float = 0.1) -> float:
        self.now += seconds
        return self.now


def _run_round(bits: WordBits, rng_seed: int) -> None:  # noqa: PLR0915 a whole round in one place, as the spec reads
    rng = np.random.default_rng(rng_seed)
    cfg = MaskConfig(bound=0.5, n_max=100, word_bits=bits)
    clock = Clock()
    phase = Phase.IDLE
    round_seed = next_round_seed(bytes(32), digest(b"initial model"), 1)
    summer_keys, updater_keys = _draw_roles(round_seed)

    # sum: each summer publishes a fresh ephemeral key; the phase closes at count_max.
    phase = move(phase, Event.STARTED).target
    assert phase is Phase.SUM
    timer = Window(PhaseWindow(2, SUMMERS, 1.0, 30.0), clock.now)
    ephemeral: dict[bytes, EphemeralKeyPair] = {}
    for pk in summer_keys:
        assert select_task(round_seed, pk, P_SUM, P_UPDATE) is Task.SUM  # coordinator's check
        ephemeral[pk] = EphemeralKeyPair.from_private(_h("ephemeral", rng_seed, pk))
        timer.accepted()
        assert timer.decide(clock.tick()) is (Verdict.CLOSE if timer.full else Verdict.OPEN)
    sum_dict = {pk: pair.public_key for pk, pair in ephemeral.items()}

    # update: mask, seal the seed to every summer; the coordinator adds the words.
    phase = move(phase, Event.CLOSED).target
    assert phase is Phase.UPDATE
    timer = Window(PhaseWindow(3, UPDATERS, 5.0, 60.0), clock.now)
    aggregate: Words = np.zeros(update_words(M), dtype=cfg.dtype)
    seed_dict: dict[bytes, list[bytes]] = {pk: [] for pk in sum_dict}
    updaters = []
    for pk in updater_keys:
        assert select_task(round_seed, pk, P_SUM, P_UPDATE) is Task.UPDATE
        delta = rng.normal(0.0, 0.2, M).astype(np.float32)
        delta[rng.integers(0, M, 100)] *= 50  # some elements far outside the bound
        updater = Updater(pk, delta, float(rng.uniform(0.05, 1.0)), _h("seed", rng_seed, pk))
        updaters.append(updater)
        masked = mask_update(updater.delta, updater.weight, updater.seed, cfg)
        sealed = {summer: seal_seed(updater.seed, epk) for summer, epk in sum_dict.items()}
        add_words(aggregate, masked)
        for summer, box in sealed.items():
            seed_dict[summer].append(box)
        timer.accepted()
    assert timer.decide(clock.tick()) is Verdict.CLOSE

    # sum2: the third summer has dropped out; the other two send their aggregate masks.
    phase = move(phase, Event.CLOSED).target
    assert phase is Phase.SUM2
    timer = Window(PhaseWindow(1, SUMMERS, 2.0, 60.0), clock.now)
    votes: Counter[bytes] = Counter()
    masks: dict[bytes, Words] = {}
    for pk in summer_keys[:2]:
        private = ephemeral[pk].private_key
        seeds = [open_seed(box, private) for box in seed_dict[pk]]
        mask = aggregate_mask(seeds, update_words(M), bits)
        key = digest(mask.data)
        votes[key] += 1
        masks[key] = mask
        timer.accepted()
        assert timer.decide(clock.tick(0.1)) is Verdict.OPEN  # before time_min
    assert timer.decide(clock.tick(5.0)) is Verdict.CLOSE

    # unmask: the mask with the most votes (here the only one: honest summers agree).
    phase = move(phase, Event.CLOSED).target
    assert phase is Phase.UNMASK
    (best, count), *rest = votes.most_common()
    assert count == 2
    assert rest == []
    weighted_sum, weight_sum = decode_aggregate(unmask(aggregate, masks[best]), UPDATERS, cfg)
    mean = weighted_sum / weight_sum
    phase = move(phase, Event.DONE).target
    assert phase is Phase.IDLE

    clipped = [np.clip(u.delta.astype(np.float64), -cfg.bound, cfg.bound) for u in updaters]
    weights = np.array([u.weight for u in updaters])
    exact = sum(a * c for a, c in zip(weights, clipped, strict=True)) / weights.sum()
    exact_weight = math.fsum(weights)  # correctly rounded
    weight_slack = UPDATERS / (2 * cfg.weight_scale) + 4 * sys.float_info.epsilon * exact_weight
    assert abs(weight_sum - exact_weight) <= weight_slack
    bound = error_bound(UPDATERS, weight_sum, cfg)
    # The float64 reference itself is off by a few ulps per term.
    reference_slack = 4 * UPDATERS * sys.float_info.epsilon * cfg.bound / weights.sum()
    error = float(np.abs(mean - exact).max())
    assert error <= bound + reference_slack, (error, bound)
    assert bound < (1e-4 if bits == 32 else 1e-13)
    # The unmasked mean differs from any single update: the aggregate hid them.
    assert float(np.abs(mean - clipped[0]).max()) > 0.1

    # Any single honest summer suffices, including the one that dropped out.
    late = summer_keys[2]
    late_seeds = [open_seed(box, ephemeral[late].private_key) for box in seed_dict[late]]
    assert np.array_equal(aggregate_mask(late_seeds, update_words(M), bits), masks[best])


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("rng_seed", [1, 2])
def test_round_recovers_the_weighted_mean(bits: WordBits, rng_seed: int) -> None:
    _run_round(bits, rng_seed)


def test_a_wrong_mask_does_not_decode_to_the_mean() -> None:
    """The check above can fail: a mask missing one seed leaves garbage, not the mean."""
    cfg = MaskConfig(bound=0.5, n_max=100, word_bits=32)
    rng = np.random.default_rng(3)
    seeds = [_h("s", i) for i in range(5)]
    aggregate: Words = np.zeros(update_words(1000), dtype=cfg.dtype)
    for seed in seeds:
        add_words(aggregate, mask_update(rng.normal(0, 0.1, 1000), 1.0, seed, cfg))
    good, _ = decode_aggregate(
        unmask(aggregate, aggregate_mask(seeds, update_words(1000), 32)), 5, cfg
    )
    bad, _ = decode_aggregate(
        unmask(aggregate, aggregate_mask(seeds[:4], update_words(1000), 32)), 5, cfg
    )
    assert float(np.abs(good).max()) < 5 * cfg.bound
    assert float(np.abs(bad).max()) > 20 * cfg.bound  # uniform over ±n_max·B
