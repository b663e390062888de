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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.protocol.chunking import is_chunk, split_payload
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
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.sortition import MAX_GROUPS, group_of
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import SimParticipant
from maskfl.tools._bench_publish import baseline, cpu_seconds, publish_in_child, write_frames
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
    parser.add_argument(
        "--update-words",
        choices=("memory", "file"),
        default=None,
        help="override storage.update_words (file: no accepted update's words held in RAM)",
    )
    parser.add_argument(
        "--reassembly-mb",
        type=int,
        default=None,
        help="override pet.reassembly_max_bytes, in MiB (partial uploads held in RAM; "
        "the rest waits in the spool)",
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
    if getattr(args, "reassembly_mb", None) is not None:
        pet["reassembly_max_bytes"] = args.reassembly_mb << 20
    results = []
    for n in n_values:
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
            results.append({**median, "ratios": [x["ratio"] for x in runs]})
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
    setup = _configure(
        fleet, work, n=n, m=m, port=port, backend=backend, storage=storage, pet=pet, groups=groups
    )
    async with _watched_round(fleet, setup, port) as watch:
        coord = sup.start("coordinator", _coordinator_argv(work, setup.config))
        peak_rss = [0]
        sampler = asyncio.create_task(_sample_rss(coord.pid, peak_rss))
        try:
            sums = await asyncio.wait_for(watch.sum_dict, 60)
            built = await _build_updates(fleet, setup, sums, work, m=m, groups=groups)
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
    print(json.dumps(out), file=sys.stderr)
    return out


@contextlib.asynccontextmanager
async def _watched_round(fleet: SimFleet, setup: _Setup, port: int) -> AsyncIterator[_Watch]:
    """The simulated summers running and the round watched, for the body's duration."""
    summers = [
        SimParticipant(i, ca_public_key=fleet.ca_public_key, host="127.0.0.1", port=port)
        for i in setup.summer_ids
    ]
    watch = _Watch(Topics(fleet.fleet), port)
    await watch.connect()
    for s in summers:
        await s.start()
    watcher = asyncio.create_task(watch.observe())
    try:
        yield watch
    finally:
        watcher.cancel()
        for s in summers:
            await s.stop()
        await watch.observer.disconnect()


_UNMASK_LINE = re.compile(
    r"completed: model v\d+ .*; unmask ([\d.]+) s \(.*\), publish ([\d.]+) s, ([\d.]+) CPU-s"
)


def _unmask_timings(log: Path) -> dict[str, float | None]:
    """The coordinator's own unmask figures, from its log line: sum2 closed -> model
    committed, then -> the broker's PUBACK of the model, and the CPU-s of both.
    ``unmask_publish_s`` also holds the broker's delivery to a subscriber."""
    found = _UNMASK_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
    if not found:
        keys = ("unmask_s", "publish_s", "unmask_publish_s", "unmask_cpu_s")
        return {f"coordinator_{k}": None for k in keys}
    unmask, publish, cpu = (float(x) for x in found[-1])
    return {
        "coordinator_unmask_s": unmask,
        "coordinator_publish_s": publish,
        "coordinator_unmask_publish_s": round(unmask + publish, 3),
        "coordinator_unmask_cpu_s": cpu,
    }


def _coordinator_argv(work: Path, config: Path) -> list[str]:
    return [
        sys.executable,
        *_profile_args(work),
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
    watch: _Watch,
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
    spy = _pyspy(pid, work)
    t0, t_published = await publish_in_child(sup, work, port, frames_file, "coordinator")
    await _until_accepted(watch, n, sup)
    ingest_s = max(watch.accepted) - t0
    cpu_s = cpu_seconds(pid) - cpu0
    _stop_pyspy(spy)
    await asyncio.wait_for(watch.model_seen.wait(), 600)
    inside_s = await _first_arrival_to_last_commit(http_port)
    return _Ingest(t0, t_published, ingest_s, cpu_s, inside_s)


def _summary(
    n: int,
    m: int,
    built: _Built,
    ingest: _Ingest,
    *,
    base: dict[str, Any],
    events: dict[str, float],
    peak_rss: int,
    db_bytes: int,
    registry_bytes: int,
    unmask: dict[str, float | None],
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


@dataclass(frozen=True)
class _Setup:
    """The coordinator's config file and the round's participants."""

    config: Path
    http_port: int
    seed1: bytes
    summer_ids: list[Any]
    updater_ids: list[Any]
    n_max: int


def _configure(
    fleet: SimFleet,
    work: Path,
    *,
    n: int,
    m: int,
    port: int,
    backend: str,
    storage: dict[str, Any],
    pet: dict[str, Any],
    groups: int,
) -> _Setup:
    """Write the coordinator's config for one round of ``n`` updates and max(2, g) summers."""
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
                **pet,
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
            # info: the unmask line with the coordinator's own timings (a few lines a round)
            "log": {"level": os.environ.get("MASKFL_BENCH_LOG", "info"), "format": "text"},
            # The privacy floor: 3 by default, 2 at the least (a round of 2 updaters).
            "privacy": {"min_updates": min(3, max(2, n))},
            "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        },
    )
    return _Setup(config, http_port, seed1, summer_ids, updater_ids, n_max)


class _Watch:
    """What the bench sees of the round on the broker, with arrival times: the round
    parameters, the sum dictionary, update and sum2 receipts, the global model."""

    def __init__(self, topics: Topics, port: int) -> None:
        self.topics = topics
        self.events: dict[str, float] = {}
        self.accepted: list[float] = []
        self.sum_dict: asyncio.Future[SumDict] = asyncio.get_running_loop().create_future()
        self.model_seen = asyncio.Event()
        self._model_frames: Reassembler[None] = Reassembler(16, 1 << 31, 600.0)
        self.observer = MqttTransport(
            MqttConfig(
                host="127.0.0.1",
                port=port,
                client_id="bench-observer",
                max_incoming_payload=MQTT_MAX_PACKET,  # a global model of M = 2.5e7 is 100 MB
                incoming_queue_size=100_000,
            )
        )

    async def connect(self) -> None:
        await self.observer.connect()
        p = self.topics.prefix
        await self.observer.subscribe(
            [f"{p}round", f"{p}round/+/sums", f"{p}receipts/+", f"{p}model/+/latest"]
        )

    async def observe(self) -> None:
        async for msg in self.observer.messages():
            if not msg.payload:
                continue
            now = time.time()  # the last frame's arrival, before decoding a large message
            payload = msg.payload
            if is_chunk(msg.payload):  # global models above the chunk size
                whole = self._model_frames.feed(msg.topic, msg.payload, now)
                if whole is None:
                    continue
                payload = whole.payload
            try:
                body = decode_message(payload, max_size=1 << 31).body
            except MaskflError as exc:
                print(f"maskfl-bench coordinator: observer: {msg.topic}: {exc}", file=sys.stderr)
                continue
            self._saw(body, now)

    def _saw(self, body: Any, now: float) -> None:
        events = self.events
        if isinstance(body, RoundParams) and body.round_id == 1:
            events.setdefault("round_params", now)
        elif isinstance(body, SumDict) and not self.sum_dict.done():
            self.sum_dict.set_result(body)
        elif isinstance(body, Receipt) and body.accepted and body.message_type is not None:
            if body.message_type.name == "UPDATE":
                self.accepted.append(now)
            elif body.message_type.name == "SUM2":
                events["last_sum2"] = now
        elif isinstance(body, GlobalModel) and body.version >= 1:
            events["model"] = now
            self.model_seen.set()


async def _sample_rss(pid: int, peak: list[int]) -> None:
    """The process's peak resident set size into ``peak[0]``, sampled every 20 ms."""
    import psutil

    proc = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class _Built:
    """The round's updates, chunked and written to ``frames_file`` for the publishers."""

    frames_file: Path
    seconds: float
    total_bytes: int
    total_frames: int
    update_bytes: int
    frames_per_update: int


async def _build_updates(
    fleet: SimFleet, setup: _Setup, sums: SumDict, work: Path, *, m: int, groups: int
) -> _Built:
    """Build every update before the clock starts (masking is the agents' cost)."""
    seed1 = setup.seed1
    topics = Topics(fleet.fleet)
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
    cfg = MaskConfig(1.0, setup.n_max, 32)
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

    for ident in setup.updater_ids:
        # In a thread: at M = 2.5e7 building takes seconds per update, and a blocked
        # loop misses the MQTT keepalives of the observer and the summers.
        frames.append(await asyncio.to_thread(build, ident))
    build_s = time.perf_counter() - build_started
    frames_file = work / "frames.bin"
    write_frames(frames_file, frames)
    return _Built(
        frames_file=frames_file,
        seconds=build_s,
        total_bytes=sum(len(f) for _, fs in frames for f in fs),
        total_frames=sum(len(fs) for _, fs in frames),
        update_bytes=len(b"".join(frames[0][1])) if frames else 0,
        frames_per_update=len(frames[0][1]) if frames else 0,
    )


async def _until_accepted(watch: _Watch, n: int, sup: Supervisor) -> None:
    """Until the coordinator's receipts accepted ``n`` updates (600 s at most)."""
    deadline = time.monotonic() + 600
    while len(watch.accepted) < n:
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(watch.accepted)} of {n} updates accepted")
        await asyncio.sleep(0.005)
    print(f"maskfl-bench coordinator: {n} updates accepted", file=sys.stderr)


async def _first_arrival_to_last_commit(http_port: int) -> float:
    """The coordinator's own ingest time of round 1, from its /status."""
    ingest: dict[str, Any] = {}
    for _ in range(200):
        ingest = (await _status(http_port)).get("last_round_ingest") or {}
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


async def _status(port: int) -> dict[str, Any]:
    """The coordinator's /status document."""

    def get() -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    return await asyncio.to_thread(get)


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
