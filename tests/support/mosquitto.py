"""A real mosquitto broker per test, on a free loopback port.

Tests never use the broker that may already run on 127.0.0.1:1883: each one
starts its own with a config written for it (plain, TLS, ACL, auth) and stops it
afterwards, so the suite passes on a fresh machine too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

# One way to find the binary and a free port, for tests, demo and benchmarks alike.
from maskfl.tools._demo_fleet import find_mosquitto, free_port

__all__ = ["Mosquitto", "find_mosquitto", "free_port"]


class Mosquitto:
    """One broker process with a generated config.

    ``listeners`` are extra config blocks; without any, one plain anonymous
    listener on ``self.port`` is written. ``restart()`` keeps the port and the
    persistence file, which is what broker-restart tests need.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        config: Iterable[str] | None = None,
        port: int | None = None,
        persistence: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            "max_queued_messages 0",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to user "mosquitto", which cannot read
            # files in the test's temporary directory; keep the starting user.
            lines.append("user root")
        if config is None:
            lines += [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        else:
            lines += [line.replace("{port}", str(self.port)) for line in config]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

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

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
