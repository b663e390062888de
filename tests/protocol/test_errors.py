"""The exception tree's helpers: sqlite errors translated in one place."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from maskfl.protocol.errors import StorageError, sqlite_errors


def test_sqlite_errors_name_the_file_and_the_operation(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"not a database, but long enough to have a header" * 4)
    with (
        contextlib.closing(sqlite3.connect(db)) as con,
        pytest.raises(StorageError) as caught,
        sqlite_errors(db, "count the rows"),
    ):
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
    err = caught.value
    assert str(err).startswith(f"count the rows ({db}): ")
    assert "not a database" in str(err)
    assert err.path == str(db) and err.operation == "count the rows"
    assert isinstance(err.__cause__, sqlite3.DatabaseError)


async def test_sqlite_errors_wrap_awaited_code_and_leave_others_alone(tmp_path: Path) -> None:
    async def fails() -> None:
        raise sqlite3.OperationalError("database is locked")

    with (
        pytest.raises(StorageError, match=r"^commit \(db\): database is locked$"),
        sqlite_errors("db", "commit"),
    ):
        await fails()
    with pytest.raises(KeyError), sqlite_errors("db", "commit"):
        raise KeyError("not sqlite's")
    with sqlite_errors("db", "nothing"):
        pass
