"""A passphrase for the CA keys: set at init, needed by every command that signs.

From ``--passphrase-file``, ``MASKFL_CA_PASSPHRASE`` or, on a terminal, typed in;
commands that do not sign (list, broker-config) need none. A missing or wrong one is
one line and exit 2, and changes nothing.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskfl.broker_coordinator.provision import Fleet, Status
from maskfl.broker_coordinator.provision.cli import PASSPHRASE_ENV, main


def run(root: Path, *args: str) -> int:
    return main(["--dir", str(root), *args])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskfl-provision: error: "), err
    return err


@pytest.fixture
def protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    secret = tmp_path / "ca-pass"
    secret.write_text("correct horse\n")
    root = tmp_path / "fleet"
    assert run(root, "init", "--fleet", "demo", "--passphrase-file", str(secret)) == 0
    return root


def test_ca_keys_are_encrypted_and_every_signing_command_needs_the_passphrase(
    protected: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("fleet-ca.key", "tls-ca.key"):
        assert (
            (protected / "ca" / key)
            .read_bytes()
            .startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        ), key
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: nobody to ask
    capsys.readouterr()
    for command in (
        ["add-device", "pi-001"],
        ["add-observer", "dash"],
        ["server-cert"],
        ["rotate", "coordinator"],
    ):
        assert run(protected, *command) == 2, command
        assert "passphrase-protected" in one_line_error(capsys)
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    assert run(protected, "add-device", "pi-001", "--passphrase-file", str(wrong)) == 2
    assert "wrong passphrase" in one_line_error(capsys)
    assert Fleet.open(protected).registry.devices == {}
    # Commands that sign nothing need no passphrase.
    assert run(protected, "list") == 0
    assert run(protected, "broker-config", "--port", "8884") == 0

    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert run(protected, "add-device", "pi", "--count", "2") == 0
    assert run(protected, "revoke", "pi-002") == 0
    assert run(protected, "rotate", "pi-001") == 0
    assert run(protected, "add-observer", "dash") == 0
    devices = Fleet.open(protected).registry.devices
    assert devices["pi-001"].status is Status.ACTIVE
    assert devices["pi-002"].status is Status.REVOKED


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_is_asked(
    protected: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def getpass(prompt: str) -> str:
        asked.append(prompt)
        return "correct horse"

    monkeypatch.setattr("sys.stdin", Terminal(""))
    monkeypatch.setattr("getpass.getpass", getpass)
    assert run(protected, "add-device", "pi-001") == 0
    assert asked == ["CA key passphrase: "]


def test_init_asks_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.setattr("sys.stdin", Terminal(""))
    answers = iter(["s3cret", "s3cret-typo"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(answers))
    root = tmp_path / "fleet"
    assert run(root, "init", "--fleet", "demo", "--ask-passphrase") == 2
    assert "differ" in one_line_error(capsys)
    assert not (root / "ca").exists()
    answers = iter(["s3cret", "s3cret"])
    assert run(root, "init", "--fleet", "demo", "--ask-passphrase") == 0
    assert "CA keys passphrase-protected" in capsys.readouterr().out
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    assert run(root, "add-device", "pi-001") == 0


def test_ask_passphrase_without_a_terminal_is_one_line(tmp_path: Path) -> None:
    """init --ask-passphrase under cron or a pipe: no controlling terminal (its own
    session) and stdin at its end; getpass then meets EOF. One line naming the flag and
    the ways around it, exit 2, no fleet."""
    root = tmp_path / "fleet"
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    cli = [sys.executable, "-m", "maskfl.broker_coordinator.provision.cli", "--dir", str(root)]
    done = subprocess.run(
        [*cli, "init", "--fleet", "demo", "--ask-passphrase"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        start_new_session=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # no traceback, no getpass warning
    last = done.stderr.strip()
    assert last.startswith("maskfl-provision: error: --ask-passphrase needs a terminal"), last
    assert "--passphrase-file" in last and PASSPHRASE_ENV in last
    assert not (root / "ca").exists()
