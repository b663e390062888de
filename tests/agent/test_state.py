"""The SQLite journal: steps survive reopening, the outbox tracks receipts, files are 0600."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

import pytest

from maskfl.agent.state import Journal, OutboxEntry, OutboxStatus, RoundState, Step, TaskKind
from maskfl.protocol.errors import StorageError


async def test_round_state_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "agent.sqlite3"
    async with Journal.open(db) as journal:
        state = RoundState(
            round_id=7,
            task=TaskKind.SUM,
            step=Step.SUM_SENT,
            ephemeral_sk=b"k" * 32,
            ephemeral_pk=b"p" * 32,
        )
        entry = OutboxEntry(7, "sum", "t/sum", b"d" * 32, b"payload", OutboxStatus.PENDING)
        saved = await journal.save(state, outbox=entry)
        assert saved.started_at > 0
        await journal.save(saved.advance(Step.SEEDS_RECEIVED, "3 seeds"))
        await journal.put_inbox(7, "seeds", b"raw seed dict")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    async with Journal.open(db) as journal:
        loaded = await journal.load(7)
        assert loaded is not None
        assert loaded.step is Step.SEEDS_RECEIVED
        assert loaded.ephemeral_sk == b"k" * 32
        assert loaded.detail == "3 seeds"
        assert (await journal.latest()) == loaded
        assert await journal.inbox(7, "seeds") == b"raw seed dict"
        box = await journal.outbox_by_digest(b"d" * 32)
        assert box is not None and box.status is OutboxStatus.PENDING
        await journal.mark_attempt(7, "sum")
        await journal.mark_receipt(7, "sum", OutboxStatus.ACCEPTED)
        box = await journal.outbox(7, "sum")
        assert box is not None and box.attempts == 1 and box.status is OutboxStatus.ACCEPTED
        assert [s for s, _ in await journal.events(7)] == ["sum_sent", "seeds_received"]
        await journal.forget_secrets(7)
        forgotten = await journal.load(7)
        assert forgotten is not None and forgotten.ephemeral_sk is None


async def test_prune_keeps_history(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "a.sqlite3") as journal:
        for r in range(1, 6):
            await journal.save(RoundState(r, TaskKind.UPDATE, Step.DONE))
            await journal.put_blob(r, "delta", b"x")
        await journal.prune(keep_rounds=2)
        assert await journal.blob(5, "delta") == b"x"
        assert await journal.blob(4, "delta") == b"x"
        assert await journal.blob(3, "delta") is None
        assert len(await journal.history()) == 5


async def test_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError):
        async with Journal.open(blocker / "agent.sqlite3"):
            pass


async def test_failed_reads_are_storage_errors(tmp_path: Path) -> None:
    db = tmp_path / "agent.sqlite3"
    async with Journal.open(db) as journal:
        await journal.save(RoundState(1, TaskKind.SUM, Step.SUM_SENT))
        with contextlib.closing(sqlite3.connect(db)) as other:
            other.executescript("DROP TABLE rounds; DROP TABLE outbox; DROP TABLE kv;")
        with pytest.raises(StorageError, match="no such table: rounds"):
            await journal.load(1)
        with pytest.raises(StorageError, match="no such table: rounds"):
            await journal.history()
        with pytest.raises(StorageError, match="no such table: outbox"):
            await journal.outbox_by_digest(b"d" * 32)
        with pytest.raises(StorageError, match="no such table: kv"):
            await journal.get_kv("revocations")
