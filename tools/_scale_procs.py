"""The processes of ``maskfl-bench scale``'s test bed and what it reads of them: mosquitto
(the core broker, or an edge bridged to it), the coordinator's config, the publisher
process that sends a round's updates, the row of a round in the coordinator's database,
and /proc (CPU, memory, bytes written)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.broker_coordinator.store import LOGGED_PHASES
from maskfl.protocol.errors import StorageError
from maskfl.protocol.messages import (
    GlobalModel,
    decode_message,
)
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import LOG_QUIET, write_config
from maskfl.testing.fleet import SimFleet
from maskfl.tools._bench_publish import publish_all, read_frames
from maskfl.tools._demo_watch import coordinator_round
from maskfl.tools._supervise import Child, Supervisor
from maskfl.transport import MqttConfig, MqttTransport

CHUNK = 256 * 1024
P_SUM = 0.5
SUMMERS = 2
FLEET = "bench"


@dataclass
class Broker:
    child: Child
    port: int


async def publisher(port: int, frames_file: Path, result: Path, fetches: int, topic: str) -> None:
    frames = read_frames(frames_file)
    t = MqttTransport(
        MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-publisher",
            max_inflight=64,
            max_incoming_payload=256 << 20,
        )
    )
    await t.connect()
    fetched = model_bytes = 0
    for _ in range(fetches):  # each updater fetches the retained model once
        await t.subscribe(topic, qos=0)
        msg = await t.receive()
        if isinstance(decode_message(msg.payload, max_size=256 << 20).body, GlobalModel):
            fetched += 1
            model_bytes = len(msg.payload)
        await t.unsubscribe(topic)
    by_topic: dict[str, list[bytes]] = {}
    for tp, frame in frames:
        by_topic.setdefault(tp, []).append(frame)
    t0 = time.time()
    await publish_all(t, list(by_topic.items()))
    tmp = result.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"t0": t0, "t1": time.time(), "fetched": fetched, "model_bytes": model_bytes})
    )
    tmp.replace(result)
    await t.disconnect()


def start_broker(work: Path, sup: Supervisor, name: str, core_port: int | None) -> Broker:
    lines = ["listener {port} 127.0.0.1", "allow_anonymous true", "connection_messages false"]
    if core_port is not None:
        p = f"maskfl/v1/{FLEET}/"
        lines += [
            f"connection {name}-to-core",
            f"address 127.0.0.1:{core_port}",
            "cleansession true",
            f"topic {p}status/# out 0",
            f"topic {p}round in 0",
            f"topic {p}round/+/sums in 0",
            f"topic {p}revocations in 0",
            f"topic {p}model/# in 0",
        ]
    conf = work / f"{name}.conf"
    port = write_config(conf, listeners=lines, log_types=LOG_QUIET)
    return Broker(sup.start_broker(conf, port, name=name, limit_s=10), port)


async def round_observer(port: int) -> MqttTransport:
    """Connected and subscribed to round parameters and sum dictionaries."""
    observer = MqttTransport(
        MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-observer",
            max_incoming_payload=1 << 20,
            incoming_queue_size=100_000,
        )
    )
    await observer.connect()
    p = Topics(FLEET).prefix
    await observer.subscribe([f"{p}round", f"{p}round/+/sums"])
    return observer


def coordinator_config(
    fleet: SimFleet,
    work: Path,
    *,
    core_port: int,
    http_port: int,
    m: int,
    n_max: int,
    updates: int,
    groups: int,
    rounds: int,
) -> Path:
    """The coordinator's config: ``rounds`` rounds of ``updates`` updates and max(2, g)
    summers, each phase closing at its count."""
    summers = max(SUMMERS, groups)
    return fleet.write_coordinator(
        work / "coordinator",
        port=core_port,
        length=m,
        initial=np.zeros(m, dtype=np.float32),
        overrides={
            "masking": {
                "bound": 1.0,
                "n_max": max(1000, n_max),
                "word_bits": 32,
                "groups": groups,
            },
            "aggregation": {"backend": "numpy"},
            "pet": {
                "chunk_size": CHUNK,
                "max_rounds": rounds + 1,
                "round_pause_s": 0.5,
                "sum": {
                    "prob": P_SUM,  # target only bounds masking.groups here
                    "target": max(3, summers),
                    "count_min": summers,
                    "count_max": summers,
                    "time_max_s": 3600.0,
                },
                "update": {
                    "prob": 1.0,
                    "count_min": updates,
                    "count_max": updates,
                    "time_max_s": 3600.0,
                },
                "sum2": {"count_min": summers, "count_max": summers, "time_max_s": 3600.0},
            },
            # The privacy floor: 3 by default, 2 at the least (a round of 2 updates).
            "privacy": {"min_updates": min(3, max(2, updates))},
            "log": {
                "level": os.environ.get("MASKFL_BENCH_LOG", "warning"),
                "format": "text",
            },
            "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        },
    )


def round_entry(
    rid: int,
    n: int,
    *,
    info: dict[str, Any],
    ingest: dict[str, Any],
    background: int | None,
    update_bytes: int,
    first_publish: float,
    cpu_s: float,
    broker_bytes_out: int,
    fetched: int,
    model_bytes: int,
    cpu_window: tuple[float, int] = (0.0, 0),
) -> dict[str, Any]:
    """One round's JSON entry. ``cpu_window``: the seconds ``cpu_s`` was measured over and
    the idle fleet's heartbeats sent meanwhile."""
    inside = ingest.get("last_update_commit_at", 0) - ingest.get("first_update_at", 0)
    return {
        "round_id": rid,
        "broker_background_bytes_per_s": background,
        "outcome": info["outcome"],
        "update_bytes": update_bytes,
        "phases_s": {k: None if v is None else round(v, 3) for k, v in info["phases"].items()},
        "round_s": round(info["duration_s"], 3),
        "first_update_to_model_s": round(info["finished_at"] - first_publish, 3),
        "ingest_s": round(inside, 3),
        "ingest_updates_per_s": round(n / inside, 1) if inside > 0 else None,
        "coordinator_cpu_s": round(cpu_s, 3),
        "coordinator_cpu_ms_per_update": round(cpu_s / n * 1e3, 3),
        "coordinator_cpu_window_s": round(cpu_window[0], 3),
        "heartbeats_in_cpu_window": cpu_window[1],
        "broker_bytes_out": broker_bytes_out,
        "model_fetches": fetched,
        "model_message_bytes": model_bytes or None,
        "load_average_1m": round(os.getloadavg()[0], 2),  # the machine is shared
    }


def round_record(coordinator_dir: Path, rid: int) -> dict[str, Any]:
    """Outcome, times and phase durations of round ``rid``, read from the coordinator's
    database (read-only; its dashboard would do, but builds a row per device: at 100k
    devices that alone costs the coordinator hundreds of MB, which is not ingest)."""
    db = next(coordinator_dir.rglob("coordinator.db"))
    row = coordinator_round(db.parent, rid, timeout_s=30.0)
    if row is None:
        raise StorageError(f"round {rid} is not in {db}")
    finished = row.finished_at or time.time()
    return {
        "outcome": row.outcome,
        "phases": {p.value: row.phases.get(p.value) for p in LOGGED_PHASES},
        "duration_s": finished - row.started_at,
        "finished_at": finished,
    }


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc; 0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_jiffies() -> dict[str, tuple[int, int]]:
    """Each CPU's busy and total jiffies from ``/proc/stat`` (by CPU number, as a string):
    busy is user + nice + system + irq + softirq + steal; total adds idle and iowait."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, rest[:8])
        busy = user + nice + system + irq + softirq + steal
        out[name[3:]] = (busy, busy + idle + iowait)
    return out


def cpu_busy(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """The busy fraction of each CPU between two ``cpu_jiffies`` readings."""
    return {
        cpu: round((after[cpu][0] - b[0]) / max(1, after[cpu][1] - b[1]), 3)
        for cpu, b in before.items()
        if cpu in after
    }


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def cpu_times() -> dict[str, dict[str, int]]:
    """Each CPU's jiffies by ``/proc/stat`` field (by CPU number, as a string)."""
    out: dict[str, dict[str, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[name[3:]] = dict(zip(_STAT_FIELDS, map(int, rest[:8]), strict=True))
    return out


def cpu_busy_split(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, float]]:
    """Each CPU's busy share between two ``cpu_times`` readings, by field (user, nice,
    system, irq, softirq, steal over the total; they add up to ``cpu_busy``)."""
    out: dict[str, dict[str, float]] = {}
    for cpu, b in before.items():
        if cpu not in after:
            continue
        d = {f: after[cpu][f] - b[f] for f in _STAT_FIELDS}
        total = max(1, sum(d.values()))
        out[cpu] = {f: round(d[f] / total, 3) for f in _BUSY_FIELDS}
    return out


def softirqs() -> dict[str, dict[str, int]]:
    """``/proc/softirqs``: each CPU's count of each softirq (by CPU number, as a string)."""
    lines = Path("/proc/softirqs").read_text().splitlines()
    cpus = [c[3:] for c in lines[0].split()]
    out: dict[str, dict[str, int]] = {c: {} for c in cpus}
    for line in lines[1:]:
        name, *counts = line.split()
        for cpu, n in zip(cpus, counts, strict=False):
            out[cpu][name.rstrip(":")] = int(n)
    return out


def softirqs_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """The softirqs each CPU ran between two ``softirqs`` readings (those that ran)."""
    return {
        cpu: {k: n - b.get(k, 0) for k, n in after[cpu].items() if n - b.get(k, 0)}
        for cpu, b in before.items()
        if cpu in after
    }


def affinity(pid: int) -> dict[str, int]:
    """The CPUs each thread of a process may run on, as the kernel says: CPU list
    (e.g. "1" or "0-1") -> number of threads; empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        try:
            cpus = sorted(os.sched_getaffinity(tid))
        except OSError:
            continue
        key = ",".join(map(str, cpus))
        out[key] = out.get(key, 0) + 1
    return out


def all_proc_cpu() -> dict[int, tuple[str, float]]:
    """Every process on the machine (kernel threads included): name and user + system
    CPU-s so far."""
    out: dict[int, tuple[str, float]] = {}
    tck = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        head, tail = text.rsplit(")", 1)
        fields = tail.split()
        out[int(entry)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / tck)
    return out


def others_cpu(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    exclude: set[int],
    top: int = 8,
) -> dict[str, Any]:
    """CPU-s between two ``all_proc_cpu`` readings of the processes not in ``exclude``
    (the machine's other jobs and kernel threads): the total and the busiest."""
    spent = {
        f"{name}[{pid}]": cpu - before[pid][1]
        for pid, (name, cpu) in after.items()
        if pid in before and pid not in exclude and cpu > before[pid][1]
    }
    busiest = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_s": round(sum(spent.values()), 3),
        "busiest_s": {k: round(v, 3) for k, v in busiest},
    }


def proc_vm(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in kB (0 when the process is gone)."""
    return _proc_field(pid, "status", key)


def proc_io(pid: int, key: str) -> int:
    """A ``/proc/<pid>/io`` counter (0 when the process is gone)."""
    return _proc_field(pid, "io", key)


def _proc_field(pid: int, name: str, key: str) -> int:
    """The number after ``key:`` in ``/proc/<pid>/<name>``; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--publish":
        topic_arg = sys.argv[6]
        asyncio.run(
            publisher(
                int(sys.argv[2]),
                Path(sys.argv[3]),
                Path(sys.argv[4]),
                int(sys.argv[5]),
                "" if topic_arg == "-" else topic_arg,
            )
        )
