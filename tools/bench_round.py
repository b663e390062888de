"""``maskfl-bench round``: one full PET round on a local mosquitto, and the same round unmasked.

For each (N, M): a fresh mosquitto on a free loopback port, the real coordinator
(``maskfl-coordinator run``, its own process, durable SQLite store) and N updaters
plus S summers that speak the protocol (:mod:`maskfl.testing.participants`: no TFLite,
random deltas) from this process. Identities are drawn so that round 1 has exactly S
summers and N updaters, and every phase closes at its count, so the wall time is the
work, not a timer. Reported, in seconds from the round parameters:

- ``sum``: summers' ephemeral keys in, sum dictionary out;
- ``update``: updaters mask (ChaCha20), seal seeds, upload; coordinator verifies,
  adds, commits; seed dictionaries out;
- ``sum2``: summers open the seeds, expand and add N masks of M + 1 words, upload;
- ``unmask``: vote, unmask, decode, FedAvg step, the model published (and received
  by one subscriber: its fan-out to every device costs the same with or without
  masking and is left out of both rounds);

and bytes sent per updater and per summer, and the model's size.

The *plain* round is the baseline: the same N updaters, broker and signed message
format, sending their float32 deltas in the clear to a minimal aggregator process
(verify, weighted sum, publish the model; nothing durable). ``masking_overhead``
is ``masked.total / plain.total``. The plain aggregator keeps nothing on disk, so the
ratio also contains the coordinator's durability (fsync'd update log, checkpoints).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import MaskflError
from maskfl.protocol.identity import Identity
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.topics import TopicKind, parse_topic
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.testing.participants import SimParticipant, start_all, stop_all
from maskfl.tools._bench_plain import (
    CHUNK,
    FLEET,
    ModelWatcher,
    plain_aggregator,
    plain_round,
)
from maskfl.tools._benchargs import count
from maskfl.tools._demo_fleet import console_script
from maskfl.tools._demo_watch import fetch_ready, fetch_status
from maskfl.tools._help import plain
from maskfl.tools._supervise import Child, Supervisor

__all__ = ["add_parser", "run", "run_one"]

GRID_N = (10, 50, 100)
GRID_M = (10_000, 100_000, 1_000_000)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``round`` on the ``maskfl-bench`` subcommand parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "round",
        help="a full masked round on a local broker, split by phase, and the same round unmasked",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--n", type=count, nargs="+", default=list(GRID_N), help="updaters (default 10 50 100)"
    )
    parser.add_argument(
        "--m",
        type=count,
        nargs="+",
        default=list(GRID_M),
        help="model parameters (default 1e4 1e5 1e6)",
    )
    parser.add_argument("--summers", type=count, default=3, help="summers (default 3)")
    parser.add_argument(
        "--word-bits", type=int, choices=[32, 64], default=32, help="mask word size (default 32)"
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the unmasked baseline")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for n in args.n:
        for m in args.m:
            print(f"maskfl-bench round: N={n} M={m}", file=sys.stderr)
            results.append(
                run_one(
                    n, m, summers=args.summers, word_bits=args.word_bits, plain=not args.no_plain
                )
            )
    return {"rounds": results}


def run_one(
    n: int, m: int, *, summers: int = 3, word_bits: int = 32, plain: bool = True
) -> dict[str, Any]:
    """One masked round (and one plain round) of N updaters and M parameters."""
    with tempfile.TemporaryDirectory(prefix="maskfl-bench-round-") as tmp:
        root = Path(tmp)
        with Supervisor(root / "logs") as supervisor:
            port = supervisor.start_plain_broker(root, limit_s=10.0)
            result: dict[str, Any] = {"n": n, "m": m, "summers": summers, "word_bits": word_bits}
            result["masked"] = asyncio.run(
                _masked_round(
                    root, supervisor, port, n=n, m=m, summers=summers, word_bits=word_bits
                )
            )
            if plain:
                result["plain"] = asyncio.run(plain_round(root, supervisor, port, n=n, m=m))
                masked_s = result["masked"]["seconds"]["total"]
                plain_s = result["plain"]["seconds"]["total"]
                result["masking_overhead"] = {
                    "ratio": round(masked_s / plain_s, 2),
                    "extra_seconds": round(masked_s - plain_s, 4),
                    "extra_bytes_per_updater": result["masked"]["bytes_per_updater"]
                    - result["plain"]["bytes_per_updater"],
                }
        return result


# -- the masked round --------------------------------------------------------------------


@dataclass
class _Times:
    params: list[float] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)
    seeds: list[float] = field(default_factory=list)
    published: dict[str, list[float]] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)


class _TimedParticipant(SimParticipant):
    """A simulated participant that notes when things arrive and what it sends."""

    def __init__(self, identity: Identity, times: _Times, **kwargs: Any) -> None:
        super().__init__(identity, **kwargs)
        self._times = times

    async def start(self, *, models: bool = False) -> None:
        """Subscribe like a device, except to models (see :class:`ModelWatcher`)."""
        await super().start(models=models)

    def arrived(self, kind: TopicKind, round_id: int) -> None:
        times = {
            TopicKind.ROUND: self._times.params,
            TopicKind.SUMS: self._times.sums,
            TopicKind.SEEDS: self._times.seeds,
        }
        times[kind].append(time.perf_counter())

    async def publish(self, topic: str, payload: bytes, chunk_size: int) -> None:
        await super().publish(topic, payload, chunk_size)
        kind = str(parse_topic(topic).kind)
        self._times.published.setdefault(kind, []).append(time.perf_counter())
        self._times.bytes_sent[self.device] = self._times.bytes_sent.get(self.device, 0) + len(
            payload
        )


async def _masked_round(
    root: Path, supervisor: Supervisor, port: int, *, n: int, m: int, summers: int, word_bits: int
) -> dict[str, Any]:
    fleet = SimFleet(fleet=FLEET)
    initial = np.zeros(m, dtype=np.float32)
    seed1 = first_round_seed(bytes(32), initial)
    p_sum = summers / (summers + n)
    s_ids, u_ids = fleet.identities_for_roles(
        seed1, p_sum=p_sum, p_update=1.0, summers=summers, updaters=n
    )
    http_port = free_port()
    config = _masked_config(
        fleet,
        root,
        port,
        initial,
        http_port=http_port,
        p_sum=p_sum,
        n=n,
        summers=summers,
        word_bits=word_bits,
    )
    times = _Times()
    participants: list[SimParticipant] = [
        _TimedParticipant(i, times, ca_public_key=fleet.ca_public_key, host="127.0.0.1", port=port)
        for i in [*s_ids, *u_ids]
    ]
    watcher = ModelWatcher(port, FLEET, "bench")
    await watcher.start()
    await start_all(participants)
    try:
        coordinator = supervisor.start(
            "coordinator",
            [
                *console_script("maskfl-coordinator", "maskfl.broker_coordinator.cli"),
                "run",
                "--config",
                str(config),
            ],
        )
        model_at, status_info = await _until_model(supervisor, coordinator, watcher, http_port)
        errors = [e for p in participants for e in p.errors]
        if errors:
            raise MaskflError(f"participants reported errors: {errors[:3]}")
        model = watcher.model
        assert model is not None
    finally:
        await stop_all(participants)
        await watcher.stop()
        if "coordinator" in locals():
            supervisor.stop(coordinator)
    summer_ids = {i.device_id for i in s_ids}
    return {
        **_masked_times(times, summer_ids, model_at),
        "model_weights_bytes": int(model.weights.nbytes),
        "backend": status_info.get("backend"),
        "resolution": MaskConfig(1.0, max(100, n), word_bits).resolution,  # type: ignore[arg-type]
    }


def _masked_config(
    fleet: SimFleet,
    root: Path,
    port: int,
    initial: npt.NDArray[np.float32],
    *,
    http_port: int,
    p_sum: float,
    n: int,
    summers: int,
    word_bits: int,
) -> Path:
    """The coordinator's config: one round whose every phase closes at its count."""
    m = initial.size
    return fleet.write_coordinator(
        root / "coordinator",
        port=port,
        length=m,
        initial=initial,
        overrides={
            "model": {"id": "bench"},
            "masking": {"bound": 1.0, "n_max": max(100, n), "word_bits": word_bits},
            "pet": {
                "sum": {
                    "prob": p_sum,
                    "count_min": summers,
                    "count_max": summers,
                    "time_min_s": 0.0,
                    "time_max_s": 120.0,
                },
                "update": {
                    "prob": 1.0,
                    "count_min": n,
                    "count_max": n,
                    "time_min_s": 0.0,
                    "time_max_s": 600.0,
                },
                "sum2": {
                    "count_min": summers,
                    "count_max": summers,
                    "time_min_s": 0.0,
                    "time_max_s": 300.0,
                },
                "chunk_size": CHUNK,
                "max_rounds": 1,
                "failure_pause_s": 0.5,
            },
            "aggregation": {"backend": "auto"},
            # The privacy floor: 3 by default, 2 at the least (a round of 2 updaters).
            "privacy": {"min_updates": min(3, max(2, n))},
            "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
            "log": {"level": "info", "format": "text"},
        },
    )


async def _until_model(
    supervisor: Supervisor, coordinator: Child, watcher: ModelWatcher, http_port: int
) -> tuple[float, dict[str, Any]]:
    """When the round's model reached the watcher (900 s at most), and the coordinator's
    /status as first read."""
    status_info: dict[str, Any] = {}
    deadline = time.monotonic() + 900
    model_at: float | None = None
    while model_at is None:
        if coordinator.proc.poll() == 0:
            coordinator.expected_exit = True  # max_rounds = 1: it stops after the round
        supervisor.check()
        if time.monotonic() > deadline:
            raise MaskflError(f"the masked round did not finish; see {coordinator.log_path}")
        # /status answers {"ready": false} alone until the coordinator is ready: read it
        # once /readyz says 200, when it names the backend.
        if not status_info and await fetch_ready(http_port, 1.0):
            status_info = await fetch_status(http_port, 5.0) or {}
        if watcher.at is not None:
            model_at = watcher.at
        else:
            await asyncio.sleep(0.02)
    return model_at, status_info


def _masked_times(times: _Times, summer_ids: AbstractSet[str], model_at: float) -> dict[str, Any]:
    """Each phase's seconds, from what the participants saw, and the bytes they sent."""
    t0 = min(times.params)
    # A phase ends when the coordinator's dictionary first reaches a participant (the
    # last ones to see it may already be busy masking: one event loop runs them all).
    sums_at = min(times.sums)
    seeds_at = min(times.seeds)
    sum2_at = max(times.published.get(str(TopicKind.SUM2), [seeds_at]))
    updater_bytes = [b for d, b in times.bytes_sent.items() if d not in summer_ids]
    summer_bytes = [b for d, b in times.bytes_sent.items() if d in summer_ids]
    return {
        "seconds": {
            "sum": round(sums_at - t0, 4),
            "update": round(seeds_at - sums_at, 4),
            "sum2": round(sum2_at - seeds_at, 4),
            "unmask": round(model_at - sum2_at, 4),
            "total": round(model_at - t0, 4),
        },
        "bytes_per_updater": int(np.mean(updater_bytes)) if updater_bytes else 0,
        "bytes_per_summer": int(np.mean(summer_bytes)) if summer_bytes else 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maskfl.tools.bench_round plain-aggregator ...`` (used by the benchmark)."""
    parser = argparse.ArgumentParser(prog="maskfl.tools.bench_round")
    sub = parser.add_subparsers(dest="command", required=True)
    agg = sub.add_parser("plain-aggregator")
    agg.add_argument("--config", type=Path, required=True)
    agg.add_argument("--n", type=int, required=True)
    agg.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(plain_aggregator(args.config, args.n, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
