"""The one exception tree: drawn in protocol/errors.py as it is; sqlite errors translated
in one place."""

from __future__ import annotations

import ast
import contextlib
import importlib
import pkgutil
import re
import sqlite3
from pathlib import Path

import pytest

from maskfl.protocol import errors
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


# -- the drawn tree -------------------------------------------------------------------


def _packages() -> tuple[str, ...]:
    """The top-level folders setup.py maps onto ``maskfl.`` (so a new one is covered)."""
    tree = ast.parse((Path(__file__).parents[2] / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "TOP_LEVEL":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no TOP_LEVEL")


_DRAWN = re.compile(
    r"^(?P<indent>[ │├└─]*?)(?:[├└]── )?(?P<name>[A-Z]\w+)(?: \[(?P<module>[\w.]+)\])?"
)


def _import_everything() -> set[str]:
    """Import every maskfl module; the names of those that need a missing optional
    dependency (tensorflow for models.build, cupy on a machine without it)."""
    missing = set()
    for package in _packages():
        root = importlib.import_module(f"maskfl.{package}")
        for info in pkgutil.walk_packages(root.__path__, f"maskfl.{package}."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if exc.name is None or exc.name.startswith("maskfl"):
                    raise
                missing.add(info.name.removeprefix("maskfl."))
    return missing


def _drawn_tree() -> set[tuple[str, str]]:
    """(parent, child) edges of the docstring's drawing, as module.Name."""
    doc = errors.__doc__ or ""
    lines = doc[doc.index("    MaskflError\n") :].split("\n\n")[0].splitlines()
    edges: set[tuple[str, str]] = set()
    path: list[str] = []
    for line in lines:
        found = _DRAWN.match(line[4:])
        assert found is not None, line
        depth = len(found["indent"]) // 4 + (1 if found["indent"] or "──" in line else 0)
        name = f"{found['module'] or 'protocol.errors'}.{found['name']}"
        del path[depth:]
        if path:
            edges.add((path[-1], name))
        path.append(name)
    return edges


def _real_tree() -> set[tuple[str, str]]:
    def qualified(cls: type) -> str:
        return f"{cls.__module__.removeprefix('maskfl.')}.{cls.__qualname__}"

    edges: set[tuple[str, str]] = set()
    todo: list[type] = [errors.MaskflError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("maskfl."):  # not the test suite's own
                edges.add((qualified(cls), qualified(sub)))
                todo.append(sub)
    return edges


def test_the_drawn_exception_tree_is_the_real_one() -> None:
    missing = _import_everything()
    drawn = {e for e in _drawn_tree() if e[1].rsplit(".", 1)[0] not in missing}
    real = _real_tree()
    assert real - drawn == set(), "raised but not drawn in protocol/errors.py's docstring"
    assert drawn - real == set(), "drawn in protocol/errors.py's docstring but not defined"


def test_every_maskfl_exception_is_in_the_one_tree() -> None:
    _import_everything()
    outside = []
    todo: list[type] = [BaseException]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("maskfl.") and not issubclass(sub, errors.MaskflError):
                outside.append(f"{sub.__module__}.{sub.__qualname__}")
    assert outside == []


def test_no_two_errors_share_a_name() -> None:
    """One name, one meaning: catching ``RoundFailedError`` must not depend on which
    module it was imported from (the agent's and the coordinator's once did)."""
    _import_everything()
    names = [child.rsplit(".", 1)[1] for _, child in _real_tree()]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
