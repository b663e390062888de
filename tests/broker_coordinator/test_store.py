"""The SQLite store and the checkpoint / update-log files."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from maskfl.broker_coordinator.store import (
    WRITE_SLICE,
    CheckpointFiles,
    ModelFiles,
    ModelRecord,
    RoundRecord,
    Store,
    SummerRecord,
    UpdateLog,
    UpdateRecord,
)
from maskfl.protocol.errors import StorageError
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import GlobalModel, encode_message, weights_digest
from maskfl.protocol.phases import Phase
from maskfl.protocol.round import RoundOutcome


def _round(rid: int = 1, **kw: object) -> RoundRecord:
    base = dict(
        round_id=rid,
        phase=Phase.SUM,
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
        await tx.put_round(_round(phase=Phase.UPDATE, checkpoint_gen=3))
        await tx.add_update(1, UpdateRecord("u1", b"d" * 32, 3, -1, 44), [(b"p" * 32, b"x" * 80)])
        await tx.record_message(b"d" * 32, 1, Phase.UPDATE, "u1", 2.0)
        await tx.add_model(_model(1, b"\0" * 8))
    async with Store.open(path) as store:
        assert (await store.last_round()).checkpoint_gen == 3  # type: ignore[union-attr]
        assert [u.device_id for u in await store.updates(1)] == ["u1"]
        assert await store.seeds_for(1, b"p" * 32) == [(b"d" * 32, b"x" * 80)]
        assert await store.message_round(b"d" * 32) == (1, "update")
        latest = await store.latest_model("m")
        assert latest is not None and latest.metrics == {"updates": 1.0}


async def test_round_phase_and_outcome_are_enums_stored_as_their_values(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with Store.open(path) as store:
        async with store.transaction() as tx:
            await tx.put_round(_round(1, phase=Phase.IDLE, outcome=RoundOutcome.COMPLETED))
            await tx.put_round(_round(2, phase=Phase.SUM2))
        done, running = await store.get_round(1), await store.last_round()
        assert done is not None and running is not None
        assert done.phase is Phase.IDLE and done.outcome is RoundOutcome.COMPLETED
        assert running.phase is Phase.SUM2 and running.outcome is None
        assert [p for r, p, _ in await store.phase_log(1) if r == 2] == [Phase.SUM2]
    con = sqlite3.connect(path)
    rows = con.execute("SELECT round_id, phase, outcome FROM rounds ORDER BY round_id").fetchall()
    assert rows == [(1, "idle", "completed"), (2, "sum2", None)]  # the same strings as before
    con.execute("UPDATE rounds SET outcome = 'exploded' WHERE round_id = 1")
    con.commit()
    con.close()
    async with Store.open(path) as store:
        with pytest.raises(StorageError, match=r"round 1: unknown phase or outcome.*exploded"):
            await store.get_round(1)


async def test_sqlite_errors_name_the_database_and_what_was_done(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with Store.open(path) as store:
        async with store.transaction() as tx:
            await tx.put_round(_round())
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("DROP TABLE phase_log")
            other.commit()
        with pytest.raises(StorageError, match=r"^commit a transaction \(.*c\.db\): no such table"):
            async with store.transaction() as tx:
                await tx.put_round(_round(2))
        assert (await store.last_round()) == _round()  # rolled back: round 2 is not there
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("DROP TABLE rounds")
            other.commit()
        with pytest.raises(StorageError) as caught:
            await store.last_round()
        assert caught.value.operation == "read the coordinator database"
        assert caught.value.path == str(path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file at all" * 8)
    with pytest.raises(StorageError, match=r"^open the coordinator database \(.*garbage\.db\)"):
        async with Store.open(garbage):
            pass


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


def test_large_files_are_written_whole_in_slices(tmp_path: Path) -> None:
    """Parts larger than a write slice, of any item size, are written byte for byte."""
    words = np.arange(WRITE_SLICE // 2 + 3, dtype=np.uint32)  # 2 MiB + 12 bytes
    head, tail = b"h" * 13, bytes(range(256)) * (WRITE_SLICE // 256) + b"t"
    files = CheckpointFiles(tmp_path / "ck")
    files.write(1, 1, [head, memoryview(words), tail])
    assert files.read(1, 1) == head + words.tobytes() + tail
    models = ModelFiles(tmp_path / "models")
    name = models.put(memoryview(words), ".f32")
    assert (tmp_path / "models" / name).read_bytes() == words.tobytes()
    assert name == hashlib.sha256(words.tobytes()).hexdigest() + ".f32"


def test_update_log_overwrites_an_uncommitted_tail(tmp_path: Path) -> None:
    log = UpdateLog(tmp_path / "u")
    assert log.append(1, 0, [b"aaaa", b"bb"]) == [0, 4]
    assert log.append(1, 6, [b"garbage-from-a-crash"]) == [6]
    assert log.append(1, 6, [b"cc"], fsync=True) == [6]  # the database said 6 bytes
    assert log.path(1).read_bytes() == b"aaaabbcc"
    out = np.zeros(2, np.uint8)
    log.add_into(1, 4, out)
    assert out.tobytes() == b"bb"
    with pytest.raises(StorageError):
        log.add_into(1, 6, np.zeros(10, np.uint8))


_KEY = nacl.signing.SigningKey(bytes(range(32)))


def _model(version: int, weights: bytes, signed: bool = True) -> ModelRecord:
    """Version ``version`` of model ``m``; ``signed``: with its signed GlobalModel message
    (every version a round published; the initial weights have none)."""
    w = np.frombuffer(weights, dtype="<f4")
    body = GlobalModel("m", version, RoundId(version), bytes(32), w, (("updates", 1.0),))
    message = encode_message(body, fleet="f", round_id=version, signing_key=_KEY)
    return ModelRecord(
        "m",
        version,
        version or None,
        weights_digest(w),
        weights,
        {"updates": float(version)},
        message if signed else None,
        b"opt" if version else None,
        float(version),
    )


async def test_the_registry_keeps_files_and_the_newest_versions(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with Store.open(path, keep_versions=2) as store:
        for v in range(5):
            async with store.transaction() as tx:
                await tx.add_model(_model(v, bytes([v]) * 4000, signed=v > 0))
        latest = await store.latest_model("m")
        assert latest is not None and latest.version == 4 and latest.weights == bytes([4]) * 4000
        assert latest.message == _model(4, bytes([4]) * 4000).message
        assert latest.optimizer_state == b"opt"
        assert [(m.version, m.kept) for m in await store.models()] == [
            (0, False),
            (1, False),
            (2, False),
            (3, True),
            (4, True),
        ]
        with pytest.raises(StorageError, match="keep_versions"):
            await store.model("m", 1)
        names = sorted(p.name for p in (tmp_path / "models").iterdir())
        # two versions' signed messages (each holds its weights: no second file) and
        # (one shared, content-addressed) optimizer state
        assert sorted(n.split(".")[1] for n in names) == ["msg", "msg", "opt"]
        assert all(len(n.split(".")[0]) == 64 for n in names)
    # the blobs left SQLite: the database holds metadata only
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(LENGTH(metrics)) FROM models").fetchone()[0] < 200
    assert path.stat().st_size < 200_000


async def test_files_no_row_names_are_collected(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "c.db", keep_versions=10) as store:
        async with store.transaction() as tx:
            await tx.add_model(_model(0, b"\0" * 400, signed=False))
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:  # files written, then a crash before commit
                await tx.add_model(_model(1, b"\1" * 400))
                raise RuntimeError("killed")
        assert len(list((tmp_path / "models").iterdir())) == 3
        assert await store.collect_model_files() == 2  # v1's message, its optimizer state
        assert (await store.latest_model("m")).version == 0  # type: ignore[union-attr]


async def test_a_damaged_model_message_is_an_error_naming_its_file(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "c.db") as store:
        async with store.transaction() as tx:
            await tx.add_model(_model(1, bytes([1]) * 400))
        assert (await store.model("m", 1)).weights == bytes([1]) * 400  # type: ignore[union-attr]
        (message,) = (tmp_path / "models").glob("*.msg")
        data = bytearray(message.read_bytes())
        data[-1] ^= 1  # one weight bit: the header's body digest no longer matches
        message.write_bytes(bytes(data))
        with pytest.raises(StorageError, match=message.name):
            await store.model("m", 1)


def _schema_1(path: Path, versions: int, size: int) -> None:
    """A coordinator.db as schema 1 wrote it: every version's blobs in ``models``."""
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);"
            "CREATE TABLE models (model_id TEXT NOT NULL, version INTEGER NOT NULL, "
            "round_id INTEGER, digest BLOB NOT NULL, weights BLOB NOT NULL, metrics TEXT NOT NULL,"
            " message BLOB, optimizer_state BLOB, created_at REAL NOT NULL, "
            "PRIMARY KEY (model_id, version));"
            "CREATE TABLE sum2 (round_id INTEGER NOT NULL, device_id TEXT NOT NULL, "
            "digest BLOB NOT NULL, mask BLOB NOT NULL, failed BLOB NOT NULL, "
            "PRIMARY KEY (round_id, device_id));"
        )
        db.execute("INSERT INTO sum2 VALUES (7, 's1', ?, ?, ?)", (b"d" * 32, b"\5" * size, b""))
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (b"1",))
        for v in range(versions):
            w = bytes([v]) * size
            db.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    "m",
                    v,
                    v or None,
                    hashlib.sha256(w).digest(),
                    w,
                    '{"updates": 1.0}',
                    None if v == 0 else b"M" * size,
                    None,
                    1.0,
                ),
            )


async def test_a_schema_1_database_is_migrated_to_files(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    size = 1 << 20
    _schema_1(path, versions=4, size=size)
    before = path.stat().st_size
    assert before > 7 << 20
    async with Store.open(path, keep_versions=3) as store:
        latest = await store.latest_model("m")
        assert latest is not None and latest.version == 3
        assert latest.weights == bytes([3]) * (1 << 20) and latest.message == b"M" * (1 << 20)
        assert [m.kept for m in await store.models()] == [False, True, True, True]
        assert await store.get_meta("schema_version") == b"2"
        (sum2,) = await store.sum2s(7)  # a round in sum2: its mask moved to a file too
        assert sum2.mask_digest == hashlib.sha256(b"\5" * size).digest()
        mapped = CheckpointFiles(tmp_path / "checkpoints").map_mask(7, sum2.mask_digest, size)
        assert mapped == b"\5" * size and mapped.readonly
        with pytest.raises(StorageError, match="is not 8 bytes long"):  # a short or long file
            CheckpointFiles(tmp_path / "checkpoints").map_mask(7, sum2.mask_digest, 8)
    assert path.stat().st_size < before / 20  # VACUUM gave the space back
    async with Store.open(path) as store:  # opening again: nothing to migrate
        assert (await store.model("m", 1)).weights == bytes([1]) * (1 << 20)  # type: ignore[union-attr]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with Store.open(path) as store, store.transaction() as tx:
        await tx.set_meta("schema_version", b"3")
    with pytest.raises(StorageError, match="schema version 3"):
        async with Store.open(path):
            pass
