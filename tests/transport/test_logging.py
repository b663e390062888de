"""One logging convention for both services: ``--log-format text|json|auto``.

``auto`` (the default) is text on a terminal or under journald, JSON lines otherwise;
the coordinator process is run for real with each format and its stderr read back.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from maskfl.testing.fleet import coordinator_command
from maskfl.transport import resolve_log_format, setup_logging
from tests.broker_coordinator.test_cli import _bundle


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_under_journald_else_json() -> None:
    assert resolve_log_format("auto", _Terminal(), {}) == "text"
    assert resolve_log_format("auto", io.StringIO(), {"JOURNAL_STREAM": "8:123"}) == "text"
    assert resolve_log_format("auto", io.StringIO(), {}) == "json"
    assert resolve_log_format("json", _Terminal(), {}) == "json"
    assert resolve_log_format("text", io.StringIO(), {}) == "text"


def test_json_lines_carry_the_extra_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", "json")
    try:
        logging.getLogger("maskfl.test").warning(
            "round %d failed", 3, extra={"round_id": 3, "phase": "sum"}
        )
    finally:
        logging.getLogger().handlers.clear()
    line = json.loads(stream.getvalue())
    assert line["msg"] == "round 3 failed" and line["level"] == "warning"
    assert line["round_id"] == 3 and line["phase"] == "sum"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


def _coordinator_stderr(config: Path, *args: str) -> str:
    env = {**os.environ, "MASKFL__LOG__FORMAT": "auto"}  # the default (the bundle says json)
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        coordinator_command(config, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    try:
        seen = ""
        while "unreachable" not in seen:  # retrying the closed broker port: logging works
            line = proc.stderr.readline()
            assert line, f"the coordinator exited: {seen}"
            seen += line
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return seen + rest


@pytest.mark.slow
def test_the_coordinator_logs_json_when_piped_and_text_when_asked(tmp_path: Path) -> None:
    config = _bundle(tmp_path)
    piped = _coordinator_stderr(config)  # auto, and stderr is a pipe
    lines = [json.loads(line) for line in piped.splitlines() if line.strip()]
    assert any("unreachable" in entry["msg"] for entry in lines)
    text = _coordinator_stderr(config, "--log-format", "text")
    first = text.splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INFO|WARNING) maskfl\.", first), first
    assert not text.lstrip().startswith("{")
