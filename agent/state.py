"""The agent's durable state: a SQLite journal of rounds, messages and received inputs.

The agent *steps*: every round is a :class:`RoundState` that is written to SQLite
(WAL, ``synchronous=FULL``) *before* the agent acts on the network, so a reboot or a
``SIGKILL`` at any instant resumes from the last step::

    summer:   sum_sent ──▶ seeds_received ──▶ sum2_sent ──▶ done
    updater:  waiting_sums ──▶ trained ──▶ update_sent ──▶ done
    any:      ──▶ sat_out (not selected, guards, round moved on) | failed (rejected)

``sum_sent`` is journaled together with the summer's ephemeral X25519 private key and
the signed Sum message (in the outbox) before that message is published; likewise the
Sum2 and Update messages. On restart a pending outbox entry is published again — the
same bytes, since Ed25519 signatures are deterministic — and the coordinator treats
the repeat as a duplicate of what it already has.

Tables: ``rounds`` (one row per round: the state), ``outbox`` (our signed messages,
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
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import aiosqlite

from maskfl.protocol.errors import StorageError, sqlite_errors

__all__ = [
    "Journal",
    "OutboxEntry",
    "OutboxStatus",
    "RoundState",
    "Step",
    "TaskKind",
]

SCHEMA_VERSION = 1

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
CREATE TABLE IF NOT EXISTS outbox (
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
CREATE INDEX IF NOT EXISTS outbox_digest ON outbox (digest);
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
_SELECT_OUTBOX = (
    "SELECT round_id, kind, topic, digest, payload, status, attempts, reason FROM outbox"
)


class TaskKind(StrEnum):
    """What the device does in a round (mirrors the protocol's sortition task)."""

    SUM = "sum"
    UPDATE = "update"
    NONE = "none"


class Step(StrEnum):
    """Where a round stands for this device. Terminal steps: done, sat_out, failed."""

    SUM_SENT = "sum_sent"
    SEEDS_RECEIVED = "seeds_received"
    SUM2_SENT = "sum2_sent"
    WAITING_SUMS = "waiting_sums"
    TRAINED = "trained"
    UPDATE_SENT = "update_sent"
    DONE = "done"
    SAT_OUT = "sat_out"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Step.DONE, Step.SAT_OUT, Step.FAILED)


class OutboxStatus(StrEnum):
    PENDING = "pending"  # journaled, maybe published, no receipt yet
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class RoundState:
    """The serializable per-round state of the agent (one row of ``rounds``)."""

    round_id: int
    task: TaskKind
    step: Step
    params_digest: bytes | None = None
    ephemeral_sk: bytes | None = None
    ephemeral_pk: bytes | None = None
    bytes_sent: int = 0
    detail: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0

    def advance(self, step: Step, detail: str = "", **changes: Any) -> Self:
        return replace(self, step=step, detail=detail, **changes)


@dataclass(frozen=True)
class OutboxEntry:
    round_id: int
    kind: str
    topic: str
    digest: bytes
    payload: bytes
    status: OutboxStatus
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
        await db.executescript(_SCHEMA)
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version == 0:
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path} was written by a newer maskfl-agent (schema {version} > "
                f"{SCHEMA_VERSION}); upgrade the agent or move the file away"
            )
        await db.commit()

    # -- rounds --------------------------------------------------------------------

    async def save(self, state: RoundState, *, outbox: OutboxEntry | None = None) -> RoundState:
        """Write ``state`` (and an outbox entry) in one transaction; returns it stamped."""
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
            if outbox is not None:
                await self._put_outbox(outbox)
            await self._db.commit()
        return state

    async def load(self, round_id: int) -> RoundState | None:
        row = await self._fetch_one(f"{_SELECT_ROUNDS} WHERE round_id = ?", (round_id,))
        return None if row is None else _round_from_row(row)

    async def latest(self) -> RoundState | None:
        row = await self._fetch_one(f"{_SELECT_ROUNDS} ORDER BY round_id DESC LIMIT 1")
        return None if row is None else _round_from_row(row)

    async def history(self, limit: int = 100) -> list[RoundState]:
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
                "UPDATE outbox SET payload = X'' WHERE round_id = ? AND status != ?",
                (round_id, str(OutboxStatus.PENDING)),
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
            for table in ("inbox", "blobs", "outbox"):
                await self._db.execute(f"DELETE FROM {table} WHERE round_id <= ?", (cutoff,))
            await self._db.execute(
                "UPDATE rounds SET ephemeral_sk = NULL WHERE round_id <= ?", (cutoff,)
            )
            await self._db.commit()

    # -- outbox --------------------------------------------------------------------

    async def _put_outbox(self, entry: OutboxEntry) -> None:
        await self._db.execute(
            "INSERT INTO outbox (round_id, kind, topic, digest, payload, status, attempts, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round_id, kind) DO UPDATE SET "
            "topic=excluded.topic, digest=excluded.digest, payload=excluded.payload, "
            "status=excluded.status, attempts=excluded.attempts, reason=excluded.reason",
            (
                entry.round_id,
                entry.kind,
                entry.topic,
                entry.digest,
                entry.payload,
                str(entry.status),
                entry.attempts,
                entry.reason,
            ),
        )

    async def outbox(self, round_id: int, kind: str) -> OutboxEntry | None:
        row = await self._fetch_one(
            f"{_SELECT_OUTBOX} WHERE round_id = ? AND kind = ?", (round_id, kind)
        )
        return None if row is None else _outbox_from_row(row)

    async def outbox_by_digest(self, digest: bytes) -> OutboxEntry | None:
        row = await self._fetch_one(f"{_SELECT_OUTBOX} WHERE digest = ?", (digest,))
        return None if row is None else _outbox_from_row(row)

    async def mark_attempt(self, round_id: int, kind: str) -> None:
        await self._exec(
            "UPDATE outbox SET attempts = attempts + 1 WHERE round_id = ? AND kind = ?",
            (round_id, kind),
        )

    async def mark_receipt(
        self, round_id: int, kind: str, status: OutboxStatus, reason: str = ""
    ) -> None:
        await self._exec(
            "UPDATE outbox SET status = ?, reason = ? WHERE round_id = ? AND kind = ?",
            (str(status), reason, round_id, kind),
        )

    # -- inbox, blobs, kv ----------------------------------------------------------

    async def put_inbox(self, round_id: int, name: str, payload: bytes) -> None:
        await self._exec(
            "INSERT OR REPLACE INTO inbox (round_id, name, payload) VALUES (?, ?, ?)",
            (round_id, name, payload),
        )

    async def inbox(self, round_id: int, name: str) -> bytes | None:
        return await self._get_blob("inbox", round_id, name)

    async def put_blob(self, round_id: int, name: str, payload: bytes) -> None:
        await self._exec(
            "INSERT OR REPLACE INTO blobs (round_id, name, payload) VALUES (?, ?, ?)",
            (round_id, name, payload),
        )

    async def blob(self, round_id: int, name: str) -> bytes | None:
        return await self._get_blob("blobs", round_id, name)

    async def set_kv(self, key: str, value: bytes) -> None:
        await self._exec("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    async def get_kv(self, key: str) -> bytes | None:
        row = await self._fetch_one("SELECT value FROM kv WHERE key = ?", (key,))
        return None if row is None else bytes(row[0])

    async def _get_blob(self, table: str, round_id: int, name: str) -> bytes | None:
        row = await self._fetch_one(
            f"SELECT payload FROM {table} WHERE round_id = ? AND name = ?", (round_id, name)
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


def _round_from_row(row: Any) -> RoundState:
    return RoundState(
        round_id=int(row[0]),
        task=TaskKind(row[1]),
        step=Step(row[2]),
        params_digest=None if row[3] is None else bytes(row[3]),
        ephemeral_sk=None if row[4] is None else bytes(row[4]),
        ephemeral_pk=None if row[5] is None else bytes(row[5]),
        bytes_sent=int(row[6]),
        detail=str(row[7]),
        started_at=float(row[8]),
        updated_at=float(row[9]),
    )


def _outbox_from_row(row: Any) -> OutboxEntry:
    return OutboxEntry(
        round_id=int(row[0]),
        kind=str(row[1]),
        topic=str(row[2]),
        digest=bytes(row[3]),
        payload=bytes(row[4]),
        status=OutboxStatus(row[5]),
        attempts=int(row[6]),
        reason=str(row[7]),
    )


def state_as_dict(state: RoundState) -> dict[str, Any]:
    """A JSON-friendly view (no private key) for ``maskfl-agent status``."""
    data = asdict(state)
    data.pop("ephemeral_sk")
    for key in ("params_digest", "ephemeral_pk"):
        if data[key] is not None:
            data[key] = data[key].hex()
    data["task"] = str(state.task)
    data["step"] = str(state.step)
    return data
