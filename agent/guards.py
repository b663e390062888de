"""Resource guards: whether the device may do round work now, and how much it may upload.

A device works only inside its configured time windows, below a CPU load, above a
free-memory floor and while not on battery (a sysfs-style file or a command decide).
"Work" is both duties: an updater trains, and a summer expands and adds one ChaCha20
mask of ``M + 1`` words for every accepted update (``U x (M + 1)`` words: with a
thousand updates of a million-parameter model, a billion words, seconds of full CPU
on a Raspberry Pi) and uploads ``M + 1`` words in sum2. A summer that volunteers and
then cannot finish costs the round more than one that sits out (the sum2 phase may
miss its count), so both duties consult the same :meth:`Guards.may_work` *before* the
device commits: the updater before it trains, the summer before its Sum message
leaves (and the summer also checks that its sum2 fits the upload budget). Once
committed, a device finishes its duty even if a guard changes meanwhile.
Every check that is not configured passes. A guard that cannot be evaluated (the
battery command hangs or the file is unreadable) counts as *refusing*: when in
doubt, a device sits the round out rather than draining a battery.

The readings come from small injectable functions so tests use the real code path
with controlled values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from maskfl.agent.config import GuardsSection

__all__ = ["GuardVerdict", "Guards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardVerdict:
    """``allowed`` is True when no guard refuses; ``reasons`` say which refused and why."""

    allowed: bool
    reasons: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return "allowed" if self.allowed else "; ".join(self.reasons)


def _load_per_cpu() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def _free_memory_mb() -> float:
    return float(psutil.virtual_memory().available) / (1024 * 1024)


class Guards:
    """Evaluates :class:`GuardsSection` against the current machine."""

    def __init__(
        self,
        config: GuardsSection,
        *,
        now: Callable[[], datetime] = datetime.now,
        load_per_cpu: Callable[[], float] = _load_per_cpu,
        free_memory_mb: Callable[[], float] = _free_memory_mb,
    ) -> None:
        self.config = config
        self._now = now
        self._load = load_per_cpu
        self._free = free_memory_mb

    async def may_work(self) -> GuardVerdict:
        """Whether every configured guard allows round work (training or summing) now."""
        reasons: list[str] = []
        cfg = self.config
        if cfg.time_windows:
            clock = self._now().time()
            if not any(w.contains(clock) for w in cfg.time_windows):
                windows = ", ".join(str(w) for w in cfg.time_windows)
                reasons.append(f"outside the time windows ({clock:%H:%M} not in {windows})")
        if cfg.max_load_per_cpu is not None:
            load = self._load()
            if load > cfg.max_load_per_cpu:
                reasons.append(f"load {load:.2f} per CPU above {cfg.max_load_per_cpu}")
        if cfg.min_free_memory_mb is not None:
            free = self._free()
            if free < cfg.min_free_memory_mb:
                reasons.append(f"free memory {free:.0f} MB below {cfg.min_free_memory_mb} MB")
        battery = await self.on_battery()
        if battery is not None:
            reasons.append(battery)
        return GuardVerdict(allowed=not reasons, reasons=tuple(reasons))

    async def on_battery(self) -> str | None:
        """A reason string when the device is (or may be) on battery, else None."""
        cfg = self.config
        if cfg.on_battery_file is not None:
            try:
                value = await asyncio.to_thread(_read_small, cfg.on_battery_file)
            except OSError as exc:
                return f"cannot read {cfg.on_battery_file} ({exc.strerror}); assuming battery"
            if value == cfg.on_battery_value.strip():
                return f"on battery ({cfg.on_battery_file} = {value!r})"
        if cfg.on_battery_command:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cfg.on_battery_command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                return f"cannot run {cfg.on_battery_command[0]} ({exc.strerror}); assuming battery"
            try:
                # Not asyncio.wait_for: on Python 3.11 it drops a cancel (the agent
                # stopping) that comes in the same loop iteration as the exit.
                async with asyncio.timeout(cfg.command_timeout_s):
                    code = await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return f"{cfg.on_battery_command[0]} timed out; assuming battery"
            if code == 0:
                return f"on battery ({cfg.on_battery_command[0]} exited 0)"
        return None

    def upload_allowed(self, size: int, already_sent: int = 0) -> GuardVerdict:
        """Whether ``size`` more bytes fit into this round's upload budget."""
        limit = self.config.max_upload_bytes
        if limit is not None and already_sent + size > limit:
            return GuardVerdict(
                False, (f"upload of {already_sent + size} bytes exceeds max_upload_bytes {limit}",)
            )
        return GuardVerdict(True)


def _read_small(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(4096).decode("utf-8", errors="replace").strip()
