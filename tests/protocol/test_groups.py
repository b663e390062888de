"""Mask groups: a coalition of the coordinator and one summer unmasks nobody when g > 1.

The coalition is simulated as it would act for real: it holds every Update as
received (masked words and sealed seeds), the sum dictionary, and the private
ephemeral key of one summer. It opens every seed it can and subtracts those
masks from each update. With g = 1 that recovers each update exactly; with
g = 2 the sub-mask of the other group is still on, and what it gets is noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

from maskfl.protocol.crypto import EphemeralKeyPair, new_seed, open_seed, seal_seed
from maskfl.protocol.errors import CryptoError, LocalProtocolError, RemoteProtocolError
from maskfl.protocol.identity import Identity
from maskfl.protocol.masking import (
    MaskConfig,
    aggregate_mask,
    decode_aggregate,
    encode_update,
    mask_stream,
    mask_update,
    unmask,
    update_words,
)
from maskfl.protocol.messages import SumDict, decode_message, encode_message, open_sum_dict
from maskfl.protocol.sortition import MAX_GROUPS, default_groups, group_of
from maskfl.testing.fleet import SimFleet

CFG = MaskConfig(1.0, 16, 32)
M = 64
SEED = bytes(range(32))
FLEET = SimFleet("groupfleet")


@dataclass
class Summer:
    public_key: bytes
    keys: EphemeralKeyPair
    group: int


@dataclass
class SentUpdate:
    delta: np.ndarray
    weight: float
    words: np.ndarray
    sealed: dict[bytes, bytes]


def summers_in_groups(groups: int, per_group: int) -> list[Summer]:
    """Summers whose keys hash into each group ``per_group`` times (as sortition would)."""
    out: list[Summer] = []
    counts = [0] * groups
    while min(counts) < per_group:
        ident = FLEET.identity(f"s{len(out)}")
        g = group_of(SEED, ident.public_key, groups)
        if counts[g] < per_group:
            counts[g] += 1
            out.append(Summer(ident.public_key, EphemeralKeyPair.generate(), g))
    return out


def updaters_send(summers: list[Summer], groups: int, n: int) -> list[SentUpdate]:
    """What honest updaters do: one fresh seed per group, each sealed to its group only."""
    rng = np.random.default_rng(7)
    sent = []
    for _ in range(n):
        delta = rng.uniform(-0.9, 0.9, M).astype(np.float32)
        weight = float(rng.uniform(0.2, 1.0))
        seeds = [new_seed() for _ in range(groups)]
        words = mask_update(delta, weight, seeds, CFG)
        sealed = {s.public_key: seal_seed(seeds[s.group], s.keys.public_key) for s in summers}
        sent.append(SentUpdate(delta, weight, words, sealed))
    return sent


def coalition_unmasks(update: SentUpdate, summer: Summer) -> np.ndarray:
    """The coordinator with one summer's ephemeral key: remove every mask it can open."""
    seed = open_seed(update.sealed[summer.public_key], summer.keys.private_key)
    plain = unmask(update.words, mask_stream(seed, update_words(M), CFG.word_bits))
    values, weight_sum = decode_aggregate(plain, 1, CFG)
    result: np.ndarray = values / weight_sum
    return result


def test_with_one_group_the_coordinator_and_one_summer_recover_every_update() -> None:
    summers = summers_in_groups(1, 3)
    sent = updaters_send(summers, 1, 5)
    corrupt = summers[0]
    for update in sent:
        recovered = coalition_unmasks(update, corrupt)
        np.testing.assert_allclose(recovered, update.delta, atol=1e-4)


@pytest.mark.parametrize("groups", [2, 3])
def test_with_groups_the_coordinator_and_one_summer_recover_no_update(groups: int) -> None:
    summers = summers_in_groups(groups, 2)
    sent = updaters_send(summers, groups, 5)
    for corrupt in summers:  # whichever summer the coordinator holds
        for update in sent:
            # It can open exactly its own group's seed; the other seeds are not sealed to it.
            with pytest.raises(CryptoError):
                other = next(s for s in summers if s.group != corrupt.group)
                open_seed(update.sealed[other.public_key], corrupt.keys.private_key)
            seed = open_seed(update.sealed[corrupt.public_key], corrupt.keys.private_key)
            plain = unmask(update.words, mask_stream(seed, update_words(M), CFG.word_bits))
            truth = encode_update(update.delta, update.weight, CFG)
            # A ChaCha20 sub-mask is still on: the words match the encoding nowhere
            # (a 32-bit word agrees by chance with probability 2^-32).
            assert np.count_nonzero(plain == truth) == 0
            with np.errstate(all="ignore"):
                values, weight_sum = decode_aggregate(plain, 1, CFG)
                guess = values / weight_sum
            assert not np.allclose(guess, update.delta, atol=0.1)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_one_agreed_mask_per_group_unmasks_the_sum(groups: int) -> None:
    summers = summers_in_groups(groups, 2)
    sent = updaters_send(summers, groups, 4)
    total = np.zeros(update_words(M), dtype=np.uint32)
    for update in sent:
        total += update.words
    masks = []
    for g in range(groups):
        for summer in (s for s in summers if s.group == g):
            seeds = [open_seed(u.sealed[summer.public_key], summer.keys.private_key) for u in sent]
            masks.append(aggregate_mask(seeds, update_words(M), CFG.word_bits))
        # both summers of a group publish the same aggregate (what the vote relies on)
        assert np.array_equal(masks[-1], masks[-2])
    group_masks = masks[::2]
    plain = unmask(total, sum(group_masks, np.zeros_like(total)))
    values, weight_sum = decode_aggregate(plain, len(sent), CFG)
    expected = sum(u.delta.astype(np.float64) * u.weight for u in sent) / sum(
        u.weight for u in sent
    )
    np.testing.assert_allclose(values / weight_sum, expected, atol=1e-4)
    if groups > 1:  # any one group's mask alone leaves the sum masked
        alone = unmask(total, group_masks[0])
        assert not np.array_equal(alone, plain)


def test_group_assignment_is_public_and_spreads() -> None:
    keys = [FLEET.identity(f"d{i}").public_key for i in range(300)]
    for g in (1, 2, 5):
        groups = [group_of(SEED, k, g) for k in keys]
        assert groups == [group_of(SEED, k, g) for k in keys]  # anyone recomputes it
        counts = np.bincount(groups, minlength=g)
        assert counts.min() > 300 / g * 0.6, counts
    assert {group_of(SEED, k, 1) for k in keys} == {0}
    other_seed = bytes(32)
    assert [group_of(other_seed, k, 2) for k in keys] != [group_of(SEED, k, 2) for k in keys]
    for bad in (0, MAX_GROUPS + 1, True):
        with pytest.raises(LocalProtocolError):
            group_of(SEED, keys[0], bad)


def test_default_groups_keep_two_summers_per_group() -> None:
    assert [default_groups(s) for s in (1, 3, 5, 6, 9, 10, 30)] == [1, 1, 1, 2, 3, 3, 10]
    for s in range(1, 100):
        assert s / default_groups(s) >= 2 or default_groups(s) == 1


def _sum_dict(groups: int, claimed: list[int] | None = None) -> tuple[SumDict, list[bytes]]:
    from maskfl.protocol.messages import Sum

    idents: list[Identity] = []
    while len(idents) < 2 * groups:
        ident = FLEET.identity(f"sd{len(idents)}")
        if group_of(SEED, ident.public_key, groups) == len(idents) % groups:
            idents.append(ident)
    entries = [
        encode_message(
            Sum(i.certificate, EphemeralKeyPair.generate().public_key),
            fleet=FLEET.fleet,
            round_id=1,
            signing_key=i.signing_key,
        )
        for i in idents
    ]
    real = [group_of(SEED, i.public_key, groups) for i in idents]
    return SumDict(tuple(entries), tuple(claimed if claimed is not None else real)), entries


def _open(sum_dict: SumDict, groups: int) -> int:
    coordinator = FLEET.identity("coordinator-x")
    raw = encode_message(
        sum_dict, fleet=FLEET.fleet, round_id=1, signing_key=coordinator.signing_key
    )
    body = decode_message(raw, max_size=len(raw)).body
    assert isinstance(body, SumDict)
    return len(
        open_sum_dict(
            body,
            fleet=FLEET.fleet,
            round_id=1,
            ca_public_key=FLEET.ca_public_key,
            now=time.time(),
            revocations=None,
            groups=groups,
            round_seed=SEED,
        )
    )


def test_updaters_check_the_groups_of_the_sum_dictionary() -> None:
    good, _ = _sum_dict(2)
    assert _open(good, 2) == 4
    # The coordinator cannot move a summer to another group ...
    moved = [1 - g for g in good.groups]
    with pytest.raises(RemoteProtocolError, match="ticket says"):
        _open(SumDict(good.entries, tuple(moved)), 2)
    # ... nor publish a dictionary with a group left without a summer.
    only0 = [i for i, g in enumerate(good.groups) if g == 0]
    partial = SumDict(tuple(good.entries[i] for i in only0), tuple(0 for _ in only0))
    with pytest.raises(RemoteProtocolError, match="no summer in group"):
        _open(partial, 2)


def test_a_participant_of_another_format_gets_a_version_error_not_silence() -> None:
    """Format 2 carries the groups; a format-1 message (an old agent's, or an old
    coordinator's round parameters) is refused with both versions named."""
    from maskfl.protocol.errors import Reason
    from maskfl.protocol.messages import FORMAT_VERSION, Sum

    ident = FLEET.identity("old")
    raw = bytearray(
        encode_message(
            Sum(ident.certificate, bytes(32)),
            fleet=FLEET.fleet,
            round_id=1,
            signing_key=ident.signing_key,
        )
    )
    assert FORMAT_VERSION == raw[4] == 2
    for old_or_new, words in ((1, "older"), (3, "newer")):
        raw[4] = old_or_new
        with pytest.raises(RemoteProtocolError) as info:
            decode_message(bytes(raw), max_size=4096)
        assert info.value.reason is Reason.MALFORMED
        text = str(info.value)
        assert f"message format {old_or_new} is not supported" in text
        assert "speaks format 2" in text and words in text
