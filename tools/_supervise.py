"""Child processes of the demo and the round benchmark: started, watched, and always stopped.

Every child runs in its own session (``start_new_session``), so it is also the leader of
its own process group: stopping it signals the whole group, which catches anything the
child started itself. Output goes to one log file per child. :meth:`Supervisor.stop_all`
sends SIGTERM to every group, waits, then SIGKILLs what is left; it runs on normal exit,
on an exception, on Ctrl-C and (through :func:`atexit`) if the interpreter exits some
other way, so no child outlives the tool.
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

__all__ = ["Child", "ChildExitedError", "Supervisor"]


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

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._closed = False
        atexit.register(self.stop_all)

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
        child = Child(name, tuple(argv), log_path, proc)
        self.children.append(child)
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
