"""Applying a change of the broker's ACL or CRL: mosquitto rereads both on SIGHUP.

``fleet.toml`` says how (``[broker] reload_command``, run without a shell, or
``[broker] pid_file``, whose process gets SIGHUP); every command that changes the ACL
or the CRL (add-device, add-observer, revoke, rotate) calls :func:`reload_broker`
after the change is saved, and prints the one line it returns. Without either setting
the line says that a reload is needed and how to configure one.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from maskfl.broker_coordinator.provision._settings import BrokerSettings
from maskfl.broker_coordinator.provision.errors import ProvisionError

__all__ = ["RELOAD_TIMEOUT_S", "reload_broker"]

RELOAD_TIMEOUT_S = 30.0

HOW = (
    "reload the broker now (`systemctl reload mosquitto`, or SIGHUP to mosquitto) so the "
    "change takes effect; `maskfl-provision broker-config --reload-command CMD` "
    "(or --broker-pid-file FILE) makes provisioning do it"
)


def reload_broker(settings: BrokerSettings) -> str:
    """Reload the broker as ``settings`` say; the one line to print.

    Raises :class:`ProvisionError` when the configured reload fails: the change itself
    is saved either way, and the message says so.
    """
    if settings.reload_command:
        return _run(settings.reload_command)
    if settings.pid_file:
        return _sighup(Path(settings.pid_file))
    return HOW


def _run(command: str) -> str:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ProvisionError(
            f"[broker] reload_command {command!r} cannot be split into words ({exc}); "
            "the change is saved, reload the broker by hand"
        ) from exc
    if not argv:
        return HOW
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RELOAD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
        raise ProvisionError(
            f"broker NOT reloaded: `{command}` {why}; the change is saved, reload the broker "
            "by hand"
        ) from exc
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise ProvisionError(
            f"broker NOT reloaded: `{command}` exited with status {done.returncode}"
            f"{': ' + last[0] if last[0] else ''}; the change is saved, reload the broker by hand"
        )
    return f"broker reloaded (`{command}`)"


def _sighup(path: Path) -> str:
    try:
        words = path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return f"broker not running (no pid file {path}): it applies the change when it starts"
    except OSError as exc:
        raise ProvisionError(
            f"[broker] pid_file {path}: {exc.strerror or exc}; the change is saved, reload the "
            "broker by hand"
        ) from exc
    pid = int(words[0]) if words and words[0].isdigit() else 0
    if pid <= 1:
        raise ProvisionError(
            f"[broker] pid_file {path} holds no pid; the change is saved, reload the broker by hand"
        )
    gone = (
        f"broker not running (pid {pid} from {path} is gone): it applies the change when it starts"
    )
    # SIGHUP ends most processes: never send it to a pid that has been reused.
    comm = _proc(pid, "comm")
    if comm is not None and comm.strip() != "mosquitto":
        return gone
    started = words[1] if len(words) > 1 else "-"
    stat = _proc(pid, "stat")
    if started != "-" and stat is not None and stat.rpartition(")")[2].split()[19] != started:
        return gone
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return gone
    except PermissionError as exc:
        raise ProvisionError(
            f"broker NOT reloaded: no permission to signal pid {pid} (from {path}); the change "
            "is saved, reload the broker by hand"
        ) from exc
    return f"broker reloaded (SIGHUP to pid {pid} from {path})"


def _proc(pid: int, name: str) -> str | None:
    """``/proc/PID/NAME`` (Linux), None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None
