"""A real mosquitto on a free loopback port: the one way tests, demo and benchmarks start one.

Nothing here uses the broker that may already run on 127.0.0.1:1883: every broker gets
its own config (plain, TLS, ACL, auth, bridge; :func:`write_config` writes the common
part) and port (:func:`free_port`), or the config a provisioned fleet wrote
(:meth:`Mosquitto.from_config`). :class:`Mosquitto` starts the process in its own
session with its output appended to a log file, returns once it listens, and stops,
kills and restarts it; a tool that supervises its children hands the started process to
its supervisor (``maskfl.tools._supervise.Supervisor.start_broker``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from maskfl.protocol.errors import ConfigError

__all__ = ["LOG_ALL", "LOG_QUIET", "Mosquitto", "find_mosquitto", "free_port", "write_config"]

LOG_ALL = ("error", "warning", "notice", "information")
"""The log types a test broker writes."""
LOG_QUIET = ("error", "warning")
"""The log types a benchmark's broker writes."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """The mosquitto binary (on PATH or in the usual sbin folders)."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/opt/homebrew/sbin"
    )
    if found is None:
        raise ConfigError(
            "mosquitto is not installed: `make demo` installs it, or apt-get install mosquitto",
            field="mosquitto",
        )
    return found


def write_config(
    conf: Path,
    port: int | None = None,
    *,
    listeners: Iterable[str] | None = None,
    persistence: Path | None = None,
    log_types: Sequence[str] = LOG_ALL,
) -> int:
    """Write a mosquitto config to ``conf`` and return its port (a free one unless given):
    no queue limit, the given log types, persistence in the folder ``persistence`` (off
    without one), and ``listeners`` (config lines; ``{port}`` in them becomes the port) or
    else one anonymous plain listener on 127.0.0.1."""
    port = port or free_port()
    lines = [
        "per_listener_settings false",
        "max_queued_messages 0",
        *(f"log_type {kind}" for kind in log_types),
        f"persistence {'true' if persistence is not None else 'false'}",
    ]
    if persistence is not None:
        lines.append(f"persistence_location {persistence}/")
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to user "mosquitto", which cannot read
        # files in a temporary directory; keep the starting user.
        lines.append("user root")
    if listeners is None:
        lines += [f"listener {port} 127.0.0.1", "allow_anonymous true"]
    else:
        lines += [line.replace("{port}", str(port)) for line in listeners]
    conf.write_text("\n".join(lines) + "\n")
    return port


class Mosquitto:
    """One broker process on 127.0.0.1.

    ``Mosquitto(workdir)`` writes ``workdir/mosquitto.conf`` with :func:`write_config`
    (``config``: its listener lines; ``persistence``: keep the retained messages and
    sessions in ``workdir`` across :meth:`restart`) and logs to ``workdir/mosquitto.log``;
    :meth:`from_config` runs a config written elsewhere. :meth:`restart` keeps the port
    and the persistence file, which is what broker-restart tests need.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        config: Iterable[str] | None = None,
        port: int | None = None,
        persistence: bool = False,
        log_types: Sequence[str] = LOG_ALL,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.port = write_config(
            self.conf_path,
            port,
            listeners=config,
            persistence=self.workdir if persistence else None,
            log_types=log_types,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_config(cls, conf: Path, port: int, *, log_path: Path) -> Mosquitto:
        """A broker for a config written elsewhere (a provisioned fleet's) that listens on
        127.0.0.1:``port``; its output is appended to ``log_path``."""
        broker = cls.__new__(cls)
        broker.workdir = conf.parent
        broker.port = port
        broker.host = "127.0.0.1"
        broker.conf_path = conf
        broker.log_path = log_path
        broker.proc = None
        return broker

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> tuple[str, ...]:
        """The command line that starts this broker."""
        return (find_mosquitto(), "-c", str(self.conf_path))

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """:meth:`launch` it and :meth:`wait_listening`."""
        self.launch()
        self.wait_listening(timeout)
        return self

    def launch(self) -> subprocess.Popen[bytes]:
        """Start mosquitto in its own session, output appended to the log; returns at once
        (a supervisor owns the process from here, before the wait)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.proc

    def wait_listening(self, timeout: float) -> None:
        """Return once the launched broker listens; one that exits or does not listen
        within ``timeout`` is stopped and named in a :class:`ConfigError` with the end of
        its log."""
        if self.proc is None:
            raise ConfigError(f"mosquitto -c {self.conf_path} was not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise ConfigError(
                    f"mosquitto -c {self.conf_path} exited with status {code} at start; "
                    f"{self.log_path} ends with:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            time.sleep(0.02)
        self.kill()
        raise ConfigError(
            f"mosquitto -c {self.conf_path} did not listen on {self.host}:{self.port} within "
            f"{timeout:.0f} s; {self.log_path} ends with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing sessions cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
