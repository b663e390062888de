"""The SQLite journal: steps survive reopening, the outbox tracks receipts, files are 0600."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

import pytest

from maskfl.agent.state import BlobKey, InboxKey, Journal, ReceiptStatus, SentMessage, SettingKey
from maskfl.agent.steps import DeviceRound, Event, Step
from maskfl.protocol.errors import StorageError
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import TopicKind


async def test_round_state_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "agent.sqlite3"
    async with Journal.open(db) as journal:
        state = DeviceRound(
            round_id=7,
            task=Task.SUM,
            step=Step.SUM_SENT,
            ephemeral_sk=b"k" * 32,
            ephemeral_pk=b"p" * 32,
        )
        entry = SentMessage(7, TopicKind.SUM, "t/sum", b"d" * 32, b"payload", ReceiptStatus.PENDING)
        saved = await journal.save(state, sent=entry)
        assert saved.started_at > 0
        await journal.save(saved.move(Event.SEEDS, "3 seeds"))
        await journal.put_inbox(7, InboxKey.SEEDS, b"raw seed dict")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    async with Journal.open(db) as journal:
        loaded = await journal.load(7)
        assert loaded is not None
        assert loaded.step is Step.SEEDS_RECEIVED
        assert loaded.ephemeral_sk == b"k" * 32
        assert loaded.detail == "3 seeds"
        assert (await journal.latest()) == loaded
        assert await journal.inbox(7, InboxKey.SEEDS) == b"raw seed dict"
        box = await journal.sent_by_digest(b"d" * 32)
        assert box is not None and box.status is ReceiptStatus.PENDING
        await journal.mark_attempt(7, TopicKind.SUM)
        await journal.mark_receipt(7, TopicKind.SUM, ReceiptStatus.ACCEPTED)
        box = await journal.sent(7, TopicKind.SUM)
        assert box is not None and box.attempts == 1 and box.status is ReceiptStatus.ACCEPTED
        assert [s for s, _ in await journal.events(7)] == ["sum_sent", "seeds_received"]
        await journal.forget_secrets(7)
        forgotten = await journal.load(7)
        assert forgotten is not None and forgotten.ephemeral_sk is None


async def test_prune_keeps_history(tmp_path: Path) -> None:
    async with Journal.open(tmp_path / "a.sqlite3") as journal:
        for r in range(1, 6):
            await journal.save(DeviceRound(r, Task.UPDATE, Step.DONE))
            await journal.put_blob(r, BlobKey.DELTA, b"x")
        await journal.prune(keep_rounds=2)
        assert await journal.blob(5, BlobKey.DELTA) == b"x"
        assert await journal.blob(4, BlobKey.DELTA) == b"x"
        assert await journal.blob(3, BlobKey.DELTA) is None
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
        await journal.save(DeviceRound(1, Task.SUM, Step.SUM_SENT))
        with contextlib.closing(sqlite3.connect(db)) as other:
            other.executescript("DROP TABLE rounds; DROP TABLE sent; DROP TABLE kv;")
        with pytest.raises(StorageError, match="no such table: rounds"):
            await journal.load(1)
        with pytest.raises(StorageError, match="no such table: rounds"):
            await journal.history()
        with pytest.raises(StorageError, match="no such table: sent"):
            await journal.sent_by_digest(b"d" * 32)
        with pytest.raises(StorageError, match="no such table: kv"):
            await journal.setting(SettingKey.REVOCATIONS)


async def test_a_schema_1_journal_keeps_its_messages(tmp_path: Path) -> None:
    """Schema 1 called the table of our messages ``outbox``; opening it renames it."""
    db = tmp_path / "agent.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as old:
        old.executescript(
            "CREATE TABLE outbox (round_id INTEGER NOT NULL, kind TEXT NOT NULL, "
            "topic TEXT NOT NULL, digest BLOB NOT NULL, payload BLOB NOT NULL, "
            "status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
            "reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (round_id, kind));"
            "CREATE INDEX outbox_digest ON outbox (digest);"
            "INSERT INTO outbox VALUES (4, 'update', 't/u', x'0101', x'02', 'pending', 1, '');"
            "PRAGMA user_version=1;"
        )
    async with Journal.open(db) as journal:
        entry = await journal.sent_by_digest(b"\x01\x01")
        assert entry == SentMessage(
            4, TopicKind.UPDATE, "t/u", b"\x01\x01", b"\x02", ReceiptStatus.PENDING, 1
        )
    with contextlib.closing(sqlite3.connect(db)) as again:
        tables = {r[0] for r in again.execute("SELECT name FROM sqlite_master")}
        assert "outbox" not in tables and "outbox_digest" not in tables
        assert {"sent", "sent_digest"} <= tables
        assert again.execute("PRAGMA user_version").fetchone()[0] == 2
