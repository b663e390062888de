"""Child processes of the demo and the round benchmark: started, watched, and always stopped.

Every child runs in its own session (``start_new_session``), so it is also the leader of
its own process group: stopping it signals the whole group, which catches anything the
child started itself. Output goes to one log file per child. :meth:`Supervisor.stop_all`
sends SIGTERM to every group, waits, then SIGKILLs what is left; it runs on normal exit,
on an exception, on Ctrl-C and (through :func:`atexit`) if the interpreter exits some
other way, so no child outlives the tool.

A supervisor with a ``pid_dir`` (``maskfl-fleet up``) also writes one pid file per child
(``NN-name.pid``: pid and the kernel's start time of the process, so a recycled pid is
never taken for it) and can :meth:`~Supervisor.detach`: the children then outlive the
tool, and :func:`recorded` / :func:`stop_recorded` find and stop exactly them later,
from another process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from maskfl.protocol.errors import MaskflError
from maskfl.testing.broker import LOG_QUIET, Mosquitto, write_config

__all__ = ["Child", "ChildExitedError", "Recorded", "Supervisor", "recorded", "stop_recorded"]


class ChildExitedError(MaskflError):
    """A child the tool depends on exited; the message names it and its log."""


@dataclass
class Child:
    """One started process: its name, command, log and Popen handle."""

    name: str
    argv: tuple[str, ...]
    log_path: Path
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)
    expected_exit: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts children and guarantees they are gone when it is closed."""

    def __init__(self, log_dir: Path, *, pid_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.pid_dir = pid_dir
        self.children: list[Child] = []
        self._closed = False
        atexit.register(self.stop_all)

    def detach(self) -> None:
        """Leave the children running when this process exits (their pid files stay)."""
        self._closed = True
        atexit.unregister(self.stop_all)
        self.children = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``argv`` in a new session, output appended to ``log_dir/<name>.log``."""
        if self._closed:
            raise ChildExitedError(f"cannot start {name}: the supervisor is shutting down")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        return self._adopt(Child(name, tuple(argv), log_path, proc))

    def start_broker(
        self, conf: Path, port: int, *, name: str = "mosquitto", limit_s: float = 15.0
    ) -> Child:
        """Start mosquitto with ``conf`` (:class:`maskfl.testing.broker.Mosquitto`, output
        appended to ``log_dir/<name>.log``), return once it listens on 127.0.0.1:``port``
        and supervise it like any other child: from the moment it is started, so that a
        stop while it comes up (Ctrl-C) stops it too."""
        if self._closed:
            raise ChildExitedError(f"cannot start {name}: the supervisor is shutting down")
        broker = Mosquitto.from_config(conf, port, log_path=self.log_dir / f"{name}.log")
        child = self._adopt(Child(name, broker.command(), broker.log_path, broker.launch()))
        broker.wait_listening(limit_s)
        return child

    def start_plain_broker(self, work: Path, *, limit_s: float = 15.0) -> int:
        """An anonymous plain-TCP mosquitto on a free 127.0.0.1 port (config in ``work``),
        for the benchmarks; returns the port once it listens."""
        conf = work / "mosquitto.conf"
        port = write_config(conf, log_types=LOG_QUIET)
        self.start_broker(conf, port, limit_s=limit_s)
        return port

    def _adopt(self, child: Child) -> Child:
        self.children.append(child)
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            path = self.pid_dir / f"{len(self.children):02d}-{child.name}.pid"
            path.write_text(f"{child.pid} {_start_time(child.pid)}\n")
        return child

    def check(self) -> None:
        """Raise :class:`ChildExitedError` if a child exited that should still run."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None and not child.expected_exit:
                raise ChildExitedError(
                    f"{child.name} (pid {child.pid}) exited with status {code}; "
                    f"its log {child.log_path} ends with:\n{child.log_tail()}"
                )

    def stop(self, child: Child, timeout: float = 10.0) -> int | None:
        """SIGTERM the child's process group, wait up to ``timeout``, then SIGKILL."""
        child.expected_exit = True
        _signal_group(child, signal.SIGTERM)
        try:
            return child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.proc.wait(5)
        return None

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first (agents before the coordinator before the broker).

        All get SIGTERM at once, so the total wait is ``timeout``, not one per child.
        Groups are signalled even when the leader is gone, in case it left children.
        """
        self._closed = True
        order = list(reversed(self.children))
        if self.pid_dir is not None:
            for path in self.pid_dir.glob("*.pid"):
                path.unlink(missing_ok=True)
        for child in order:
            child.expected_exit = True
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in order:
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(remaining)
        for child in order:
            _signal_group(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        atexit.unregister(self.stop_all)


def _signal_group(child: Child, signum: int) -> None:
    # The child leads its own group (start_new_session), so its pid is the group id;
    # the group is signalled even after the leader exited, to reach what it left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc/PID/stat``
    field 22); ``-`` where there is no /proc. A pid with another start time is
    another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return stat.rpartition(")")[2].split()[19]


@dataclass(frozen=True)
class Recorded:
    """One child a detached supervisor left running, as its pid file tells."""

    name: str
    pid: int
    start_time: str
    pid_file: Path

    def alive(self) -> bool:
        """The very process that was started is still there (not a zombie, not a
        recycled pid)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        except OSError:
            return _exists(self.pid)
        fields = stat.rpartition(")")[2].split()
        return fields[0] != "Z" and (self.start_time == "-" or fields[19] == self.start_time)


def recorded(pid_dir: Path) -> list[Recorded]:
    """The children recorded in ``pid_dir``, in the order they were started."""
    out = []
    for path in sorted(pid_dir.glob("*.pid")):
        try:
            pid_text, start = path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        name = path.stem.partition("-")[2] or path.stem
        out.append(Recorded(name, pid, start, path))
    return out


def stop_recorded(pid_dir: Path, timeout: float = 15.0) -> list[Recorded]:
    """Stop every child recorded in ``pid_dir``, newest first, like :meth:`Supervisor.stop_all`
    (SIGTERM to each process group, then SIGKILL after ``timeout``), and remove the pid
    files. A pid file whose process is gone or was replaced is only removed. Returns the
    children that were running."""
    children = recorded(pid_dir)
    running = [c for c in reversed(children) if c.alive()]
    for child in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.alive() for c in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for child in running:
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
    for child in children:
        child.pid_file.unlink(missing_ok=True)
    return running


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
