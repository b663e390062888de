"""Durable coordinator state: SQLite (aiosqlite, WAL) plus three kinds of flat files.

What lives where, and why they always agree after a crash:

- ``coordinator.db`` (SQLite, WAL, ``synchronous=FULL``): rounds and their phase,
  enrolled devices, every accepted message by digest, summers (the signed sum
  messages, i.e. the sum dictionary), accepted updates, the seed dictionary
  entries, sum2 masks' digests, the global model registry's metadata (every
  version with digest, metrics and the names of its files), and the *stored
  receipts*: accepted messages' receipts, written with the message and deleted
  once the broker has them (:mod:`.outbox` publishes them). Their table keeps its
  schema-1 name ``receipt_outbox``; in the code "outbox" is only the publisher
  (:class:`~maskfl.broker_coordinator.outbox.Outbox`).
- ``models/<sha256>.{msg,f32,opt}``: the registry's files (the signed model
  message, which holds its weights; weights alone for a version never published
  signed, the initial one; optimizer state), content-addressed, written and fsynced
  *before* the transaction that names them; a crash in between leaves files no
  row names, deleted at the next start. ``registry.keep_versions`` keeps the
  files of the newest versions only (schema 1 kept everything in SQLite: 240 MB
  after one round at M = 1e7; it is migrated on open).
- ``checkpoints/round-<r>.gen-<g>.agg``: the running aggregate after commit
  generation ``g`` (an :class:`~maskfl.aggregator_gpu.Snapshot` image), written
  to a temp file, fsynced, renamed, directory fsynced. The ``rounds`` row names
  the generation that is current; it is updated *in the same transaction* that
  records the batch of updates the generation contains. A crash after the rename
  and before the commit leaves a newer file that the database does not name; it
  is ignored and deleted on start. A crash after the commit keeps the older
  file until it is pruned. So the aggregate loaded on restart contains exactly
  the updates the database says were accepted.
- ``updates/round-<r>.log``: every accepted update's masked words, appended
  before the batch's commit, with offsets recorded in ``updates``. It is what
  lets the coordinator drop an update whose seed a summer could not open: it
  subtracts those words from the aggregate at unmask. Bytes past the largest
  committed offset are garbage from a crash and are overwritten. The log is
  *not* fsynced by default (``storage.update_log_fsync``): a killed process
  loses nothing the kernel already has, and fsyncing every update's words
  would cost a second full write of the data to the disk. After an OS crash or
  power loss the log may be short; the aggregate is unaffected (it is in the
  fsynced checkpoint), and only a round in which a summer then reports an
  unopenable seed fails instead of dropping that update (the read is
  length-checked).

Every write method takes an open :class:`Transaction` so callers group writes
into one commit (group commit: several updates per fsync). All sqlite errors
become :class:`StorageError` naming the file and the operation
(:func:`~maskfl.protocol.errors.sqlite_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np

from maskfl.aggregator_gpu import Words
from maskfl.protocol.errors import MaskflError, StorageError, sqlite_errors
from maskfl.protocol.messages import HEADER_SIZE, GlobalModel, Header, decode_message
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import RoundOutcome as RoundOutcome  # noqa: PLC0414 re-exported: the round table's enum, stored as its value

log = logging.getLogger("maskfl.coordinator.store")

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    phase TEXT NOT NULL,
    seed BLOB NOT NULL,
    previous_seed BLOB NOT NULL,
    p_sum REAL NOT NULL,
    p_update REAL NOT NULL,
    params BLOB NOT NULL,
    started_at REAL NOT NULL,
    phase_opened_at REAL NOT NULL,
    sum_dict BLOB,
    checkpoint_gen INTEGER NOT NULL DEFAULT 0,
    update_log_size INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    detail TEXT,
    finished_at REAL,
    model_version INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    serial INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    digest BLOB PRIMARY KEY,
    round_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_round ON messages (round_id);
CREATE TABLE IF NOT EXISTS summers (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    public_key BLOB NOT NULL,
    ephemeral_pk BLOB NOT NULL,
    digest BLOB NOT NULL,
    message BLOB NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    generation INTEGER NOT NULL,
    log_offset INTEGER NOT NULL,
    log_length INTEGER NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS seeds (
    round_id INTEGER NOT NULL,
    summer_pk BLOB NOT NULL,
    update_digest BLOB NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (round_id, summer_pk, update_digest)
);
CREATE TABLE IF NOT EXISTS sum2 (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    mask_digest BLOB NOT NULL,
    failed BLOB NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    round_id INTEGER,
    digest BLOB NOT NULL,
    metrics TEXT NOT NULL,
    weights_file TEXT,
    message_file TEXT,
    optimizer_file TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (model_id, version)
);
CREATE TABLE IF NOT EXISTS receipt_outbox (  -- the stored receipts (old name, kept)
    digest BLOB PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS phase_log (
    round_id INTEGER NOT NULL,
    phase TEXT NOT NULL,
    opened_at REAL NOT NULL,
    PRIMARY KEY (round_id, phase)
);
CREATE TABLE IF NOT EXISTS device_rejections (
    device_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (device_id, reason)
);
"""

LOGGED_PHASES = (Phase.SUM, Phase.UPDATE, Phase.SUM2, Phase.UNMASK)
"""Phases whose opening time ``phase_log`` keeps, in round order (for phase durations
on the status page)."""


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One row of ``rounds``: where a round stands.

    ``phase`` and ``outcome`` are stored as their enum values (``'sum'``,
    ``'completed'``); a value the enums do not know is a :class:`StorageError`
    when the row is read.
    """

    round_id: int
    phase: Phase
    seed: bytes
    previous_seed: bytes
    p_sum: float
    p_update: float
    params: bytes
    started_at: float
    phase_opened_at: float
    sum_dict: bytes | None = None
    checkpoint_gen: int = 0
    update_log_size: int = 0
    outcome: RoundOutcome | None = None
    detail: str | None = None
    finished_at: float | None = None
    model_version: int | None = None


@dataclass(frozen=True, slots=True)
class SummerRecord:
    device_id: str
    public_key: bytes
    ephemeral_pk: bytes
    digest: bytes
    message: bytes


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    device_id: str
    digest: bytes
    generation: int
    log_offset: int
    log_length: int


@dataclass(frozen=True, slots=True)
class Sum2Record:
    """An accepted sum2 message: ``mask_digest`` names its aggregate mask, which is in
    :meth:`CheckpointFiles.mask_path` (identical masks of honest summers once)."""

    device_id: str
    digest: bytes
    mask_digest: bytes
    failed: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A version of the global model with its files' contents.

    ``weights`` are little-endian float32 (any buffer when writing), ``message`` the
    signed ``GlobalModel`` as published, ``optimizer_state`` the server optimizer's
    state after this step. A version with a message is one file: its weights are
    read back as a view of the message (they are the message's last 4·M bytes), so
    the registry writes and fsyncs 4·M bytes per version, not twice that.
    """

    model_id: str
    version: int
    round_id: int | None
    digest: bytes
    weights: bytes | memoryview
    metrics: dict[str, float]
    message: bytes | bytearray | None
    optimizer_state: bytes | None
    created_at: float


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A row of the registry without the files: what listing versions needs.

    ``kept`` is False once the retention policy (``registry.keep_versions``)
    removed this version's files; its metadata stays.
    """

    model_id: str
    version: int
    round_id: int | None
    digest: bytes
    metrics: dict[str, float]
    created_at: float
    kept: bool


_ROUND_COLUMNS = (
    "round_id, phase, seed, previous_seed, p_sum, p_update, params, started_at, "
    "phase_opened_at, sum_dict, checkpoint_gen, update_log_size, outcome, detail, "
    "finished_at, model_version"
)
_PHASE_AT = _ROUND_COLUMNS.split(", ").index("phase")
_OUTCOME_AT = _ROUND_COLUMNS.split(", ").index("outcome")


class Transaction:
    """The writes of one transaction, buffered and run together on exit.

    Statements are collected (consecutive uses of one statement become one
    ``executemany``) and sent to SQLite as ``BEGIN IMMEDIATE`` … ``COMMIT`` when
    the ``async with`` block ends: a handful of round trips to the database
    thread per group commit, however many rows it holds, and the write lock is
    held only while they run.
    """

    def __init__(self, files: ModelFiles | None = None) -> None:
        self.statements: list[tuple[str, list[tuple[Any, ...]]]] = []
        self._files = files
        self.models_added: set[str] = set()

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        await self.executemany(sql, [params])

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if not batch:
            return
        if self.statements and self.statements[-1][0] == sql:
            self.statements[-1][1].extend(batch)
        else:
            self.statements.append((sql, batch))

    # -- rounds ---------------------------------------------------------------

    async def put_round(self, r: RoundRecord) -> None:
        await self.execute(
            f"INSERT OR REPLACE INTO rounds ({_ROUND_COLUMNS}) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.round_id,
                r.phase,
                r.seed,
                r.previous_seed,
                r.p_sum,
                r.p_update,
                r.params,
                r.started_at,
                r.phase_opened_at,
                r.sum_dict,
                r.checkpoint_gen,
                r.update_log_size,
                r.outcome,
                r.detail,
                r.finished_at,
                r.model_version,
            ),
        )
        if r.phase in LOGGED_PHASES:
            await self.execute(
                "INSERT OR IGNORE INTO phase_log (round_id, phase, opened_at) VALUES (?,?,?)",
                (r.round_id, r.phase, r.phase_opened_at),
            )

    async def set_meta(self, key: str, value: bytes) -> None:
        await self.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- participants ---------------------------------------------------------

    async def record_message(
        self, digest: bytes, round_id: int, kind: Phase, device_id: str, now: float
    ) -> None:
        await self.execute(
            "INSERT OR IGNORE INTO messages (digest, round_id, type, device_id, received_at) "
            "VALUES (?,?,?,?,?)",
            (digest, round_id, kind, device_id, now),
        )

    async def touch_device(
        self, device_id: str, public_key: bytes, serial: int, now: float
    ) -> None:
        await self.execute(
            "INSERT INTO devices (device_id, public_key, serial, first_seen, last_seen) "
            "VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
            "public_key=excluded.public_key, serial=excluded.serial, last_seen=excluded.last_seen",
            (device_id, public_key, serial, now, now),
        )

    async def add_summer(self, round_id: int, s: SummerRecord) -> None:
        await self.execute(
            "INSERT INTO summers (round_id, device_id, public_key, ephemeral_pk, digest, message) "
            "VALUES (?,?,?,?,?,?)",
            (round_id, s.device_id, s.public_key, s.ephemeral_pk, s.digest, s.message),
        )

    async def add_update(
        self, round_id: int, u: UpdateRecord, seeds: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """The update row plus its seed dictionary entries ``(summer pk, sealed seed)``."""
        await self.execute(
            "INSERT INTO updates (round_id, device_id, digest, generation, log_offset, "
            "log_length) VALUES (?,?,?,?,?,?)",
            (round_id, u.device_id, u.digest, u.generation, u.log_offset, u.log_length),
        )
        await self.executemany(
            "INSERT INTO seeds (round_id, summer_pk, update_digest, sealed) VALUES (?,?,?,?)",
            ((round_id, pk, u.digest, sealed) for pk, sealed in seeds),
        )

    async def add_sum2(self, round_id: int, s: Sum2Record) -> None:
        await self.execute(
            "INSERT INTO sum2 (round_id, device_id, digest, mask_digest, failed) "
            "VALUES (?,?,?,?,?)",
            (round_id, s.device_id, s.digest, s.mask_digest, b"".join(s.failed)),
        )

    async def add_model(self, m: ModelRecord) -> None:
        """Write the version's files now (fsynced, content-addressed) and its row at commit.

        A crash before the commit leaves files no row names; the coordinator
        deletes them at its next start (:meth:`Store.collect_model_files`).
        """
        if self._files is None:
            raise StorageError("this store has no model file directory")
        files = self._files
        # Named by digests already computed: the signed message's by its header's
        # body digest, weights alone (no message) by theirs (m.digest). A message
        # holds the weights: the row names it for both (one 4·M-byte file).
        if m.message is None:
            weights = asyncio.to_thread(files.put, m.weights, ".f32", digest=m.digest)
        else:
            weights = asyncio.to_thread(files.put_message, m.message)
        weights_file, optimizer_file = await asyncio.gather(
            weights,
            _none()
            if m.optimizer_state is None
            else asyncio.to_thread(files.put, m.optimizer_state, ".opt"),
        )
        message_file = None if m.message is None else weights_file
        await self.execute(
            "INSERT OR REPLACE INTO models (model_id, version, round_id, digest, metrics, "
            "weights_file, message_file, optimizer_file, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                m.model_id,
                m.version,
                m.round_id,
                m.digest,
                json.dumps(m.metrics, sort_keys=True),
                weights_file,
                message_file,
                optimizer_file,
                m.created_at,
            ),
        )
        self.models_added.add(m.model_id)

    async def count_rejections(self, rows: Iterable[tuple[str, str, int, float]]) -> None:
        """Add ``(device, reason, count, last_at)`` to the per-device rejection counts."""
        await self.executemany(
            "INSERT INTO device_rejections (device_id, reason, count, last_at) VALUES (?,?,?,?) "
            "ON CONFLICT(device_id, reason) DO UPDATE SET count = count + excluded.count, "
            "last_at = max(last_at, excluded.last_at)",
            rows,
        )

    async def store_receipts(self, rows: Iterable[tuple[bytes, str, bytes]]) -> None:
        """Accepted messages' receipts ``(message digest, topic, signed receipt)``, kept
        until the broker has them (see :mod:`.outbox`)."""
        await self.executemany(
            "INSERT OR REPLACE INTO receipt_outbox (digest, topic, payload) VALUES (?,?,?)", rows
        )

    async def receipts_delivered(self, digests: Iterable[bytes]) -> None:
        await self.executemany(
            "DELETE FROM receipt_outbox WHERE digest = ?", ((d,) for d in digests)
        )

    async def forget_round_bulk(self, round_id: int) -> None:
        """Drop the bulky per-round rows (masks, seeds) of a finished round."""
        await self.execute("DELETE FROM sum2 WHERE round_id = ?", (round_id,))
        await self.execute("DELETE FROM seeds WHERE round_id = ?", (round_id,))


async def _none() -> None:
    return None


def _body_digest(message: bytes | bytearray) -> bytes | None:
    """The body digest a signed message's header states (None: not a message; hash it)."""
    if len(message) < HEADER_SIZE:
        return None
    try:
        return Header.parse(memoryview(message)[:HEADER_SIZE]).body_digest
    except MaskflError:
        return None


def _message_weights(message: bytes, path: Path) -> memoryview:
    """The little-endian float32 weights of a stored signed ``GlobalModel``, as a view of
    ``message`` (its signature and body digest checked: a damaged file is an error)."""
    what = "read a model file"
    try:
        body = decode_message(message, max_size=len(message)).body
    except MaskflError as exc:
        raise StorageError(f"model file {path}: {exc}", path=str(path), operation=what) from exc
    if not isinstance(body, GlobalModel):
        raise StorageError(
            f"model file {path} holds a {type(body).__name__}, not a global model",
            path=str(path),
            operation=what,
        )
    return body.weights.data.cast("B")


def _run_transaction(
    conn: sqlite3.Connection, statements: list[tuple[str, list[tuple[Any, ...]]]]
) -> None:
    """BEGIN IMMEDIATE, every statement, COMMIT; ROLLBACK on any error (DB thread)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


class Store:
    """The coordinator's SQLite database. Use as ``async with Store.open(path) as store``."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, keep_versions: int | None = None
    ) -> None:
        self._db = db
        self.path = path
        self.files = ModelFiles(path.parent / MODELS_DIR)
        self.keep_versions = keep_versions

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, keep_versions: int | None = None) -> AsyncIterator[Store]:
        """Open (creating or migrating) the database at ``path``.

        ``keep_versions``: the registry's retention (the coordinator passes
        ``registry.keep_versions``): after each new model version, the files of
        all but the newest ``keep_versions`` versions are deleted (their rows,
        metadata only, stay). Readers such as the CLI pass nothing and never
        delete files.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite_errors(path, "open the coordinator database"):
            async with aiosqlite.connect(path, isolation_level=None, timeout=30) as db:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=FULL")
                await db.execute("PRAGMA foreign_keys=ON")
                await db.executescript(_SCHEMA)
                store = cls(db, path, keep_versions)
                version = await store.get_meta("schema_version")
                if version is None:
                    async with store.transaction() as tx:
                        await tx.set_meta("schema_version", str(SCHEMA_VERSION).encode())
                elif int(version) == 1:
                    await store._migrate_from_1()
                elif int(version) != SCHEMA_VERSION:
                    raise StorageError(
                        f"{path}: schema version {int(version)}, this coordinator reads "
                        f"{SCHEMA_VERSION} (and migrates 1); use a newer maskfl"
                    )
                yield store

    async def _migrate_from_1(self) -> None:
        """Schema 1 kept every version's weights, signed message and optimizer state as
        BLOBs in ``models`` (240 MB after one round at M = 1e7). Write them out as model
        files, rebuild ``models`` with file names, then VACUUM to give the space back.

        Under the write lock, so a second process opening the database meanwhile waits
        and then finds schema 2. A crash midway leaves schema 1 and some files, and
        the next open migrates again (files are content-addressed: rewriting is a no-op).
        """
        run = getattr(self._db, "_execute", None)
        if run is None:  # pragma: no cover - an aiosqlite without the private hook
            raise StorageError("cannot migrate: aiosqlite lacks its DB-thread hook")
        with sqlite_errors(self.path, "migrate schema 1 to 2"):
            migrated = await run(_migrate_models_1_to_2, self._db._conn, self.files)
        if migrated is not None:
            log.warning(
                "%s: migrated from schema 1 to 2: %d model versions moved to %s",
                self.path,
                migrated,
                self.files.dir,
            )
            with sqlite_errors(self.path, "vacuum after migrating"):
                await self._db.execute("VACUUM")
        if self.keep_versions is not None:
            for model_id in {m.model_id for m in await self.models()}:
                await self._prune(model_id)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Collect writes; on exit run them in one transaction, durable on return.

        Nothing is written if the block raises; a failing statement rolls back
        the whole transaction and raises :class:`StorageError`.
        """
        tx = Transaction(self.files)
        yield tx
        if not tx.statements:
            return
        run_in_db_thread = getattr(self._db, "_execute", None)
        with sqlite_errors(self.path, "commit a transaction"):
            if run_in_db_thread is not None:
                # One hop to aiosqlite's thread for the whole transaction: under
                # load every await on the loop costs a loop iteration, and a
                # group commit would otherwise pay one per statement.
                await run_in_db_thread(_run_transaction, self._db._conn, tx.statements)
            else:  # pragma: no cover - an aiosqlite without the private hook
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in tx.statements:
                        await self._db.executemany(sql, rows)
                    await self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                    raise
        if self.keep_versions is not None:
            for model_id in tx.models_added:
                await self._prune(model_id)

    async def _prune(self, model_id: str) -> None:
        """Apply ``keep_versions``: forget the files of older versions, then delete them."""
        assert self.keep_versions is not None
        with sqlite_errors(self.path, "forget old model versions"):
            await self._db.execute(
                "UPDATE models SET weights_file = NULL, message_file = NULL, optimizer_file = NULL "
                "WHERE model_id = ? AND version <= "
                "(SELECT MAX(version) FROM models WHERE model_id = ?) - ? "
                "AND weights_file IS NOT NULL",
                (model_id, model_id, self.keep_versions),
            )
        await self.collect_model_files()

    async def collect_model_files(self) -> int:
        """Delete model files no registry row names (pruned versions, or written by a
        transaction that a crash kept from committing). Only the coordinator calls
        this: it is the only writer. Returns how many files were deleted."""
        rows = await self._all(
            "SELECT weights_file, message_file, optimizer_file FROM models "
            "WHERE weights_file IS NOT NULL"
        )
        named = {str(name) for row in rows for name in row if name is not None}
        return await asyncio.to_thread(self.files.keep_only, named)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with sqlite_errors(self.path, "read the coordinator database"):
            cursor = await self._db.execute(sql, tuple(params))
            rows = await cursor.fetchall()
            await cursor.close()
        return list(rows)  # type: ignore[arg-type]

    async def get_meta(self, key: str) -> bytes | None:
        rows = await self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    # -- rounds ---------------------------------------------------------------

    @staticmethod
    def _round(row: sqlite3.Row | tuple[Any, ...]) -> RoundRecord:
        values = list(row)
        try:
            values[_PHASE_AT] = Phase(values[_PHASE_AT])
            if values[_OUTCOME_AT] is not None:
                values[_OUTCOME_AT] = RoundOutcome(values[_OUTCOME_AT])
        except ValueError as exc:
            raise StorageError(f"round {values[0]}: unknown phase or outcome: {exc}") from exc
        return RoundRecord(*values)

    async def last_round(self) -> RoundRecord | None:
        rows = await self._all(
            f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round_id DESC LIMIT 1"
        )
        return self._round(rows[0]) if rows else None

    async def get_round(self, round_id: int) -> RoundRecord | None:
        rows = await self._all(
            f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round_id = ?", (round_id,)
        )
        return self._round(rows[0]) if rows else None

    async def rounds(self, limit: int = 20) -> list[RoundRecord]:
        rows = await self._all(
            f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,)
        )
        return [self._round(r) for r in rows]

    # -- participants ---------------------------------------------------------

    async def message_round(self, digest: bytes) -> tuple[int, str] | None:
        """The round and type of an already accepted message, or None."""
        rows = await self._all("SELECT round_id, type FROM messages WHERE digest = ?", (digest,))
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    async def stored_receipts(self) -> list[tuple[bytes, str, bytes]]:
        """``(message digest, topic, signed receipt)`` not yet delivered to the broker."""
        rows = await self._all("SELECT digest, topic, payload FROM receipt_outbox ORDER BY rowid")
        return [(bytes(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    async def summers(self, round_id: int) -> list[SummerRecord]:
        rows = await self._all(
            "SELECT device_id, public_key, ephemeral_pk, digest, message FROM summers "
            "WHERE round_id = ? ORDER BY device_id",
            (round_id,),
        )
        return [
            SummerRecord(str(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3]), bytes(r[4]))
            for r in rows
        ]

    async def updates(self, round_id: int) -> list[UpdateRecord]:
        rows = await self._all(
            "SELECT device_id, digest, generation, log_offset, log_length FROM updates "
            "WHERE round_id = ? ORDER BY log_offset",
            (round_id,),
        )
        return [UpdateRecord(str(r[0]), bytes(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

    async def seeds_for(self, round_id: int, summer_pk: bytes) -> list[tuple[bytes, bytes]]:
        rows = await self._all(
            "SELECT update_digest, sealed FROM seeds WHERE round_id = ? AND summer_pk = ? "
            "ORDER BY update_digest",
            (round_id, summer_pk),
        )
        return [(bytes(r[0]), bytes(r[1])) for r in rows]

    async def sum2s(self, round_id: int) -> list[Sum2Record]:
        rows = await self._all(
            "SELECT device_id, digest, mask_digest, failed FROM sum2 WHERE round_id = ? "
            "ORDER BY device_id",
            (round_id,),
        )
        out = []
        for r in rows:
            failed = bytes(r[3])
            out.append(
                Sum2Record(
                    str(r[0]),
                    bytes(r[1]),
                    bytes(r[2]),
                    tuple(failed[i : i + 32] for i in range(0, len(failed), 32)),
                )
            )
        return out

    async def phase_log(self, since_round: int) -> list[tuple[int, Phase, float]]:
        """``(round, phase, opened_at)`` of every logged phase from ``since_round`` on."""
        rows = await self._all(
            "SELECT round_id, phase, opened_at FROM phase_log WHERE round_id >= ? "
            "ORDER BY round_id, opened_at",
            (since_round,),
        )
        try:
            return [(int(r[0]), Phase(r[1]), float(r[2])) for r in rows]
        except ValueError as exc:
            raise StorageError(f"unknown phase in phase_log: {exc}") from exc

    async def participant_counts(self, since_round: int) -> dict[int, dict[str, int]]:
        """Accepted summers, updates and sum2 masks per round from ``since_round`` on."""
        out: dict[int, dict[str, int]] = {}
        for table in ("summers", "updates"):
            rows = await self._all(
                f"SELECT round_id, COUNT(*) FROM {table} WHERE round_id >= ? GROUP BY round_id",
                (since_round,),
            )
            for r in rows:
                out.setdefault(int(r[0]), {})[table] = int(r[1])
        rows = await self._all(
            "SELECT round_id, COUNT(*) FROM messages WHERE round_id >= ? AND type = 'sum2' "
            "GROUP BY round_id",
            (since_round,),
        )
        for r in rows:
            out.setdefault(int(r[0]), {})["sum2"] = int(r[1])
        return out

    async def devices(self) -> list[tuple[str, int, float, float]]:
        """``(device, serial, first_seen, last_seen)`` of every device ever accepted."""
        rows = await self._all(
            "SELECT device_id, serial, first_seen, last_seen FROM devices ORDER BY device_id"
        )
        return [(str(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in rows]

    async def device_messages(self) -> list[tuple[str, str, int]]:
        """``(device, type, count)`` of accepted messages."""
        rows = await self._all(
            "SELECT device_id, type, COUNT(*) FROM messages GROUP BY device_id, type"
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def device_roles(self, since_round: int) -> list[tuple[str, int, str]]:
        """``(device, round, type)`` of the messages accepted from ``since_round`` on."""
        rows = await self._all(
            "SELECT device_id, round_id, type FROM messages WHERE round_id >= ? ORDER BY round_id",
            (since_round,),
        )
        return [(str(r[0]), int(r[1]), str(r[2])) for r in rows]

    async def device_rejections(self) -> list[tuple[str, str, int, float]]:
        """``(device, reason, count, last_at)`` of every counted rejection."""
        rows = await self._all(
            "SELECT device_id, reason, count, last_at FROM device_rejections "
            "ORDER BY device_id, reason"
        )
        return [(str(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    async def device_count(self) -> int:
        rows = await self._all("SELECT COUNT(*) FROM devices")
        return int(rows[0][0])

    # -- models ---------------------------------------------------------------

    _MODEL_COLUMNS = (
        "model_id, version, round_id, digest, metrics, weights_file, message_file, "
        "optimizer_file, created_at"
    )

    @staticmethod
    def _info(r: sqlite3.Row | tuple[Any, ...]) -> ModelInfo:
        return ModelInfo(
            model_id=str(r[0]),
            version=int(r[1]),
            round_id=None if r[2] is None else int(r[2]),
            digest=bytes(r[3]),
            metrics={str(k): float(v) for k, v in json.loads(r[4]).items()},
            created_at=float(r[8]),
            kept=r[5] is not None,
        )

    async def _record(self, r: sqlite3.Row | tuple[Any, ...]) -> ModelRecord:
        info = self._info(r)
        if r[5] is None:
            raise StorageError(
                f"the files of {info.model_id} v{info.version} were deleted by the retention "
                "policy (registry.keep_versions); only its metadata is kept"
            )
        files = self.files

        def read() -> tuple[bytes | memoryview, bytes | None, bytes | None]:
            message = None if r[6] is None else files.read(str(r[6]))
            if message is not None and r[5] == r[6]:
                weights: bytes | memoryview = _message_weights(message, files.dir / str(r[6]))
            else:
                weights = files.read(str(r[5]))
            return weights, message, None if r[7] is None else files.read(str(r[7]))

        weights, message, optimizer_state = await asyncio.to_thread(read)
        return ModelRecord(
            model_id=info.model_id,
            version=info.version,
            round_id=info.round_id,
            digest=info.digest,
            weights=weights,
            metrics=info.metrics,
            message=message,
            optimizer_state=optimizer_state,
            created_at=info.created_at,
        )

    async def latest_model(self, model_id: str) -> ModelRecord | None:
        rows = await self._all(
            f"SELECT {self._MODEL_COLUMNS} FROM models WHERE model_id = ? "
            "ORDER BY version DESC LIMIT 1",
            (model_id,),
        )
        return await self._record(rows[0]) if rows else None

    async def model(self, model_id: str, version: int) -> ModelRecord | None:
        """The version with its files; StorageError if retention deleted them."""
        rows = await self._all(
            f"SELECT {self._MODEL_COLUMNS} FROM models WHERE model_id = ? AND version = ?",
            (model_id, version),
        )
        return await self._record(rows[0]) if rows else None

    async def model_metrics(self, model_id: str) -> list[tuple[int, int | None, dict[str, float]]]:
        """``(version, round, metrics)`` of every version, without the weights."""
        rows = await self._all(
            "SELECT version, round_id, metrics FROM models WHERE model_id = ? ORDER BY version",
            (model_id,),
        )
        return [
            (
                int(r[0]),
                None if r[1] is None else int(r[1]),
                {str(k): float(v) for k, v in json.loads(r[2]).items()},
            )
            for r in rows
        ]

    async def models(self, model_id: str | None = None) -> list[ModelInfo]:
        """Every version's metadata (no files are read)."""
        where, params = ("WHERE model_id = ?", (model_id,)) if model_id else ("", ())
        rows = await self._all(
            f"SELECT {self._MODEL_COLUMNS} FROM models {where} ORDER BY model_id, version",
            params,
        )
        return [self._info(r) for r in rows]


CHECKPOINTS_DIR = "checkpoints"
"""Aggregate checkpoints and sum2 masks, next to the database."""
MODELS_DIR = "models"
"""The registry's files, next to the database: ``<sha256>.msg`` (signed ``GlobalModel``
messages, named by their header's body digest; a version's weights are read from
it), ``<sha256>.f32`` (weights of a version with no message, the initial one, named
by their :func:`~maskfl.protocol.messages.weights_digest`), ``<sha256>.opt``
(optimizer state)."""


class ModelFiles:
    """Content-addressed files of the model registry (blocking I/O).

    A file is named by the SHA-256 of its bytes, written to a temp file, fsynced,
    renamed and the directory fsynced; writing the same content twice is a no-op.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def put(
        self, data: bytes | bytearray | memoryview, suffix: str, *, digest: bytes | None = None
    ) -> str:
        """Store ``data``; returns its file name. ``digest``: its SHA-256 if known."""
        view = memoryview(data).cast("B")
        name = (digest or hashlib.sha256(view).digest()).hex() + suffix
        final = self.dir / name
        if final.is_file() and final.stat().st_size == len(view):
            return name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write model file {final}: {exc}") from exc
        _write_durably(final, final.with_name(f".{name}.tmp"), [view], "model file")
        return name

    def put_message(self, message: bytes | bytearray) -> str:
        """Store a signed message, named by the body digest its header states (no
        second SHA-256 pass over 4·M bytes; hashed when it has no header)."""
        return self.put(message, ".msg", digest=_body_digest(message))

    def read(self, name: str) -> bytes:
        try:
            return (self.dir / name).read_bytes()
        except OSError as exc:
            raise StorageError(f"model file {self.dir / name} unreadable: {exc}") from exc

    def keep_only(self, names: set[str]) -> int:
        """Delete every file (and temp file) not in ``names``; returns how many."""
        if not self.dir.is_dir():
            return 0
        deleted = 0
        for p in list(self.dir.iterdir()):
            if p.name not in names and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    deleted += 1
        return deleted


def _migrate_models_1_to_2(conn: sqlite3.Connection, files: ModelFiles) -> int | None:
    """Schema 1 → 2 in the DB thread, in one write transaction; the number of model rows
    moved, or None when another process migrated first."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != 1:
            conn.execute("ROLLBACK")
            return None
        moved = _move_models_to_files(conn, files)
        _move_sum2_masks_to_files(conn, files)
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            (str(SCHEMA_VERSION).encode(),),
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return moved


def _move_models_to_files(conn: sqlite3.Connection, files: ModelFiles) -> int:
    """Schema 1 → 2: model weights, messages and optimizer states out of the models table
    into content-addressed files, the table keeping their names; how many versions moved."""
    conn.execute(
        "CREATE TABLE models_v2 (model_id TEXT NOT NULL, version INTEGER NOT NULL, "
        "round_id INTEGER, digest BLOB NOT NULL, metrics TEXT NOT NULL, weights_file TEXT, "
        "message_file TEXT, optimizer_file TEXT, created_at REAL NOT NULL, "
        "PRIMARY KEY (model_id, version))"
    )
    keys = conn.execute("SELECT model_id, version FROM models").fetchall()
    for model_id, version in keys:  # one version in memory at a time
        r = conn.execute(
            "SELECT round_id, digest, weights, metrics, message, optimizer_state, created_at "
            "FROM models WHERE model_id = ? AND version = ?",
            (model_id, version),
        ).fetchone()
        conn.execute(
            "INSERT INTO models_v2 VALUES (?,?,?,?,?,?,?,?,?)",
            (
                model_id,
                version,
                r[0],
                r[1],
                r[3],
                files.put(r[2], ".f32"),
                None if r[4] is None else files.put(r[4], ".msg"),
                None if r[5] is None else files.put(r[5], ".opt"),
                r[6],
            ),
        )
    conn.execute("DROP TABLE models")
    conn.execute("ALTER TABLE models_v2 RENAME TO models")
    return len(keys)


def _move_sum2_masks_to_files(conn: sqlite3.Connection, files: ModelFiles) -> None:
    """Schema 1 → 2: sum2 masks of an unfinished round to checkpoint files, the table
    keeping their digests."""
    masks = CheckpointFiles(files.dir.parent / CHECKPOINTS_DIR)
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(sum2)").fetchall()}
    pending = (
        []
        if "mask" not in columns
        else conn.execute("SELECT round_id, device_id FROM sum2").fetchall()
    )
    for round_id, device_id in pending:
        (mask,) = conn.execute(
            "SELECT mask FROM sum2 WHERE round_id = ? AND device_id = ?", (round_id, device_id)
        ).fetchone()
        digest = hashlib.sha256(mask).digest()
        masks.write_mask(round_id, digest, mask)
        conn.execute(
            "UPDATE sum2 SET mask = ? WHERE round_id = ? AND device_id = ?",
            (digest, round_id, device_id),
        )
    if "mask" in columns:
        conn.execute("ALTER TABLE sum2 RENAME COLUMN mask TO mask_digest")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_SLICE = 1 << 20
"""Bytes per ``write`` of :func:`_write_durably`. One 100 MB write lets the kernel back
the file with 2 MB page-cache folios, the blocks this VM's balloon driver hands back to
the host, and touching them again costs the host's page faults: 0.25-0.31 CPU-s per
100 MB in 6 of 6 writes after a 6 s pause, against 0.026-0.033 in 1 MiB writes (6 of 6;
docs/operations.md, "Fresh memory on virtual machines")."""


def _write_durably(final: Path, tmp: Path, parts: Sequence[bytes | memoryview], what: str) -> None:
    """``parts`` to ``tmp`` (in writes of :data:`WRITE_SLICE` bytes), fsync, rename onto
    ``final``, fsync the directory: all or nothing. One sequence for checkpoints, sum2
    masks and model files; ``what`` names the file in the StorageError."""
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                with memoryview(part) as view, view.cast("B") as data:
                    for start in range(0, data.nbytes, WRITE_SLICE):
                        f.write(data[start : start + WRITE_SLICE])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {what} {final}: {exc}") from exc


class CheckpointFiles:
    """Aggregate checkpoints: ``round-<r>.gen-<g>.agg``, written atomically (blocking I/O)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, round_id: int, gen: int) -> Path:
        return self.dir / f"round-{round_id}.gen-{gen}.agg"

    def write(self, round_id: int, gen: int, image: bytes | Sequence[bytes | memoryview]) -> None:
        """temp file, fsync, rename, fsync the directory: all or nothing. ``image`` may
        come in parts (:meth:`~maskfl.aggregator_gpu.Accumulator.checkpoint_image`)."""
        final = self.path(round_id, gen)
        parts = [image] if isinstance(image, bytes) else image
        _write_durably(final, final.with_suffix(".tmp"), parts, "checkpoint")

    def read(self, round_id: int, gen: int) -> bytes:
        try:
            return self.path(round_id, gen).read_bytes()
        except OSError as exc:
            raise StorageError(f"checkpoint {self.path(round_id, gen)} unreadable: {exc}") from exc

    def mask_path(self, round_id: int, digest: bytes) -> Path:
        """Where a sum2 aggregate mask lives, named by its SHA-256 (``mask_digest``)."""
        return self.dir / f"round-{round_id}.mask-{digest.hex()}"

    def write_mask(self, round_id: int, digest: bytes, data: bytes | memoryview) -> None:
        """temp file, fsync, rename (a mask already there is the same mask)."""
        final = self.mask_path(round_id, digest)
        if final.is_file():
            return
        _write_durably(final, final.with_name(final.name + ".tmp"), [data], "sum2 mask")

    def add_mask_into(self, round_id: int, digest: bytes, out: Words) -> None:
        """Add a sum2 mask into ``out``; its file must hold exactly ``out``'s words."""
        add_from_file(out, self.mask_path(round_id, digest), 0, "sum2 mask", whole=True)

    def map_mask(self, round_id: int, digest: bytes, size: int) -> memoryview:
        """The mask's ``size`` bytes, mapped read-only from its file (unmapped when the
        last view of it goes). The sum2 phase wrote the file, so the page cache
        holds it: nothing is copied, and no fresh 4·M bytes are touched (on this
        machine fresh memory costs 0.02 to 0.3 CPU-s per 100 MB, see
        docs/operations.md). Mask files are never rewritten or truncated in place."""
        path = self.mask_path(round_id, digest)
        try:
            with path.open("rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    raise StorageError(f"sum2 mask {path} is not {size} bytes long")
                if size == 0:
                    return memoryview(b"")
                return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))
        except OSError as exc:
            raise StorageError(f"sum2 mask {path} unreadable: {exc}") from exc

    def prune_masks(self, keep_round: int | None = None) -> None:
        """Delete the sum2 masks of every round but ``keep_round``."""
        keep = f"round-{keep_round}.mask-"
        for p in list(self.dir.glob("round-*.mask-*")):
            if keep_round is None or not p.name.startswith(keep):
                with contextlib.suppress(OSError):
                    p.unlink()

    def prune(self, round_id: int | None = None, keep_gen: int | None = None) -> None:
        """Delete every checkpoint except ``(round_id, keep_gen)`` (and temp files)."""
        keep = None if round_id is None or keep_gen is None else self.path(round_id, keep_gen)
        for p in list(self.dir.glob("round-*.gen-*")):
            if p != keep:
                with contextlib.suppress(OSError):
                    p.unlink()


class UpdateLog:
    """The masked words of a round's accepted updates, append-only (blocking I/O)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, round_id: int) -> Path:
        return self.dir / f"round-{round_id}.log"

    def append(
        self, round_id: int, start: int, blobs: Sequence[Any], *, fsync: bool = False
    ) -> list[int]:
        """Write ``blobs`` at offset ``start`` (truncating anything after it); return each
        blob's offset. With ``fsync`` the data also survives an OS crash or power loss;
        without it, it survives a crash of the process (the kernel has it), which is
        what the round needs: see the module docstring."""
        offsets = []
        try:
            fd = os.open(self.path(round_id), os.O_RDWR | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as f:
                f.truncate(start)
                f.seek(start)
                pos = start
                for blob in blobs:
                    offsets.append(pos)
                    f.write(blob)
                    pos += memoryview(blob).nbytes
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"cannot append to {self.path(round_id)}: {exc}") from exc
        return offsets

    def add_into(self, round_id: int, offset: int, out: Words) -> None:
        """Add the ``out.size`` words logged at ``offset`` into ``out`` (:func:`add_from_file`)."""
        add_from_file(out, self.path(round_id), offset, "update log")

    def prune(self, keep_round: int | None = None) -> None:
        keep = None if keep_round is None else self.path(keep_round)
        for p in list(self.dir.glob("round-*.log")):
            if p != keep:
                with contextlib.suppress(OSError):
                    p.unlink()


def now() -> float:
    """Wall-clock seconds: phase deadlines must survive a restart, so not monotonic."""
    return time.time()


_SLICE_BYTES = 16 << 20


def add_from_file(out: Words, path: Path, offset: int, what: str, *, whole: bool = False) -> None:
    """Add the ``out.size`` words stored at ``offset`` in ``path`` into ``out`` (wrapping
    as ``out``'s dtype does), 16 MiB at a time: no model-sized buffer besides ``out``
    (blocking I/O: the unmask runs it in a worker thread). ``whole``:
    the file must hold exactly those words."""
    step = max(1, _SLICE_BYTES // out.itemsize)
    part = np.empty(min(step, out.size), dtype=out.dtype)
    try:
        with path.open("rb") as f:
            if whole and os.fstat(f.fileno()).st_size != out.nbytes:
                raise StorageError(f"{what} {path} is not {out.nbytes} bytes long")
            f.seek(offset)
            for start in range(0, out.size, step):
                n = min(step, out.size - start)
                view = part[:n]
                if f.readinto(view.data.cast("B")) != view.nbytes:
                    raise StorageError(f"{what} {path} is shorter than the round says")
                np.add(out[start : start + n], view, out=out[start : start + n])
    except OSError as exc:
        raise StorageError(f"{what} {path} unreadable: {exc}") from exc
