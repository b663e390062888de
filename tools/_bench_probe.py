"""What the benches read of a process they started: its CPU time, its peak resident set,
the coordinator's /status; and the coordinator run under cProfile or sampled by py-spy
when asked (``MASKFL_BENCH_PROFILE``, ``MASKFL_BENCH_PYSPY``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except Exception:  # psutil missing or the process gone: the figure is informative only
        return 0.0


async def sample_rss(pid: int, peak: list[int]) -> None:
    """The process's peak resident set size into ``peak[0]``, sampled every 20 ms."""
    import psutil

    proc = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.02)


async def coordinator_status(port: int) -> dict[str, Any]:
    """The coordinator's /status document."""

    def get() -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    return await asyncio.to_thread(get)


def profile_args(work: Path) -> list[str]:
    """``MASKFL_BENCH_PROFILE=1`` runs the coordinator under cProfile (output in the workdir)."""
    if os.environ.get("MASKFL_BENCH_PROFILE"):
        return ["-m", "cProfile", "-o", str(work / "coordinator.prof")]
    return []


def pyspy(pid: int, work: Path) -> subprocess.Popen[bytes] | None:
    """``MASKFL_BENCH_PYSPY=<py-spy binary>`` samples the coordinator during ingest only
    (``--native``, raw folded stacks in ``<workdir>/coordinator.pyspy``; use with --keep;
    ``MASKFL_BENCH_PYSPY_RATE`` samples per second, default 200)."""
    binary = os.environ.get("MASKFL_BENCH_PYSPY")
    if not binary:
        return None
    out = work / "coordinator.pyspy"
    proc = subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            os.environ.get("MASKFL_BENCH_PYSPY_RATE", "200"),
            "--native",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "pyspy.log").open("wb"),
    )
    time.sleep(1.0)  # let it attach before the clock starts
    return proc


def stop_pyspy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
