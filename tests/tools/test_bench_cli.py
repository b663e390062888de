"""``maskfl-bench`` with only some extras installed: ``make gpu-check`` installs maskfl
with its own dependencies and CuPy, not paho-mqtt or pydantic, and runs
``maskfl-bench aggregate``. A subcommand whose module cannot import is listed and refused
in one line; the others run."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

from maskfl.tools import bench


def _without(monkeypatch: pytest.MonkeyPatch, module: str, missing: str) -> None:
    """Importing ``maskfl.tools.<module>`` fails as if ``missing`` were not installed."""
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> ModuleType:
        if name == f"maskfl.tools.{module}":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, package)

    monkeypatch.setattr(bench.importlib, "import_module", fake)


def test_a_subcommand_missing_its_dependency_is_refused_and_the_others_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _without(monkeypatch, "bench_transport", "paho")
    assert bench.main(["transport", "--json", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "maskfl-bench transport: needs the Python module paho, which is not installed; "
        "install maskfl[coordinator,agent] (or maskfl[dev])"
    ]
    out = tmp_path / "a.json"
    argv = ["aggregate", "--backend", "numpy", "--n", "2", "--m", "1000", "--repeat", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["backend"], r["n"], r["m"]) for r in rows] == [("numpy", 2, 1000)]
    with pytest.raises(SystemExit) as exited:
        bench.main([*argv, "--bogus"])
    assert exited.value.code == 2


def test_a_missing_maskfl_module_is_a_bug_not_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "bench_transport", "maskfl.transport._gone")
    with pytest.raises(ModuleNotFoundError):
        bench.main(["aggregate", "--n", "2", "--m", "1000"])
