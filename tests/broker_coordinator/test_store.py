"""The SQLite store and the checkpoint / update-log files."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskfl.broker_coordinator.store import (
    CheckpointFiles,
    ModelRecord,
    RoundRecord,
    Store,
    SummerRecord,
    UpdateLog,
    UpdateRecord,
)
from maskfl.protocol.errors import StorageError


def _round(rid: int = 1, **kw: object) -> RoundRecord:
    base = dict(
        round_id=rid,
        phase="sum",
        seed=b"s" * 32,
        previous_seed=bytes(32),
        p_sum=0.5,
        p_update=1.0,
        params=b"params",
        started_at=1.0,
        phase_opened_at=1.0,
    )
    base.update(kw)
    return RoundRecord(**base)  # type: ignore[arg-type]


async def test_transaction_commits_all_or_nothing(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "c.db") as store:
        async with store.transaction() as tx:
            await tx.put_round(_round())
            await tx.add_summer(1, SummerRecord("d1", b"p" * 32, b"e" * 32, b"g" * 32, b"m"))
        assert (await store.last_round()) == _round()
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.put_round(_round(2))
                raise RuntimeError("boom")
        assert (await store.last_round()).round_id == 1  # type: ignore[union-attr]
        # A failing statement rolls back the statements before it.
        with pytest.raises(StorageError):
            async with store.transaction() as tx:
                await tx.put_round(_round(3))
                await tx.add_summer(1, SummerRecord("d1", b"p" * 32, b"e" * 32, b"g" * 32, b"m"))
        assert (await store.last_round()).round_id == 1  # type: ignore[union-attr]
        assert [s.device_id for s in await store.summers(1)] == ["d1"]


async def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with Store.open(path) as store, store.transaction() as tx:
        await tx.put_round(_round(phase="update", checkpoint_gen=3))
        await tx.add_update(1, UpdateRecord("u1", b"d" * 32, 3, -1, 44), [(b"p" * 32, b"x" * 80)])
        await tx.record_message(b"d" * 32, 1, "update", "u1", 2.0)
        await tx.add_model(
            ModelRecord("m", 1, 1, b"h" * 32, b"\0" * 8, {"updates": 3.0}, b"raw", None, 2.0)
        )
    async with Store.open(path) as store:
        assert (await store.last_round()).checkpoint_gen == 3  # type: ignore[union-attr]
        assert [u.device_id for u in await store.updates(1)] == ["u1"]
        assert await store.seeds_for(1, b"p" * 32) == [(b"d" * 32, b"x" * 80)]
        assert await store.message_round(b"d" * 32) == (1, "update")
        latest = await store.latest_model("m")
        assert latest is not None and latest.metrics == {"updates": 3.0}


def test_checkpoint_files_are_replaced_atomically(tmp_path: Path) -> None:
    files = CheckpointFiles(tmp_path / "ck")
    files.write(1, 1, b"one")
    files.write(1, 2, b"two")
    (tmp_path / "ck" / "round-1.gen-3.tmp").write_bytes(b"half")  # a crash mid-write
    assert files.read(1, 2) == b"two"
    files.prune(1, 2)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round-1.gen-2.agg"]
    with pytest.raises(StorageError):
        files.read(1, 1)


def test_update_log_overwrites_an_uncommitted_tail(tmp_path: Path) -> None:
    log = UpdateLog(tmp_path / "u")
    assert log.append(1, 0, [b"aaaa", b"bb"]) == [0, 4]
    assert log.append(1, 6, [b"garbage-from-a-crash"]) == [6]
    assert log.append(1, 6, [b"cc"], fsync=True) == [6]  # the database said 6 bytes
    assert log.path(1).read_bytes() == b"aaaabbcc"
    assert log.read(1, 4, 2) == b"bb"
    with pytest.raises(StorageError):
        log.read(1, 6, 10)
