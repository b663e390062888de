"""``maskfl-bench coordinator``: coordinator ingest throughput against a bare subscriber.

For every (N, M): a temporary mosquitto, a coordinator process (``maskfl-coordinator
run``, numpy backend unless ``--backend``), two simulated summers in this process,
and N updates of M parameters built *before* the clock starts (masking is the
agents' cost, not the coordinator's). Then:

- **coordinator**: a publisher process sends the N updates (chunked at 256 KiB)
  back to back; every update is decoded, signature-checked, certificate-checked,
  added to the aggregate, checkpointed (temp + fsync + rename) and committed to
  SQLite before its frames are acked and its receipt sent;
- **baseline**: a fresh publisher process sends the same frames, over the same
  broker, to a bare subscriber process using :mod:`maskfl.transport` (QoS 1,
  acks every frame at once, does nothing else);
- **round**: wall time from the round parameters to the published global model
  (sum, update, sum2 with the summers expanding N masks of M words, unmask).

Memory: ``coordinator_peak_rss_mb`` (sampled every 20 ms) and ``coordinator_vmhwm_mb``
(the kernel's high-water mark, read once the model is out) against the formula
operators are given (docs/operations.md): peak RSS <= base + ``pet.message_memory_max_bytes``
+ 4 x the model (float32). ``rss_base_mb`` is measured the same way in one extra round
at M = 1e4 (same N) whenever an M above 1e5 is asked for; ``rss_model_multiple`` is
(VmHWM - base - that bound) / model, the k the formula allows 4 of, and
``message_memory_peak_mb`` what the ingest held of the bound at most (``/status``).
``rss_over_model`` (kept for comparison with older runs) is the whole peak over the
model, base and bound included: not the formula's multiple.

``ratio`` compares the consumers alone: the bare subscriber's time from its first
to its last frame, over the coordinator's time from its first update frame to
its last update committed (from its ``/status``), so the publisher's own speed
in either phase does not enter (the target is >= 0.6). ``ratio_end_to_end``
compares first publish to last receipt against first publish to last frame.
Every (N, M) is run ``--repeat`` times; the run with the median ratio is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskfl.broker_coordinator.config import load_config
from maskfl.protocol.sortition import MAX_GROUPS
from maskfl.testing.fleet import SimFleet
from maskfl.tools._bench_ingest_round import (
    CHUNK,
    Built,
    Watch,
    build_updates,
    configure,
    until_accepted,
    watched_round,
)
from maskfl.tools._bench_probe import (
    coordinator_status,
    cpu_seconds,
    profile_args,
    pyspy,
    sample_rss,
    stop_pyspy,
)
from maskfl.tools._bench_publish import baseline, publish_in_child
from maskfl.tools._supervise import Supervisor


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "coordinator", help="coordinator ingest throughput vs a bare subscriber"
    )
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100], help="updates per round")
    parser.add_argument(
        "--m", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="model parameters"
    )
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "auto"])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per (N, M); the median ratio is reported"
    )
    parser.add_argument(
        "--group-commit-ms",
        type=float,
        default=None,
        help="override storage.group_commit_ms (default: the coordinator's default)",
    )
    parser.add_argument(
        "--groups",
        type=int,
        default=1,
        help="g, the round's mask groups ([masking] groups): each update seals one seed per "
        "group, with max(2, g) summers, one or more per group (default 1)",
    )
    parser.add_argument(
        "--update-words",
        choices=("memory", "file"),
        default=None,
        help="override storage.update_words (file: no accepted update's words held in RAM)",
    )
    parser.add_argument(
        "--message-memory-mb",
        type=int,
        default=None,
        help="override pet.message_memory_max_bytes, in MiB (received messages held in RAM: "
        "the transport queue, partial uploads, messages until committed, words kept)",
    )
    parser.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    parser.add_argument("--keep", type=Path, help="keep logs and state in this directory")


def run(args: argparse.Namespace) -> dict[str, Any]:
    n_values = getattr(args, "n", None) or [10, 100]
    m_values = [int(m) for m in (getattr(args, "m", None) or [1e4, 1e5, 1e6])]
    backend = getattr(args, "backend", "numpy")
    repeat = max(1, getattr(args, "repeat", 3))
    groups = getattr(args, "groups", 1)
    if not 1 <= groups <= MAX_GROUPS:
        raise SystemExit(f"maskfl-bench coordinator: --groups {groups}: pick 1 to {MAX_GROUPS}")
    storage: dict[str, Any] = {}
    if getattr(args, "group_commit_ms", None) is not None:
        storage["group_commit_ms"] = float(args.group_commit_ms)
    if getattr(args, "update_words", None) is not None:
        storage["update_words"] = args.update_words
    pet: dict[str, Any] = {}
    if getattr(args, "message_memory_mb", None) is not None:
        pet["message_memory_max_bytes"] = args.message_memory_mb << 20
    results = []
    for n in n_values:
        base = _rss_base(n, backend, storage, pet, groups) if max(m_values) > 100_000 else None
        for m in m_values:
            runs = []
            for r in range(repeat):
                print(
                    f"maskfl-bench coordinator: N={n} M={m} run {r + 1}/{repeat}", file=sys.stderr
                )
                with _workdir(getattr(args, "keep", None), f"n{n}-m{m}") as work:
                    runs.append(
                        asyncio.run(_one(n, m, backend, work, storage, pet=pet, groups=groups))
                    )
            runs.sort(key=lambda x: x["ratio"])
            median = runs[len(runs) // 2]
            results.append(
                {**median, **_against_formula(median, base), "ratios": [x["ratio"] for x in runs]}
            )
    return {
        "chunk_size": CHUNK,
        "word_bits": 32,
        "backend": backend,
        "groups": groups,
        "storage": storage,
        "pet": pet,
        "repeat": repeat,
        "note": "each entry is the run with the median ratio; 'ratios' lists every run",
        "runs": results,
    }


_BASE_M = 10_000


def _rss_base(
    n: int, backend: str, storage: dict[str, Any], pet: dict[str, Any], groups: int
) -> float:
    """The coordinator's peak RSS (VmHWM, MB) in one round at M = 1e4: the base of the
    memory formula, measured as the big rounds are."""
    print(f"maskfl-bench coordinator: N={n} M={_BASE_M} (the RSS base)", file=sys.stderr)
    with _workdir(None, "base") as work:
        out = asyncio.run(_one(n, _BASE_M, backend, work, storage, pet=pet, groups=groups))
    return float(out["coordinator_vmhwm_mb"])


def _against_formula(run: dict[str, Any], base: float | None) -> dict[str, Any]:
    """The run's peak RSS against base + message memory bound + 4 x model (MB)."""
    if base is None:
        return {"rss_base_mb": None}
    peak, bound, model = (
        run["coordinator_vmhwm_mb"],
        run["message_memory_bound_mb"],
        run["model_mb"],
    )
    formula = base + bound + 4 * model
    return {
        "rss_base_mb": base,
        "rss_base_m": _BASE_M,
        "rss_model_multiple": round((peak - base - bound) / model, 2),
        "rss_formula_mb": round(formula, 1),
        "rss_within_formula": peak <= formula,
    }


@contextlib.contextmanager
def _workdir(keep: Path | None, name: str) -> Iterator[Path]:
    if keep is not None:
        path = keep / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="maskfl-bench-coord-") as tmp:
        yield Path(tmp)


async def _one(
    n: int,
    m: int,
    backend: str,
    work: Path,
    storage: dict[str, Any],
    *,
    pet: dict[str, Any],
    groups: int = 1,
) -> dict[str, Any]:
    sup = Supervisor(work / "logs")
    try:
        port = sup.start_plain_broker(work, limit_s=10)
        return await _measure(
            n, m, backend, work, port=port, sup=sup, storage=storage, pet=pet, groups=groups
        )
    finally:
        sup.stop_all()


async def _measure(
    n: int,
    m: int,
    backend: str,
    work: Path,
    *,
    port: int,
    sup: Supervisor,
    storage: dict[str, Any],
    pet: dict[str, Any],
    groups: int = 1,
) -> dict[str, Any]:
    fleet = SimFleet(fleet="bench")
    setup = configure(
        fleet, work, n=n, m=m, port=port, backend=backend, storage=storage, pet=pet, groups=groups
    )
    async with watched_round(fleet, setup, port) as watch:
        coord = sup.start("coordinator", _coordinator_argv(work, setup.config))
        peak_rss = [0]
        sampler = asyncio.create_task(sample_rss(coord.pid, peak_rss))
        try:
            async with asyncio.timeout(60):  # not wait_for: it can drop a Ctrl-C on 3.11
                sums = await watch.sum_dict
            built = await build_updates(fleet, setup, sums, work, m=m, groups=groups)
            ingest = await _coordinator_ingest(
                sup,
                watch,
                pid=coord.pid,
                work=work,
                port=port,
                frames_file=built.frames_file,
                n=n,
                http_port=setup.http_port,
            )
            # Baseline: the same frames to a bare subscriber process, same broker.
            base = await baseline(
                built.frames_file, port=port, total_frames=built.total_frames, sup=sup, work=work
            )
            db_bytes, registry_bytes = _state_sizes(work / "coordinator" / "state")
            vmhwm = _vmhwm(coord.pid)
            memory = (await coordinator_status(setup.http_port)).get("message_memory") or {}
        finally:
            sampler.cancel()
    out = _summary(
        n,
        m,
        built,
        ingest,
        base=base,
        events=watch.events,
        peak_rss=peak_rss[0],
        db_bytes=db_bytes,
        registry_bytes=registry_bytes,
        unmask=_unmask_timings(work / "logs" / "coordinator.log"),
    )
    out.update(_memory_fields(setup.config, vmhwm, memory))
    print(json.dumps(out), file=sys.stderr)
    return out


def _vmhwm(pid: int) -> int:
    """The process's peak resident set size (VmHWM, bytes): the kernel's own high-water
    mark, which no sampling interval can miss."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _memory_fields(config: Path, vmhwm: int, memory: dict[str, Any]) -> dict[str, Any]:
    """VmHWM, the configured message memory bound and the most of it the ingest held."""
    bound = load_config(config).pet.message_memory_max_bytes
    return {
        "coordinator_vmhwm_mb": round(vmhwm / 1e6, 1),
        "message_memory_bound_mb": round(bound / 1e6, 1),
        "message_memory_peak_mb": round(memory.get("peak", 0) / 1e6, 3),
    }


_UNMASK_LINE = re.compile(
    r"completed: model v\d+ .*; unmask ([\d.]+) s \(.*\), publish ([\d.]+) s, ([\d.]+) CPU-s"
)


def _unmask_timings(log: Path) -> dict[str, Any]:
    """The coordinator's own unmask figures, from its log line: sum2 closed -> model
    committed, then -> the broker's PUBACK of the model, and the CPU-s of both.
    ``unmask_publish_s`` also holds the broker's delivery to a subscriber."""
    found = _UNMASK_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
    if not found:
        keys = ("unmask_s", "publish_s", "unmask_publish_s", "unmask_cpu_s")
        return {**{f"coordinator_{k}": None for k in keys}, "coordinator_unmask_steps": {}}
    unmask, publish, cpu = (float(x) for x in found[-1])
    return {
        "coordinator_unmask_s": unmask,
        "coordinator_publish_s": publish,
        "coordinator_unmask_publish_s": round(unmask + publish, 3),
        "coordinator_unmask_cpu_s": cpu,
        "coordinator_unmask_steps": _unmask_steps(log),
    }


_STEPS_LINE = re.compile(
    r"unmask steps \(wall s, user\+system CPU-s, minor/major page faults\): (.*)"
)
_STEP = re.compile(r"(\w+) ([\d.]+) ([\d.]+)\+([\d.]+) (\d+)/(\d+)")


def _unmask_steps(log: Path) -> dict[str, dict[str, float]]:
    """The coordinator's per-step breakdown of its last unmask (its log line), in order:
    wall seconds, user and system CPU-s (every thread), minor and major page faults."""
    lines = _STEPS_LINE.findall(log.read_text(errors="replace"))
    if not lines:
        return {}
    return {
        name: {
            "wall_s": float(wall),
            "user_s": float(user),
            "system_s": float(system),
            "minor_faults": int(minor),
            "major_faults": int(major),
        }
        for name, wall, user, system, minor, major in _STEP.findall(lines[-1])
    }


def _coordinator_argv(work: Path, config: Path) -> list[str]:
    return [
        sys.executable,
        *profile_args(work),
        "-m",
        "maskfl.broker_coordinator.cli",
        "run",
        "--config",
        str(config),
    ]


@dataclass(frozen=True)
class _Ingest:
    """The coordinator's ingest of the round's updates, timed from outside and inside."""

    t0: float  # the first publish
    t_published: float  # the last PUBACK
    ingest_s: float  # first publish to last update receipt
    cpu_s: float  # the coordinator's CPU time meanwhile
    inside_s: float  # first update frame to last update committed (its /status)


async def _coordinator_ingest(
    sup: Supervisor,
    watch: Watch,
    *,
    pid: int,
    work: Path,
    port: int,
    frames_file: Path,
    n: int,
    http_port: int,
) -> _Ingest:
    """Publish the frames from a separate process (as in the baseline) until the
    coordinator accepted all ``n`` updates, then wait for the round's model."""
    cpu0 = cpu_seconds(pid)
    spy = pyspy(pid, work)
    t0, t_published = await publish_in_child(sup, work, port, frames_file, "coordinator")
    await until_accepted(watch, n, sup)
    ingest_s = max(watch.accepted) - t0
    cpu_s = cpu_seconds(pid) - cpu0
    stop_pyspy(spy)
    async with asyncio.timeout(600):
        await watch.model_seen.wait()
    inside_s = await _first_arrival_to_last_commit(http_port)
    return _Ingest(t0, t_published, ingest_s, cpu_s, inside_s)


def _summary(
    n: int,
    m: int,
    built: Built,
    ingest: _Ingest,
    *,
    base: dict[str, Any],
    events: dict[str, float],
    peak_rss: int,
    db_bytes: int,
    registry_bytes: int,
    unmask: dict[str, Any],
) -> dict[str, Any]:
    """One run's JSON entry."""
    mb = built.total_bytes / 1e6
    return {
        "n": n,
        "m": m,
        "update_bytes": built.update_bytes,
        "frames_per_update": built.frames_per_update,
        "total_mb": round(mb, 3),
        "build_updates_s": round(built.seconds, 3),
        "coordinator": {
            "ingest_s": round(ingest.ingest_s, 4),
            "publish_s": round(ingest.t_published - ingest.t0, 4),
            "updates_per_s": round(n / ingest.ingest_s, 2),
            "mb_per_s": round(mb / ingest.ingest_s, 2),
            "cpu_s": round(ingest.cpu_s, 3),
            "first_arrival_to_last_commit_s": round(ingest.inside_s, 4),
            "consumer_mb_per_s": round(mb / ingest.inside_s, 2),
        },
        "baseline": base,
        "ratio": round(base["consumer_s"] / ingest.inside_s, 3),
        "ratio_end_to_end": round((mb / ingest.ingest_s) / base["mb_per_s"], 3),
        "round_wall_s": round(events["model"] - events["round_params"], 3),
        "unmask_publish_s": round(events["model"] - events["last_sum2"], 3),
        **unmask,
        "load_average_1m": round(os.getloadavg()[0], 2),  # the machine is shared
        "coordinator_peak_rss_mb": round(peak_rss / 1e6, 1),
        "model_mb": round(4 * m / 1e6, 1),
        "rss_over_model": round(peak_rss / (4 * m), 2),
        "db_mb_after_round": round(db_bytes / 1e6, 2),
        "registry_files_mb": round(registry_bytes / 1e6, 2),
    }


async def _first_arrival_to_last_commit(http_port: int) -> float:
    """The coordinator's own ingest time of round 1, from its /status."""
    ingest: dict[str, Any] = {}
    for _ in range(200):
        ingest = (await coordinator_status(http_port)).get("last_round_ingest") or {}
        if ingest.get("round_id") == 1:
            break
        await asyncio.sleep(0.05)
    return float(ingest["last_update_commit_at"] - ingest["first_update_at"])


def _state_sizes(state: Path) -> tuple[int, int]:
    """Bytes of the coordinator's database files and of its model registry files."""
    db_bytes = sum(f.stat().st_size for f in state.glob("coordinator.db*"))
    registry_bytes = sum(
        f.stat().st_size for f in state.rglob("*") if f.is_file() and "models" in f.parts
    )
    return db_bytes, registry_bytes
