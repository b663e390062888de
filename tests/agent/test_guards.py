"""Resource guards against real files and real commands, with injected readings."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path

import pytest

from maskfl.agent.config import GuardsSection, TimeWindow
from maskfl.agent.guards import Guards


def guards(cfg: GuardsSection, *, hour: int = 12, load: float = 0.1, free: float = 4096) -> Guards:
    return Guards(
        cfg,
        now=lambda: datetime(2026, 1, 1, hour, 30),
        load_per_cpu=lambda: load,
        free_memory_mb=lambda: free,
    )


async def test_unconfigured_guards_allow() -> None:
    assert (await guards(GuardsSection()).may_work()).allowed


async def test_time_window_wraps_midnight() -> None:
    cfg = GuardsSection(time_windows=(TimeWindow.parse("22:00-06:00"),))
    assert (await guards(cfg, hour=23).may_work()).allowed
    assert (await guards(cfg, hour=3).may_work()).allowed
    verdict = await guards(cfg, hour=12).may_work()
    assert not verdict.allowed
    assert "outside the time windows" in str(verdict)


async def test_load_and_memory() -> None:
    cfg = GuardsSection(max_load_per_cpu=0.8, min_free_memory_mb=256)
    assert (await guards(cfg, load=0.5, free=300).may_work()).allowed
    verdict = await guards(cfg, load=0.9, free=100).may_work()
    assert not verdict.allowed
    assert len(verdict.reasons) == 2


async def test_real_machine_readings_work() -> None:
    cfg = GuardsSection(max_load_per_cpu=1e6, min_free_memory_mb=0)
    assert (await Guards(cfg).may_work()).allowed


async def test_battery_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    cfg = GuardsSection(on_battery_file=status, on_battery_value="Discharging")
    status.write_text("Charging\n")
    assert (await guards(cfg).may_work()).allowed
    status.write_text("Discharging\n")
    assert "on battery" in str(await guards(cfg).may_work())
    status.unlink()
    verdict = await guards(cfg).may_work()
    assert not verdict.allowed and "assuming battery" in str(verdict)


async def test_battery_command(tmp_path: Path) -> None:
    on = GuardsSection(on_battery_command=(sys.executable, "-c", "raise SystemExit(0)"))
    off = GuardsSection(on_battery_command=(sys.executable, "-c", "raise SystemExit(1)"))
    hang = GuardsSection(
        on_battery_command=(sys.executable, "-c", "import time; time.sleep(30)"),
        command_timeout_s=0.2,
    )
    missing = GuardsSection(on_battery_command=(str(tmp_path / "nope"),))
    assert not (await guards(on).may_work()).allowed
    assert (await guards(off).may_work()).allowed
    assert "timed out" in str(await guards(hang).may_work())
    assert "cannot run" in str(await guards(missing).may_work())


def test_command_string_is_split() -> None:
    cfg = GuardsSection.model_validate({"on_battery_command": "/usr/bin/check --quiet 'a b'"})
    assert cfg.on_battery_command == ("/usr/bin/check", "--quiet", "a b")


def test_upload_budget() -> None:
    g = guards(GuardsSection(max_upload_bytes=1000))
    assert g.upload_allowed(600).allowed
    assert not g.upload_allowed(600, already_sent=500).allowed
    assert guards(GuardsSection()).upload_allowed(10**12).allowed


async def test_a_cancel_is_not_lost_to_the_battery_command_exiting_at_that_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopping the agent cancels its round; if the on-battery command exits in the same
    loop iteration, the cancel must still win (asyncio.wait_for on Python 3.11 returned
    the exit status and dropped it, and the agent ran on). No real process can exit at
    a chosen iteration, so the command is one whose exit the test decides."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.Event()

    class Command:
        async def wait(self) -> int:
            waiting.set()
            return await exited

    async def start(*_argv: object, **_options: object) -> Command:
        return Command()

    monkeypatch.setattr("asyncio.create_subprocess_exec", start)
    cfg = GuardsSection(on_battery_command=("on-battery",), command_timeout_s=30)
    checking = asyncio.create_task(guards(cfg).on_battery())
    await waiting.wait()
    exited.set_result(0)
    checking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checking
