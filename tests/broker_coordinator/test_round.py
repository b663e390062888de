"""Full rounds against a real mosquitto with protocol-level simulated participants."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from maskfl.testing.broker import Mosquitto
from maskfl.testing.participants import (
    Behaviour,
    SimParticipant,
    expected_mean,
    start_all,
    stop_all,
    wait_for,
)
from tests.broker_coordinator.support import fixed_delta, make_setup, running_coordinator, trained

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_round_publishes_the_weighted_mean(tmp_path, mosquitto: Mosquitto) -> None:
    setup = make_setup(tmp_path, mosquitto.port, summers=3, updaters=5)
    ca = setup.fleet.ca_public_key
    parts = [
        SimParticipant(i, ca_public_key=ca, host=mosquitto.host, port=mosquitto.port)
        for i in setup.summers
    ] + [
        SimParticipant(
            i,
            ca_public_key=ca,
            host=mosquitto.host,
            port=mosquitto.port,
            behaviour=Behaviour(delta=fixed_delta(k)),
        )
        for k, i in enumerate(setup.updaters)
    ]
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            assert coordinator.runner is not None
        model = trained(parts[0])[0]
        updaters = parts[3:]
        expected = setup.initial + expected_mean([p.sent[1] for p in updaters], 1.0)
        metrics = dict(model.metrics)
        assert metrics["updates"] == 5
        assert metrics["dropped"] == 0
        assert model.version == 1
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
        for p in parts:
            assert all(r.accepted for r in p.receipts), [r for r in p.receipts if not r.accepted]
            assert not p.errors
        assert sum(len(p.receipts) for p in parts) == 3 + 5 + 3
    finally:
        await stop_all(parts)


def _participants(setup, host, port, behaviours):  # type: ignore[no-untyped-def]
    ca = setup.fleet.ca_public_key
    out = [
        SimParticipant(
            i, ca_public_key=ca, host=host, port=port, behaviour=behaviours.get(i.device_id)
        )
        for i in setup.summers
    ]
    for k, i in enumerate(setup.updaters):
        b = behaviours.get(i.device_id) or Behaviour()
        if b.delta is None:
            b.delta = fixed_delta(k)
        out.append(SimParticipant(i, ca_public_key=ca, host=host, port=port, behaviour=b))
    return out


async def test_summer_dropout_and_late_updaters(tmp_path, mosquitto: Mosquitto) -> None:
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=3,
        updaters=5,
        pet={
            "update": {"count_min": 3, "count_max": 5, "time_min_s": 1.5, "time_max_s": 30.0},
            "sum2": {"count_min": 2, "count_max": 3, "time_min_s": 1.0},
            "max_rounds": 2,
            "round_pause_s": 30.0,
        },
    )
    behaviours = {
        setup.summers[0].device_id: Behaviour(skip_sum2=True),
        setup.updaters[3].device_id: Behaviour(update_delay_s=0.5),
        setup.updaters[4].device_id: Behaviour(update_delay_s=4.0),
    }
    parts = _participants(setup, mosquitto.host, mosquitto.port, behaviours)
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path):
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            late = parts[-1]
            await wait_for(lambda: bool(late.receipts), 30, "the late updater's receipt")
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        included = [p for p in parts[3:] if any(r.accepted for r in p.receipts)]
        assert len(included) == 4
        assert [r.reason for r in late.receipts] == ["phase_closed"]
        assert metrics["updates"] == 4 and metrics["sum2"] == 2
        expected = setup.initial + expected_mean([p.sent[1] for p in included], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
    finally:
        await stop_all(parts)


@pytest.mark.parametrize("words", ["memory", "file"])
async def test_update_whose_seed_does_not_open_is_dropped(
    tmp_path, mosquitto: Mosquitto, words: str
) -> None:
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=2,
        updaters=4,
        extra={"storage": {"dir": "state", "update_words": words}},
    )
    bad = setup.updaters[1].device_id
    parts = _participants(
        setup, mosquitto.host, mosquitto.port, {bad: Behaviour(corrupt_seed_for_all_summers=True)}
    )
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path):
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        assert metrics["dropped"] == 1 and metrics["updates"] == 3
        good = [p for p in parts[2:] if p.device != bad]
        expected = setup.initial + expected_mean([p.sent[1] for p in good], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
    finally:
        await stop_all(parts)


async def test_several_rounds_chain_models(tmp_path, mosquitto: Mosquitto) -> None:
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=3,
        updaters=5,
        pet={
            "max_rounds": 5,
            "sum": {"count_min": 1, "count_max": 10, "time_min_s": 0.5},
            # Later rounds draw roles at p_sum = 0.5 among eight devices: about one in
            # seven leaves fewer updaters than the privacy floor (3) and must fail fast.
            "update": {"count_min": 3, "count_max": 10, "time_min_s": 0.5, "time_max_s": 5.0},
            "sum2": {"count_min": 1, "count_max": 10, "time_min_s": 0.2},
        },
    )
    parts = _participants(setup, mosquitto.host, mosquitto.port, {})
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(
                lambda: max((m.version for m in parts[0].models), default=0) >= 2,
                60,
                "two global models",
            )
            assert coordinator.runner is not None
        versions = [m.version for m in trained(parts[0])]
        assert versions[:2] == [1, 2]
        first, second = trained(parts[0])[:2]
        assert second.previous_digest == first.digest
    finally:
        await stop_all(parts)


async def test_chunked_updates_and_masks(tmp_path, mosquitto: Mosquitto) -> None:
    m = 50_000
    setup = make_setup(
        tmp_path, mosquitto.port, summers=2, updaters=4, length=m, pet={"chunk_size": 16384}
    )
    parts = _participants(setup, mosquitto.host, mosquitto.port, {})
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            assert coordinator.ingest is not None
            assert coordinator.ingest.chunks.held == 0
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        assert metrics["updates"] == 4
        expected = setup.initial + expected_mean([p.sent[1] for p in parts[2:]], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
        assert all(r.accepted for p in parts for r in p.receipts)
    finally:
        await stop_all(parts)


async def test_storage_failure_fails_the_round_and_rejects_the_batch(
    tmp_path, mosquitto: Mosquitto
) -> None:
    import shutil

    setup = make_setup(tmp_path, mosquitto.port, summers=1, updaters=2)
    behaviours = {i.device_id: Behaviour(update_delay_s=1.0) for i in setup.updaters}
    parts = _participants(setup, mosquitto.host, mosquitto.port, behaviours)
    await start_all(parts)
    checkpoints = setup.config_path.parent / "state" / "checkpoints"
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(p.sum_dicts for p in parts[1:]), 30, "the sum dictionary")
            shutil.rmtree(checkpoints)
            checkpoints.write_text("not a directory")  # every checkpoint write now fails
            await wait_for(lambda: all(p.receipts for p in parts[1:]), 30, "the receipts")
            runner = coordinator.runner
            assert runner is not None
            await wait_for(lambda: runner.rounds_failed == 1, 30, "the failed round")
            assert coordinator.services is not None
            for _ in range(100):
                record = await coordinator.services.store.get_round(1)
                if record is not None and record.outcome is not None:
                    break
                await asyncio.sleep(0.05)
        assert record is not None and record.outcome == "failed"
        assert "StorageError" in (record.detail or "")
        for p in parts[1:]:
            assert [str(r.reason) for r in p.receipts] == ["phase_closed"]
        assert not any(trained(p) for p in parts)
    finally:
        checkpoints.unlink(missing_ok=True)
        await stop_all(parts)


@pytest.mark.parametrize(("floor", "bad"), [(3, 1), (2, 2)])
async def test_an_aggregate_below_the_privacy_floor_is_never_unmasked(
    tmp_path, mosquitto: Mosquitto, floor: int, bad: int
) -> None:
    """Three updates accepted, but ``bad`` of them seal a seed no summer can open: the
    summers report them, they are dropped, and what is left is below
    ``privacy.min_updates``. The coordinator fails the round before unmasking and
    publishes no model (the config cannot let the update phase close that low; this
    is the floor where it is enforced, at the point of unmasking)."""
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=2,
        updaters=3,
        extra={"privacy": {"min_updates": floor}, "storage": {"dir": "state"}},
    )
    corrupt = {i.device_id for i in setup.updaters[:bad]}
    parts = _participants(
        setup,
        mosquitto.host,
        mosquitto.port,
        {d: Behaviour(corrupt_seed_for_all_summers=True) for d in corrupt},
    )
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(
                lambda: (
                    any(trained(p) for p in parts)
                    or (coordinator.runner is not None and coordinator.runner.rounds_failed == 1)
                ),
                60,
                "the round's end",
            )
            assert coordinator.services is not None
            store = coordinator.services.store
            record = await store.get_round(1)
            for _ in range(100):
                if record is not None and record.outcome is not None:
                    break
                await asyncio.sleep(0.05)
                record = await store.get_round(1)
            models = await store.models()
        assert record is not None and record.outcome == "failed"
        assert f"privacy.min_updates = {floor}" in (record.detail or ""), record.detail
        assert f"only {3 - bad} of the round's updates" in (record.detail or "")
        assert [m.version for m in models if m.version >= 1] == []
        assert not any(trained(p) for p in parts)
        # The updates themselves were accepted: the floor is about unmasking, not intake.
        for p in parts[2:]:
            assert [r.accepted for r in p.receipts] == [True], p.receipts
    finally:
        await stop_all(parts)


def test_shortfall_reasons() -> None:
    from maskfl.broker_coordinator.errors import shortfall_reason

    assert shortfall_reason("sum", 0, 1, 15.0) == (
        "no device drew the summer task this round (sum phase: 0 of at least 1 messages in 15 s)"
    )
    assert shortfall_reason("update", 1, 3, 14.2).startswith(
        "only 1 of the 3 required updates arrived (update phase: 1 of at least 3"
    )
    assert shortfall_reason("update", 0, 3, 5.0).startswith("no update arrived")
    assert shortfall_reason("sum2", 0, 2, 30.0).startswith(
        "only 0 of the 2 required summers sent their aggregated masks"
    )


async def test_round_with_two_mask_groups(tmp_path, mosquitto: Mosquitto) -> None:
    """g = 2 over a real broker: every updater seals one seed per group, each group's
    summers return their group's mask (one of group 1 drops out, the other answers
    late: sum2 waits past time_min for a group without an answer), and the
    coordinator unmasks with one agreed mask per group."""
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=4,
        updaters=4,
        groups=2,
        pet={"sum2": {"count_min": 2, "count_max": 4, "time_min_s": 0.2}},
    )
    s = setup.summers  # summer i is in group i % 2
    behaviours = {
        s[1].device_id: Behaviour(sum2_delay_s=2.5),
        s[3].device_id: Behaviour(skip_sum2=True),
    }
    parts = _participants(setup, mosquitto.host, mosquitto.port, behaviours)
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path):
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
        model = trained(parts[0])[0]
        metrics = dict(model.metrics)
        assert metrics["groups"] == 2 and metrics["sum2"] == 3 and metrics["mask_votes"] == 3
        assert metrics["updates"] == 4 and metrics["dropped"] == 0
        updaters = parts[4:]
        assert all(len(p.sent[1].seeds) == 2 for p in updaters)
        expected = setup.initial + expected_mean([p.sent[1] for p in updaters], 1.0)
        np.testing.assert_allclose(model.weights, expected, atol=metrics["error_bound"] + 1e-6)
        for p in parts:
            assert not p.errors, p.errors
    finally:
        await stop_all(parts)


async def test_a_mask_group_without_a_summer_fails_the_round(
    tmp_path, mosquitto: Mosquitto
) -> None:
    setup = make_setup(tmp_path, mosquitto.port, summers=2, updaters=3, groups=2, fill=1)
    parts = _participants(setup, mosquitto.host, mosquitto.port, {})
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(
                lambda: coordinator.runner is not None and coordinator.runner.rounds_failed == 1,
                30,
                "the failed round",
            )
            reason = coordinator.status()["last_failure"]["reason"]
        assert reason.startswith("mask group(s) 1 of 2 drew no summer this round"), reason
        assert "summers per group 0: 2, 1: 0" in reason
        assert not any(p.sent for p in parts), "no updater may seal a seed to nobody"
    finally:
        await stop_all(parts)


async def test_the_sum_phase_waits_past_time_min_for_a_group_without_a_summer(
    tmp_path, mosquitto: Mosquitto
) -> None:
    """count_min summers are in at time_min, all of group 0: the phase keeps waiting
    (until time_max) and group 1's summer, starting late, completes the round."""
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=3,
        updaters=3,
        groups=2,
        fill=2,
        pet={"sum": {"count_min": 2, "count_max": 3, "time_min_s": 0.2}},
    )
    parts = _participants(setup, mosquitto.host, mosquitto.port, {})
    late = parts[1]  # summer 1, the only one in group 1
    early = [p for p in parts if p is not late]
    await start_all(early)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(1 in p.roles for p in early), 30, "round 1")
            await asyncio.sleep(1.5)  # well past time_min with 2 summers of group 0
            status = coordinator.status()  # g and each summer's group are public
            assert status["phase"] == "sum" and status["groups"] == 2, status
            assert status["summer_groups"] == [
                {"device": d, "group": 0} for d in sorted(s.device_id for s in setup.summers[::2])
            ], status
            rounds = (await coordinator.dashboard())["rounds"]
            assert [(r["round_id"], r["groups"]) for r in rounds] == [(1, 2)], rounds
            await late.start()
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            assert coordinator.runner is not None and coordinator.runner.rounds_failed == 0
        metrics = dict(trained(parts[0])[0].metrics)
        assert metrics["summers"] == 3 and metrics["groups"] == 2 and metrics["updates"] == 3
    finally:
        await stop_all(parts)
