"""``maskfl-bench aggregate``: how fast the coordinator adds masked updates, per backend.

For N updates of M words it times what the coordinator does in the update
phase: ``acc.add(message_bytes)`` N times (the words read in place from bytes,
as they arrive in a message), then one ``acc.total()`` (on a GPU: the final
reduction and the single copy back). Reported: elements/s (median and best of
``--repeat`` passes), GB/s of input, the unmask + decode time, and memory: the
host memory the accumulator itself allocates (tracemalloc), on a GPU its pinned
staging and device buffers, and the peak RSS of the whole benchmark process so far (which
includes the input pool).

The inputs are a pool of distinct ``bytes`` objects cut at different offsets
from one random block, so generating them costs one RNG call, yet the pool
(``--pool-mb``, default 512 MB, far beyond the last-level cache) makes every
add read its input from DRAM as a real coordinator would; with N larger than
the pool the inputs are reused round-robin. ``--input array`` passes numpy
arrays instead; the OS may back those with huge pages, which stream from DRAM
faster than the 4 KiB pages of ``bytes`` objects, so compare like with like.
Without a usable GPU the CuPy rows say ``"no device"`` (and why) instead of a
number.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.aggregator_gpu import (
    Backend,
    BackendName,
    BackendUnavailableError,
    CupyAccumulator,
    CupyBackend,
    select_backend,
)
from maskfl.protocol.masking import MaskConfig
from maskfl.tools._benchargs import count
from maskfl.tools._help import plain

NO_DEVICE = "no device"
SWEEP_N = (100, 1000)
SWEEP_M = (100_000, 1_000_000)
SWEEP_WORD_BITS = (32, 64)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``aggregate`` on the ``maskfl-bench`` subcommand parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "aggregate",
        help="coordinator aggregation throughput per backend (numpy, CuPy)",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        choices=[*(b.value for b in BackendName), "all"],
        default="all",
        help="backend to measure; 'all' measures numpy and cupy (default: all)",
    )
    parser.add_argument("--n", type=count, default=100, help="updates per round (default 100)")
    parser.add_argument("--m", type=count, default=1_000_000, help="words per update (default 1e6)")
    parser.add_argument(
        "--word-bits", type=int, choices=[32, 64], default=64, help="word size (default 64)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="ignore --n/--m/--word-bits; run N in {100, 1000} x M in {1e5, 1e6} x w in {32, 64}",
    )
    parser.add_argument("--repeat", type=count, default=3, help="timed passes (median reported)")
    parser.add_argument(
        "--pool-mb",
        type=count,
        default=512,
        help="memory for distinct input vectors, MB (default 512)",
    )
    parser.add_argument(
        "--input",
        choices=["bytes", "array"],
        default="bytes",
        help="updates as bytes objects, as they arrive in messages (default), or as numpy "
        "arrays (which the OS may back with huge pages: faster to stream)",
    )
    parser.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    return parser


def _input_pool(n: int, m: int, word_bits: int, pool_bytes: int, kind: str) -> list[Any]:
    """Distinct updates: slices of one random block at different offsets, each copied."""
    itemsize = word_bits // 8
    distinct = max(1, min(n, pool_bytes // (m * itemsize)))
    dtype = np.uint32 if word_bits == 32 else np.uint64
    rng = np.random.default_rng(20_240_611)
    block = rng.integers(0, np.iinfo(dtype).max, size=m + distinct, dtype=dtype, endpoint=True)
    if kind == "array":
        return [block[k : k + m].copy() for k in range(distinct)]
    return [block[k : k + m].tobytes() for k in range(distinct)]


def _backends(choice: str) -> list[tuple[str, Backend | None, str]]:
    """(requested name, backend or None, why) for each backend to measure."""
    names = [BackendName.NUMPY.value, BackendName.CUPY.value] if choice == "all" else [choice]
    out: list[tuple[str, Backend | None, str]] = []
    for name in names:
        if name == BackendName.CUPY.value:
            try:
                out.append((name, CupyBackend.open(), ""))
            except BackendUnavailableError as exc:
                out.append((name, None, str(exc)))
        else:
            out.append((name, select_backend(name), ""))
    return out


def _one_pass(backend: Backend, pool: list[Any], n: int, m: int, word_bits: int) -> float:
    acc = backend.accumulator(m, word_bits)
    k = len(pool)
    start = time.perf_counter()
    for i in range(n):
        acc.add(pool[i % k])
    acc.total()
    return time.perf_counter() - start


def _unmask_decode_seconds(backend: Backend, pool: list[Any], n: int, m: int, bits: int) -> float:
    """Seconds for subtract_mask + decode (a full M + 1 decode, garbage values: timing only)."""
    acc = backend.accumulator(m, bits)
    for i in range(min(n, len(pool))):
        acc.add(pool[i])
    cfg = MaskConfig(bound=1.0, n_max=max(n, 1), word_bits=bits)  # type: ignore[arg-type]
    start = time.perf_counter()
    acc.subtract_mask(pool[0])
    acc.decode(cfg)
    return time.perf_counter() - start


def _memory(backend: Backend, pool: list[Any], m: int, word_bits: int) -> dict[str, int]:
    """What one accumulator holds: host allocations (tracemalloc), pinned and device bytes."""
    gc.collect()
    tracemalloc.start()
    try:
        acc = backend.accumulator(m, word_bits)
        for vector in pool[:4]:
            acc.add(vector)
        acc.total()
        out = {"host_peak_alloc_bytes": tracemalloc.get_traced_memory()[1]}
    finally:
        tracemalloc.stop()
    if isinstance(acc, CupyAccumulator):
        import cupy

        out["pinned_staging_bytes"] = acc.pinned_bytes
        out["device_accumulator_bytes"] = acc.device_bytes
        out["device_pool_bytes"] = int(cupy.get_default_memory_pool().total_bytes())
    return out


def measure(
    requested: str,
    backend: Backend | None,
    why: str,
    *,
    n: int,
    m: int,
    word_bits: int,
    repeat: int,
    pool: list[Any],
) -> dict[str, Any]:
    """One row of the result table."""
    row: dict[str, Any] = {"backend": requested, "n": n, "m": m, "word_bits": word_bits}
    if backend is None:
        row.update(
            elements_per_s=NO_DEVICE,
            elements_per_s_best=NO_DEVICE,
            gb_per_s_in=NO_DEVICE,
            seconds=NO_DEVICE,
            unmask_decode_s=NO_DEVICE,
            reason=why,
        )
        return row
    _one_pass(backend, pool, min(n, 4), m, word_bits)  # warm-up: allocation, kernel load
    times = [_one_pass(backend, pool, n, m, word_bits) for _ in range(repeat)]
    seconds = statistics.median(times)
    elements = n * m
    row.update(
        selected=backend.name.value,
        device=backend.description,
        elements=elements,
        seconds=seconds,
        seconds_all=times,
        elements_per_s=elements / seconds,
        gb_per_s_in=elements * (word_bits // 8) / seconds / 1e9,
        elements_per_s_best=elements / min(times),
        unmask_decode_s=_unmask_decode_seconds(backend, pool, n, m, word_bits),
        distinct_inputs=len(pool),
        input_pool_bytes=sum(memoryview(p).nbytes for p in pool),
        **_memory(backend, pool, m, word_bits),
        process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (backend, N, M, w) asked for; returns the JSON-ready document."""
    if args.sweep:
        cases = [(n, m, w) for w in SWEEP_WORD_BITS for m in SWEEP_M for n in SWEEP_N]
    else:
        cases = [(args.n, args.m, args.word_bits)]
    backends = _backends(args.backend)
    rows = []
    for n, m, word_bits in cases:
        pool = _input_pool(n, m, word_bits, args.pool_mb << 20, args.input)
        for requested, backend, why in backends:
            print(
                f"maskfl-bench aggregate: {requested} N={n} M={m} w={word_bits}",
                file=sys.stderr,
            )
            rows.append(
                measure(
                    requested,
                    backend,
                    why,
                    n=n,
                    m=m,
                    word_bits=word_bits,
                    repeat=args.repeat,
                    pool=pool,
                )
            )
        del pool
        gc.collect()
    return {
        "what": "acc.add(update) N times + one acc.total(); median (and best) of --repeat passes",
        "repeat": args.repeat,
        "input": args.input,
        "pool_mb": args.pool_mb,
        "rows": rows,
    }
