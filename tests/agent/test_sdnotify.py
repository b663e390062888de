"""sd_notify against a real unix datagram socket (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from maskfl.agent.sdnotify import Notifier


def test_without_socket_everything_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert n.watchdog_interval_s is None


def test_path_socket_receives_messages(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_interval_s == 2.0
        assert n.ready("serving")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"
        assert n.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert n.stopping()
        assert server.recv(4096) == b"STOPPING=1"
        n.close()


def test_abstract_socket() -> None:
    name = f"maskfl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.status("hello")
        assert server.recv(4096) == b"STATUS=hello"
        n.close()


def test_watchdog_pid_for_another_process_disables_watchdog() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval_s is None


def test_send_failure_is_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.ready()
    assert not n.watchdog()
    n.close()
