"""``maskfl-coordinator`` as a user meets it: one-line errors with exit 2, a clean stop."""

from __future__ import annotations

import datetime as dt
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.cli import check_revocations, main
from maskfl.broker_coordinator.config import load_config
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet

M = 16


def _bundle(tmp: Path) -> Path:
    config: Path = SimFleet().write_coordinator(
        tmp / "coordinator",
        port=free_port(),
        length=M,
        initial=np.zeros(M, dtype=np.float32),
        overrides={
            "broker": {"reconnect_min_s": 0.1, "reconnect_max_s": 0.2},
            "masking": {"n_max": 1000},
        },
    )
    return config


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "maskfl.broker_coordinator.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_run_refuses_a_private_key_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    config = _bundle(tmp_path)
    key = config.parent / "coordinator.key"
    key.chmod(mode)
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("maskfl-coordinator: identity.key_file: ")
    assert f"has mode {mode:04o}" in err
    assert f"chmod 600 {key}" in err


def _retrying(proc: subprocess.Popen[str]) -> str:
    """Read the coordinator's log until it says the broker is unreachable (its state
    directory, lock and database are set up by then; it retries with back-off)."""
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:  # blocks on the process's own output: no polling
        seen += line
        if "unreachable" in line:
            return seen
    raise AssertionError(f"the coordinator ended without trying the broker:\n{seen}")


def test_stop_while_the_broker_is_unreachable_is_clean(tmp_path: Path) -> None:
    config = _bundle(tmp_path)
    proc = _cli("run", "--config", str(config))
    try:
        # Once it is retrying the (closed) broker port, stop it as systemd does.
        head = _retrying(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        err = head + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "unreachable" in err
    assert "Traceback" not in err
    assert proc.returncode == 0


def test_models_list_and_export_of_a_missing_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _bundle(tmp_path)
    db = config.parent / "state" / "coordinator.db"
    proc = _cli("run", "--config", str(config))
    listed = ""
    try:
        # The initial weights become version 0 before the broker is reached.
        _retrying(proc)
        assert db.exists() and main(["models", "list", "--config", str(config)]) == 0
        listed = capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    (line,) = listed.splitlines()
    # Version, when it was published (UTC, to the second), round (none made version 0).
    assert re.fullmatch(r"sim v0 \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ round - [0-9a-f]{16}.*", line)
    published = dt.datetime.strptime(line.split()[2] + line.split()[3], "%Y-%m-%d%H:%M:%SZ")
    assert abs(published.replace(tzinfo=dt.UTC).timestamp() - time.time()) < 300
    assert line == line.rstrip()
    out = tmp_path / "m.npy"
    code = main(["models", "export", "--config", str(config), "--version", "7", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--version: no version 7 of model sim; versions 0..0 exist" in err
    assert not out.exists()
    assert main(["models", "export", "--config", str(config), "--out", str(out)]) == 0
    assert np.load(out).shape == (M,)
    bare = tmp_path / "weights"  # written under exactly this name, no .npy added
    assert main(["models", "export", "--config", str(config), "--out", str(bare)]) == 0
    assert f"to {bare}" in capsys.readouterr().out
    assert np.load(bare).shape == (M,)
    nowhere = tmp_path / "missing" / "m.npy"
    assert main(["models", "export", "--config", str(config), "--out", str(nowhere)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--out: cannot write {nowhere}: " in err


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "MASKFL__PET__SUM__COUNTMIN",
            "2",
            "pet.sum.countmin: unknown key (set by environment variable "
            "MASKFL__PET__SUM__COUNTMIN); did you mean count_min (MASKFL__PET__SUM__COUNT_MIN)?",
        ),
        (
            "MASKFL__PET__SUM__COUNT_MIN",
            "x",
            "pet.sum.count_min: Input should be a valid integer, unable to parse string as an "
            "integer (got 'x', set by environment variable MASKFL__PET__SUM__COUNT_MIN)",
        ),
    ],
)
def test_a_bad_environment_override_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *,
    name: str,
    value: str,
    expected: str,
) -> None:
    config = _bundle(tmp_path)
    monkeypatch.setenv(name, value)
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.rstrip().endswith(expected)


def test_a_bad_file_value_is_not_blamed_on_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _bundle(tmp_path)
    config.write_text(config.read_text().replace("length = 16", 'length = "lots"'))
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.length: " in err
    assert "(got 'lots')" in err
    assert "environment" not in err


def test_a_second_coordinator_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    config = _bundle(tmp_path)
    first = _cli("run", "--config", str(config))
    try:
        _retrying(first)  # it holds the lock by then
        second = _cli("run", "--config", str(config))
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert err.count("\n") == 1
        assert f"storage.dir: another coordinator (pid {first.pid}) is running on " in err
    finally:
        first.kill()  # like kill -9: the kernel drops the lock with the process
        first.communicate(timeout=30)
    third = _cli("run", "--config", str(config))
    head = _retrying(third)  # past the lock
    third.send_signal(signal.SIGTERM)
    _, err = third.communicate(timeout=30)
    err = head + err
    assert third.returncode == 0
    assert "another coordinator" not in err


def test_run_refuses_a_revocation_list_that_does_not_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = SimFleet()
    config = fleet.write_coordinator(
        tmp_path / "coordinator",
        port=free_port(),
        length=M,
        overrides={
            "fleet": {"revocations_file": "revocations.bin"},
            "masking": {"n_max": 1000},
        },
    )
    revocations = config.parent / "revocations.bin"
    fleet.revocations(revocations, [7], version=3)
    check_revocations(load_config(config))  # a good list passes

    other = SimFleet()  # another CA: the signature does not verify
    other.fleet = fleet.fleet
    other.revocations(revocations, [7], version=4)
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"maskfl-coordinator: fleet.revocations_file: {revocations} is not ")

    revocations.write_bytes(b"garbage")
    assert main(["run", "--config", str(config)]) == 2
    assert "fleet.revocations_file: " in capsys.readouterr().err


def test_run_refuses_an_http_port_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = SimFleet().write_coordinator(
            tmp_path / "coordinator",
            port=free_port(),
            length=M,
            overrides={
                "http": {"enabled": True, "host": "127.0.0.1", "port": port},
                "masking": {"n_max": 1000},
            },
        )
        assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"http.port: cannot listen on 127.0.0.1:{port}: " in err
    assert "choose another port" in err
