"""The demo's process supervisor: children in their own groups, all stopped on exit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from maskfl.protocol.errors import ConfigError
from maskfl.testing.broker import free_port, write_config
from maskfl.tools._supervise import ChildExitedError, Supervisor

# A child that starts a grandchild and ignores SIGTERM: only SIGKILL of the group ends both.
STUBBORN = (
    "import signal, subprocess, sys, time;"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    "print('up', flush=True); time.sleep(600)"
)


def _group_members(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return found


def _wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + 20
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.02)  # inherent: a log file a child process writes


def test_stop_all_kills_groups_including_grandchildren(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    child = sup.start("stubborn", [sys.executable, "-c", STUBBORN])
    _wait_for_text(child.log_path, "up")
    assert os.getpgid(child.pid) == child.pid  # its own session and group
    assert len(_group_members(child.pid)) == 2
    sup.stop_all(timeout=0.5)
    assert child.proc.returncode is not None
    deadline = time.monotonic() + 5
    while _group_members(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # inherent: grandchildren the kernel reaps, no event to await
    assert _group_members(child.pid) == []


def test_check_names_the_child_that_died(tmp_path: Path) -> None:
    with Supervisor(tmp_path / "logs") as sup:
        child = sup.start("quitter", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"])
        child.proc.wait(20)
        with pytest.raises(ChildExitedError, match=r"quitter .* status 3") as info:
            sup.check()
        assert "bye" in str(info.value)
        sup.stop(child)
        sup.check()  # an expected exit is not an error


@pytest.mark.broker
def test_a_broker_is_supervised_from_its_start_and_stopped_when_it_never_listens(
    tmp_path: Path,
) -> None:
    """start_broker owns mosquitto before it waits for the port (a Ctrl-C meanwhile stops
    it); a broker that never listens there is stopped and named with its log."""
    conf = tmp_path / "mosquitto.conf"
    write_config(conf)  # listens on some free port, not on the one waited for
    with Supervisor(tmp_path / "logs") as sup:
        with pytest.raises(ConfigError, match=r"did not listen on 127\.0\.0\.1:\d+ within 1 s"):
            sup.start_broker(conf, free_port(), limit_s=1.0)
        assert [c.name for c in sup.children] == ["mosquitto"]
        assert not sup.children[0].alive()
    with Supervisor(tmp_path / "logs2") as sup:
        port = write_config(conf)
        broker = sup.start_broker(conf, port)
        assert broker.alive() and broker.log_path == tmp_path / "logs2" / "mosquitto.log"
    assert not broker.alive()
