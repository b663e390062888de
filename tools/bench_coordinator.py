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
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.protocol.chunking import Reassembler, is_chunk, split_payload
from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    GlobalModel,
    Receipt,
    RoundParams,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.sortition import MAX_GROUPS, group_of
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import SimParticipant
from maskfl.tools._supervise import Supervisor
from maskfl.transport import MQTT_MAX_PACKET, MqttConfig, MqttTransport

CHUNK = 256 * 1024
P_SUM = 0.5


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
    results = []
    for n in n_values:
        for m in m_values:
            runs = []
            for r in range(repeat):
                print(
                    f"maskfl-bench coordinator: N={n} M={m} run {r + 1}/{repeat}", file=sys.stderr
                )
                with _workdir(getattr(args, "keep", None), f"n{n}-m{m}") as work:
                    runs.append(asyncio.run(_one(n, m, backend, work, storage, groups=groups)))
            runs.sort(key=lambda x: x["ratio"])
            median = runs[len(runs) // 2]
            results.append({**median, "ratios": [x["ratio"] for x in runs]})
    return {
        "chunk_size": CHUNK,
        "word_bits": 32,
        "backend": backend,
        "groups": groups,
        "storage": storage,
        "repeat": repeat,
        "note": "each entry is the run with the median ratio; 'ratios' lists every run",
        "runs": results,
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
    n: int, m: int, backend: str, work: Path, storage: dict[str, Any], *, groups: int = 1
) -> dict[str, Any]:
    sup = Supervisor(work / "logs")
    try:
        port = sup.start_plain_broker(work, limit_s=10)
        return await _measure(
            n, m, backend, work, port=port, sup=sup, storage=storage, groups=groups
        )
    finally:
        sup.stop_all()


async def _measure(  # noqa: PLR0915 the measured sequence; split tracked in issue 12
    n: int,
    m: int,
    backend: str,
    work: Path,
    *,
    port: int,
    sup: Supervisor,
    storage: dict[str, Any],
    groups: int = 1,
) -> dict[str, Any]:
    fleet = SimFleet(fleet="bench")
    n_summers = max(2, groups)
    http_port = free_port()
    # update.count_max = N may not exceed masking.n_max (the config refuses it).
    n_max = max(1000, n)
    initial = np.zeros(m, dtype=np.float32)
    seed1 = first_round_seed(bytes(32), initial)
    summer_ids, updater_ids = fleet.identities_for_roles(
        seed1, p_sum=P_SUM, p_update=1.0, summers=n_summers, updaters=n, groups=groups
    )
    config = fleet.write_coordinator(
        work / "coordinator",
        port=port,
        length=m,
        initial=initial,
        overrides={
            "masking": {"bound": 1.0, "n_max": n_max, "word_bits": 32, "groups": groups},
            "aggregation": {"backend": backend},
            **({"storage": storage} if storage else {}),
            "pet": {
                "chunk_size": CHUNK,
                "max_rounds": 2,
                "round_pause_s": 600.0,
                # target only bounds groups here (prob sets p_sum)
                "sum": {
                    "prob": P_SUM,
                    "target": max(3, n_summers),
                    "count_min": n_summers,
                    "count_max": n_summers,
                    "time_max_s": 120.0,
                },
                "update": {"prob": 1.0, "count_min": n, "count_max": n, "time_max_s": 600.0},
                "sum2": {"count_min": n_summers, "count_max": n_summers, "time_max_s": 600.0},
            },
            "log": {"level": os.environ.get("MASKFL_BENCH_LOG", "warning"), "format": "text"},
            # The privacy floor: 3 by default, 2 at the least (a round of 2 updaters).
            "privacy": {"min_updates": min(3, max(2, n))},
            "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        },
    )
    topics = Topics(fleet.fleet)
    summers = [
        SimParticipant(i, ca_public_key=fleet.ca_public_key, host="127.0.0.1", port=port)
        for i in summer_ids
    ]
    observer = MqttTransport(
        MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-observer",
            max_incoming_payload=MQTT_MAX_PACKET,  # a global model of M = 2.5e7 is 100 MB
            incoming_queue_size=100_000,
        )
    )
    await observer.connect()
    p = topics.prefix
    await observer.subscribe(
        [f"{p}round", f"{p}round/+/sums", f"{p}receipts/+", f"{p}model/+/latest"]
    )
    for s in summers:
        await s.start()
    events: dict[str, float] = {}
    accepted: list[float] = []
    sum_dict: asyncio.Future[SumDict] = asyncio.get_running_loop().create_future()
    model_seen = asyncio.Event()

    model_frames: Reassembler[None] = Reassembler(16, 1 << 31, 600.0)

    async def observe() -> None:
        async for msg in observer.messages():
            if not msg.payload:
                continue
            now = time.time()  # the last frame's arrival, before decoding a large message
            payload = msg.payload
            if is_chunk(msg.payload):  # global models above the chunk size
                whole = model_frames.feed(msg.topic, msg.payload, now)
                if whole is None:
                    continue
                payload = whole.payload
            try:
                body = decode_message(payload, max_size=1 << 31).body
            except MaskflError as exc:
                print(f"maskfl-bench coordinator: observer: {msg.topic}: {exc}", file=sys.stderr)
                continue
            if isinstance(body, RoundParams) and body.round_id == 1:
                events.setdefault("round_params", now)
            elif isinstance(body, SumDict) and not sum_dict.done():
                sum_dict.set_result(body)
            elif isinstance(body, Receipt) and body.accepted and body.message_type is not None:
                if body.message_type.name == "UPDATE":
                    accepted.append(now)
                elif body.message_type.name == "SUM2":
                    events["last_sum2"] = now
            elif isinstance(body, GlobalModel) and body.version >= 1:
                events["model"] = now
                model_seen.set()

    watcher = asyncio.create_task(observe())
    peak_rss = [0]
    coord = sup.start(
        "coordinator",
        [
            sys.executable,
            *_profile_args(work),
            "-m",
            "maskfl.broker_coordinator.cli",
            "run",
            "--config",
            str(config),
        ],
    )

    async def sample_rss() -> None:
        import psutil

        proc = psutil.Process(coord.pid)
        while True:
            with contextlib.suppress(psutil.Error):
                peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample_rss())
    try:
        sums = await asyncio.wait_for(sum_dict, 60)
        # Build every update before the clock starts.
        opened = open_sum_dict(
            sums,
            fleet=fleet.fleet,
            round_id=1,
            ca_public_key=fleet.ca_public_key,
            now=time.time(),
            revocations=None,
            groups=groups,
            round_seed=seed1,
        )
        cfg = MaskConfig(1.0, n_max, 32)
        rng = np.random.default_rng(0)
        frames: list[tuple[str, list[bytes]]] = []
        build_started = time.perf_counter()

        def build(ident: Any) -> tuple[str, list[bytes]]:
            seeds = [new_seed() for _ in range(groups)]  # one per mask group
            delta = rng.uniform(-0.1, 0.1, m).astype(np.float32)
            words = mask_update(delta, 0.5, seeds, cfg)
            sealed = {
                s.certificate.public_key: seal_seed(
                    seeds[group_of(seed1, s.certificate.public_key, groups)], s.ephemeral_pk
                )
                for s in opened
            }
            raw = encode_message(
                Update(ident.certificate, sealed, words),
                fleet=fleet.fleet,
                round_id=1,
                signing_key=ident.signing_key,
            )
            return topics.update(1, ident.device_id), split_payload(raw, CHUNK)

        for ident in updater_ids:
            # In a thread: at M = 2.5e7 building takes seconds per update, and a blocked
            # loop misses the MQTT keepalives of the observer and the summers.
            frames.append(await asyncio.to_thread(build, ident))
        build_s = time.perf_counter() - build_started
        total_bytes = sum(len(f) for _, fs in frames for f in fs)
        total_frames = sum(len(fs) for _, fs in frames)
        frames_file = work / "frames.bin"
        _write_frames(frames_file, frames)
        update_bytes = len(b"".join(frames[0][1])) if frames else 0
        frames_per_update = len(frames[0][1]) if frames else 0
        del frames
        # Coordinator ingest; a separate publisher process, as in the baseline.
        cpu0 = _cpu(coord.pid)
        spy = _pyspy(coord.pid, work)
        t0, t_published = await _publish_in_child(sup, work, port, frames_file, "coordinator")
        deadline = time.monotonic() + 600
        while len(accepted) < n:
            sup.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(accepted)} of {n} updates accepted")
            await asyncio.sleep(0.005)
        print(f"maskfl-bench coordinator: {n} updates accepted", file=sys.stderr)
        ingest_s = max(accepted) - t0
        coord_cpu = _cpu(coord.pid) - cpu0
        _stop_pyspy(spy)
        await asyncio.wait_for(model_seen.wait(), 600)
        round_s = events["model"] - events["round_params"]
        ingest: dict[str, Any] = {}
        for _ in range(200):
            ingest = (await _status(http_port)).get("last_round_ingest") or {}
            if ingest.get("round_id") == 1:
                break
            await asyncio.sleep(0.05)
        inside_s = ingest["last_update_commit_at"] - ingest["first_update_at"]
        # Baseline: the same frames to a bare subscriber process, same broker.
        base = await _baseline(
            frames_file, port=port, total_frames=total_frames, sup=sup, work=work
        )
        db_bytes = sum(
            f.stat().st_size for f in (work / "coordinator" / "state").glob("coordinator.db*")
        )
        registry_bytes = sum(
            f.stat().st_size
            for f in (work / "coordinator" / "state").rglob("*")
            if f.is_file() and "models" in f.parts
        )
    finally:
        sampler.cancel()
        watcher.cancel()
        for s in summers:
            await s.stop()
        await observer.disconnect()
    mb = total_bytes / 1e6
    out = {
        "n": n,
        "m": m,
        "update_bytes": update_bytes,
        "frames_per_update": frames_per_update,
        "total_mb": round(mb, 3),
        "build_updates_s": round(build_s, 3),
        "coordinator": {
            "ingest_s": round(ingest_s, 4),
            "publish_s": round(t_published - t0, 4),
            "updates_per_s": round(n / ingest_s, 2),
            "mb_per_s": round(mb / ingest_s, 2),
            "cpu_s": round(coord_cpu, 3),
            "first_arrival_to_last_commit_s": round(inside_s, 4),
            "consumer_mb_per_s": round(mb / inside_s, 2),
        },
        "baseline": base,
        "ratio": round(base["consumer_s"] / inside_s, 3),
        "ratio_end_to_end": round((mb / ingest_s) / base["mb_per_s"], 3),
        "round_wall_s": round(round_s, 3),
        "unmask_publish_s": round(events["model"] - events["last_sum2"], 3),
        "coordinator_peak_rss_mb": round(peak_rss[0] / 1e6, 1),
        "model_mb": round(4 * m / 1e6, 1),
        "rss_over_model": round(peak_rss[0] / (4 * m), 2),
        "db_mb_after_round": round(db_bytes / 1e6, 2),
        "registry_files_mb": round(registry_bytes / 1e6, 2),
    }
    print(json.dumps(out), file=sys.stderr)
    return out


async def _publish_all(publisher: MqttTransport, frames: list[tuple[str, list[bytes]]]) -> None:
    """Publish every frame, keeping many PUBACKs outstanding (like many devices at once)."""
    window = asyncio.Semaphore(64)
    pending: set[asyncio.Task[None]] = set()

    async def one(topic: str, frame: bytes) -> None:
        try:
            await publisher.publish(topic, frame, qos=1)
        finally:
            window.release()

    for topic, fs in frames:
        for frame in fs:
            await window.acquire()
            task = asyncio.create_task(one(topic, frame))
            pending.add(task)
            task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)


def _exists(path: Path | str) -> bool:
    """A file another process writes to signal us (polled; cheap, never blocks long)."""
    return os.path.exists(path)


def _touch(path: Path) -> None:
    path.write_text("")


def _write_frames(path: Path, frames: list[tuple[str, list[bytes]]]) -> None:
    """Length-prefixed (topic, frame) records for the publisher process."""
    with path.open("wb") as f:
        for topic, fs in frames:
            t = topic.encode()
            for frame in fs:
                f.write(struct.pack("<HI", len(t), len(frame)))
                f.write(t)
                f.write(frame)


def _read_frames(path: Path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    out = []
    pos = 0
    while pos < len(data):
        tlen, flen = struct.unpack_from("<HI", data, pos)
        pos += 6
        topic = data[pos : pos + tlen].decode()
        pos += tlen
        out.append((topic, data[pos : pos + flen]))
        pos += flen
    return out


async def _publish_in_child(
    sup: Supervisor, work: Path, port: int, frames_file: Path, name: str
) -> tuple[float, float]:
    """Publish every frame from a fresh process; returns (first publish, last PUBACK) times."""
    result = work / f"{name}-publish.json"
    go = work / f"{name}-publish.go"
    child = sup.start(
        f"publisher-{name}",
        [
            sys.executable,
            "-m",
            "maskfl.tools.bench_coordinator",
            "--publish",
            str(port),
            str(frames_file),
            "sink" if name == "baseline" else "",
            str(result),
        ],
    )
    child.expected_exit = True  # it exits when done; a failure shows as a missing result
    ready = f"{result}.ready"
    deadline = time.monotonic() + 60
    while not _exists(ready):
        sup.check()
        if time.monotonic() > deadline or child.proc.poll() is not None:
            raise TimeoutError(f"the publisher did not start: {child.log_tail()}")
        await asyncio.sleep(0.02)
    _touch(go)
    while not _exists(result):
        sup.check()
        if time.monotonic() > deadline + 600 or (
            child.proc.poll() not in (None, 0) and not _exists(result)
        ):
            raise TimeoutError(f"the publisher did not finish: {child.log_tail()}")
        await asyncio.sleep(0.005)
    data = json.loads(result.read_text())
    return float(data["t0"]), float(data["t1"])


async def _publisher(port: int, frames_file: Path, rename: str, result: Path) -> None:
    """The publisher process: load the frames, connect, wait for go, publish all."""
    records = _read_frames(frames_file)
    if rename:
        records = [(t.replace("maskfl/v1/", "bench/sink/", 1), f) for t, f in records]
    t = MqttTransport(
        MqttConfig(host="127.0.0.1", port=port, client_id=f"bench-pub-{rename}", max_inflight=64)
    )
    await t.connect()
    _touch(Path(f"{result}.ready"))
    go = str(result).replace(".json", ".go")
    while not _exists(go):  # noqa: ASYNC110 - a file from another process
        await asyncio.sleep(0.001)
    t0 = time.time()
    by_topic: dict[str, list[bytes]] = {}
    for topic, frame in records:
        by_topic.setdefault(topic, []).append(frame)
    await _publish_all(t, list(by_topic.items()))
    t1 = time.time()
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps({"t0": t0, "t1": t1}))
    tmp.replace(result)
    await t.disconnect()


async def _baseline(
    frames_file: Path,
    *,
    port: int,
    total_frames: int,
    sup: Supervisor,
    work: Path,
) -> dict[str, Any]:
    result = work / "sink.json"
    sink = sup.start(
        "sink",
        [
            sys.executable,
            "-m",
            "maskfl.tools.bench_coordinator",
            "--sink",
            str(port),
            str(total_frames),
            str(result),
        ],
    )
    ready = work / "sink.json.ready"
    deadline = time.monotonic() + 30
    while not _exists(ready):
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the bare subscriber did not start")
        await asyncio.sleep(0.02)
    cpu0 = _cpu(sink.pid)
    t0, _ = await _publish_in_child(sup, work, port, frames_file, "baseline")
    deadline = time.monotonic() + 600
    while not _exists(result):
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the bare subscriber did not receive everything")
        await asyncio.sleep(0.005)
    data = json.loads(result.read_text())
    cpu = _cpu(sink.pid) - cpu0
    seconds = data["last"] - t0
    consumer = data["last"] - data["first"]
    mb = data["bytes"] / 1e6
    return {
        "s": round(seconds, 4),
        "messages_per_s": round(data["count"] / seconds, 1),
        "mb_per_s": round(mb / seconds, 2),
        "cpu_s": round(cpu, 3),
        "consumer_s": round(consumer, 4),
        "consumer_mb_per_s": round(mb / consumer, 2) if consumer > 0 else None,
    }


async def _sink(port: int, expected: int, result: Path) -> None:
    """The bare subscriber: receive ``expected`` messages, ack them, write the time."""
    t = MqttTransport(
        MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-sink",
            max_incoming_payload=64 << 20,
            incoming_queue_size=256,
            manual_ack=True,
            clean_start=False,
            session_expiry_s=600,
            receive_maximum=65535,
        )
    )
    await t.connect()
    await t.subscribe("bench/sink/#", qos=1)
    _touch(Path(f"{result}.ready"))
    count = 0
    size = 0
    first = 0.0
    async for msg in t.messages():
        if not count:
            first = time.time()
        count += 1
        size += len(msg.payload)
        t.ack(msg)
        if count >= expected:
            break
    tmp = result.with_suffix(".tmp")
    last = time.time()
    tmp.write_text(json.dumps({"count": count, "bytes": size, "first": first, "last": last}))
    tmp.replace(result)
    await asyncio.sleep(2.0)  # stay up while the bench reads our CPU time
    await t.disconnect()


async def _status(port: int) -> dict[str, Any]:
    """The coordinator's /status document."""

    def get() -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    return await asyncio.to_thread(get)


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except Exception:  # psutil missing or the process gone: the figure is informative only
        return 0.0


def _profile_args(work: Path) -> list[str]:
    """``MASKFL_BENCH_PROFILE=1`` runs the coordinator under cProfile (output in the workdir)."""
    if os.environ.get("MASKFL_BENCH_PROFILE"):
        return ["-m", "cProfile", "-o", str(work / "coordinator.prof")]
    return []


def _pyspy(pid: int, work: Path) -> subprocess.Popen[bytes] | None:
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


def _stop_pyspy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--sink":
        asyncio.run(_sink(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
    elif len(sys.argv) == 6 and sys.argv[1] == "--publish":
        asyncio.run(_publisher(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5])))
