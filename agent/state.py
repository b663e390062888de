"""The agent's durable state: a SQLite journal of rounds, messages and received inputs.

The agent *steps* (:mod:`maskfl.agent.steps`): every round is a :class:`DeviceRound`
that is written to SQLite (WAL, ``synchronous=FULL``) *before* the agent acts on the
network, so a reboot or a ``SIGKILL`` at any instant resumes from the last step.

``sum_sent`` is journaled together with the summer's ephemeral X25519 private key and
the signed Sum message (in ``sent``) before that message is published; likewise the
Sum2 and Update messages. On restart a pending message is published again — the
same bytes, since Ed25519 signatures are deterministic — and the coordinator treats
the repeat as a duplicate of what it already has.

Tables: ``rounds`` (one row per round: its step), ``sent`` (our signed messages,
by round and kind, with their receipt), ``inbox`` (coordinator messages we acted on:
round parameters, sum dictionary, seed dictionary — kept so a restart does not depend
on retained messages), ``blobs`` (training results), ``events`` (the round history)
and ``kv`` (small settings such as the latest revocation list).

The database file and its WAL are created mode 0600 in a 0700 directory: they hold
ephemeral private keys. Every sqlite error becomes a :class:`StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiosqlite

from maskfl.agent.steps import DeviceRound, Step
from maskfl.protocol.errors import LocalProtocolError, StorageError, sqlite_errors
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import TopicKind

__all__ = [
    "BlobKey",
    "InboxKey",
    "Journal",
    "ReceiptStatus",
    "SentMessage",
    "SettingKey",
]

SCHEMA_VERSION = 2
"""2: the table of our signed messages is ``sent`` (1 called it ``outbox``)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id      INTEGER PRIMARY KEY,
    task          TEXT NOT NULL,
    step          TEXT NOT NULL,
    params_digest BLOB,
    ephemeral_sk  BLOB,
    ephemeral_pk  BLOB,
    bytes_sent    INTEGER NOT NULL DEFAULT 0,
    detail        TEXT NOT NULL DEFAULT '',
    started_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    round_id  INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    topic     TEXT NOT NULL,
    digest    BLOB NOT NULL,
    payload   BLOB NOT NULL,
    status    TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    reason    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (round_id, kind)
);
CREATE INDEX IF NOT EXISTS sent_digest ON sent (digest);
CREATE TABLE IF NOT EXISTS inbox (
    round_id INTEGER NOT NULL,
    name     TEXT NOT NULL,
    payload  BLOB NOT NULL,
    PRIMARY KEY (round_id, name)
);
CREATE TABLE IF NOT EXISTS blobs (
    round_id INTEGER NOT NULL,
    name     TEXT NOT NULL,
    payload  BLOB NOT NULL,
    PRIMARY KEY (round_id, name)
);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id INTEGER NOT NULL,
    at       REAL NOT NULL,
    step     TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


_SELECT_ROUNDS = (
    "SELECT round_id, task, step, params_digest, ephemeral_sk, ephemeral_pk, "
    "bytes_sent, detail, started_at, updated_at FROM rounds"
)
_SELECT_SENT = "SELECT round_id, kind, topic, digest, payload, status, attempts, reason FROM sent"


class ReceiptStatus(StrEnum):
    """What the coordinator answered to a message of ours."""

    PENDING = "pending"  # journaled, maybe published, no receipt yet
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class InboxKey(StrEnum):
    """The coordinator inputs a round keeps (table ``inbox``)."""

    PARAMS = "params"
    PARAMS_DIGEST = "params_digest"
    SEEDS = "seeds"


class BlobKey(StrEnum):
    """The training results a round keeps until its update is sent (table ``blobs``)."""

    DELTA = "delta"
    SAMPLES = "samples"
    EVALUATION = "evaluation"


class SettingKey(StrEnum):
    """Small settings outside any round (table ``kv``)."""

    REVOCATIONS = "revocations"


@dataclass(frozen=True)
class SentMessage:
    """One signed message of ours, journaled before it is published, and its receipt."""

    round_id: int
    kind: TopicKind
    topic: str
    digest: bytes
    payload: bytes
    status: ReceiptStatus
    attempts: int = 0
    reason: str = ""


class Journal:
    """Async access to the agent's SQLite file. Use ``async with Journal.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Journal]:
        _prepare_file(path)
        with sqlite_errors(path, "open the agent database"):
            async with aiosqlite.connect(path, timeout=10) as db:
                journal = cls(db, path)
                await journal._init()
                yield journal

    async def _init(self) -> None:
        db = self._db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path} was written by a newer maskfl-agent (schema {version} > "
                f"{SCHEMA_VERSION}); upgrade the agent or move the file away"
            )
        if version == 1:
            await db.execute("ALTER TABLE outbox RENAME TO sent")
            await db.execute("DROP INDEX IF EXISTS outbox_digest")
        await db.executescript(_SCHEMA)
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        await db.commit()

    # -- rounds --------------------------------------------------------------------

    async def save(self, state: DeviceRound, *, sent: SentMessage | None = None) -> DeviceRound:
        """Write ``state`` (and the message it sends) in one transaction; returns it stamped."""
        if state.step is Step.NEW:
            raise LocalProtocolError(f"round {state.round_id}: step new is never journaled")
        now = time.time()
        state = replace(state, started_at=state.started_at or now, updated_at=now)
        with sqlite_errors(self.path, f"journal round {state.round_id}"):
            await self._db.execute(
                "INSERT INTO rounds (round_id, task, step, params_digest, ephemeral_sk, "
                "ephemeral_pk, bytes_sent, detail, started_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (round_id) DO UPDATE SET task=excluded.task, step=excluded.step, "
                "params_digest=excluded.params_digest, ephemeral_sk=excluded.ephemeral_sk, "
                "ephemeral_pk=excluded.ephemeral_pk, bytes_sent=excluded.bytes_sent, "
                "detail=excluded.detail, updated_at=excluded.updated_at",
                (
                    state.round_id,
                    str(state.task),
                    str(state.step),
                    state.params_digest,
                    state.ephemeral_sk,
                    state.ephemeral_pk,
                    state.bytes_sent,
                    state.detail,
                    state.started_at,
                    state.updated_at,
                ),
            )
            await self._db.execute(
                "INSERT INTO events (round_id, at, step, detail) VALUES (?, ?, ?, ?)",
                (state.round_id, now, str(state.step), state.detail),
            )
            if sent is not None:
                await self._put_sent(sent)
            await self._db.commit()
        return state

    async def load(self, round_id: int) -> DeviceRound | None:
        row = await self._fetch_one(f"{_SELECT_ROUNDS} WHERE round_id = ?", (round_id,))
        return None if row is None else _round_from_row(row)

    async def latest(self) -> DeviceRound | None:
        row = await self._fetch_one(f"{_SELECT_ROUNDS} ORDER BY round_id DESC LIMIT 1")
        return None if row is None else _round_from_row(row)

    async def history(self, limit: int = 100) -> list[DeviceRound]:
        rows = await self._fetch_all(f"{_SELECT_ROUNDS} ORDER BY round_id DESC LIMIT ?", (limit,))
        return [_round_from_row(r) for r in rows]

    async def events(self, round_id: int) -> list[tuple[str, str]]:
        rows = await self._fetch_all(
            "SELECT step, detail FROM events WHERE round_id = ? ORDER BY id", (round_id,)
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def forget_secrets(self, round_id: int) -> None:
        """Erase a finished round's ephemeral private key and bulky blobs."""
        with sqlite_errors(self.path, f"clean round {round_id}"):
            await self._db.execute(
                "UPDATE rounds SET ephemeral_sk = NULL WHERE round_id = ?", (round_id,)
            )
            await self._db.execute("DELETE FROM blobs WHERE round_id = ?", (round_id,))
            await self._db.execute(
                "UPDATE sent SET payload = X'' WHERE round_id = ? AND status != ?",
                (round_id, str(ReceiptStatus.PENDING)),
            )
            await self._db.commit()

    async def prune(self, keep_rounds: int) -> None:
        """Keep the inputs of the newest ``keep_rounds`` rounds (the history stays)."""
        with sqlite_errors(self.path, "prune the journal"):
            async with self._db.execute(
                "SELECT round_id FROM rounds ORDER BY round_id DESC LIMIT 1 OFFSET ?",
                (keep_rounds,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return
            cutoff = int(row[0])
            for table in ("inbox", "blobs", "sent"):
                await self._db.execute(f"DELETE FROM {table} WHERE round_id <= ?", (cutoff,))
            await self._db.execute(
                "UPDATE rounds SET ephemeral_sk = NULL WHERE round_id <= ?", (cutoff,)
            )
            await self._db.commit()

    # -- sent messages --------------------------------------------------------------

    async def _put_sent(self, entry: SentMessage) -> None:
        await self._db.execute(
            "INSERT INTO sent (round_id, kind, topic, digest, payload, status, attempts, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round_id, kind) DO UPDATE SET "
            "topic=excluded.topic, digest=excluded.digest, payload=excluded.payload, "
            "status=excluded.status, attempts=excluded.attempts, reason=excluded.reason",
            (
                entry.round_id,
                str(entry.kind),
                entry.topic,
                entry.digest,
                entry.payload,
                str(entry.status),
                entry.attempts,
                entry.reason,
            ),
        )

    async def sent(self, round_id: int, kind: TopicKind) -> SentMessage | None:
        row = await self._fetch_one(
            f"{_SELECT_SENT} WHERE round_id = ? AND kind = ?", (round_id, str(kind))
        )
        return None if row is None else _sent_from_row(row)

    async def sent_by_digest(self, digest: bytes) -> SentMessage | None:
        row = await self._fetch_one(f"{_SELECT_SENT} WHERE digest = ?", (digest,))
        return None if row is None else _sent_from_row(row)

    async def mark_attempt(self, round_id: int, kind: TopicKind) -> None:
        await self._exec(
            "UPDATE sent SET attempts = attempts + 1 WHERE round_id = ? AND kind = ?",
            (round_id, str(kind)),
        )

    async def mark_receipt(
        self, round_id: int, kind: TopicKind, status: ReceiptStatus, reason: str = ""
    ) -> None:
        await self._exec(
            "UPDATE sent SET status = ?, reason = ? WHERE round_id = ? AND kind = ?",
            (str(status), reason, round_id, str(kind)),
        )

    # -- inbox, blobs, kv ----------------------------------------------------------

    async def put_inbox(self, round_id: int, key: InboxKey, payload: bytes) -> None:
        await self._put_blob("inbox", round_id, key, payload)

    async def inbox(self, round_id: int, key: InboxKey) -> bytes | None:
        return await self._get_blob("inbox", round_id, key)

    async def put_blob(self, round_id: int, key: BlobKey, payload: bytes) -> None:
        await self._put_blob("blobs", round_id, key, payload)

    async def blob(self, round_id: int, key: BlobKey) -> bytes | None:
        return await self._get_blob("blobs", round_id, key)

    async def set_setting(self, key: SettingKey, value: bytes) -> None:
        await self._exec("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (str(key), value))

    async def setting(self, key: SettingKey) -> bytes | None:
        row = await self._fetch_one("SELECT value FROM kv WHERE key = ?", (str(key),))
        return None if row is None else bytes(row[0])

    async def _put_blob(self, table: str, round_id: int, name: str, payload: bytes) -> None:
        await self._exec(
            f"INSERT OR REPLACE INTO {table} (round_id, name, payload) VALUES (?, ?, ?)",
            (round_id, str(name), payload),
        )

    async def _get_blob(self, table: str, round_id: int, name: str) -> bytes | None:
        row = await self._fetch_one(
            f"SELECT payload FROM {table} WHERE round_id = ? AND name = ?", (round_id, str(name))
        )
        return None if row is None else bytes(row[0])

    async def _fetch_one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """The first row of a query, or None; a sqlite error is a :class:`StorageError`."""
        with sqlite_errors(self.path, "read the agent database"):
            async with self._db.execute(sql, args) as cur:
                return await cur.fetchone()

    async def _fetch_all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Every row of a query; a sqlite error is a :class:`StorageError`."""
        with sqlite_errors(self.path, "read the agent database"):
            async with self._db.execute(sql, args) as cur:
                return list(await cur.fetchall())

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> None:
        with sqlite_errors(self.path, "write the agent database"):
            await self._db.execute(sql, args)
            await self._db.commit()


def _prepare_file(path: Path) -> None:
    """Create the database file 0600 in a 0700 directory before SQLite opens it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create the agent database {path}: {exc}") from exc


def _round_from_row(row: Any) -> DeviceRound:
    return DeviceRound(
        round_id=int(row[0]),
        task=Task(row[1]),
        step=Step(row[2]),
        params_digest=None if row[3] is None else bytes(row[3]),
        ephemeral_sk=None if row[4] is None else bytes(row[4]),
        ephemeral_pk=None if row[5] is None else bytes(row[5]),
        bytes_sent=int(row[6]),
        detail=str(row[7]),
        started_at=float(row[8]),
        updated_at=float(row[9]),
    )


def _sent_from_row(row: Any) -> SentMessage:
    return SentMessage(
        round_id=int(row[0]),
        kind=TopicKind(row[1]),
        topic=str(row[2]),
        digest=bytes(row[3]),
        payload=bytes(row[4]),
        status=ReceiptStatus(row[5]),
        attempts=int(row[6]),
        reason=str(row[7]),
    )
