"""``maskfl-bench protocol``: throughput of the masking arithmetic on one core.

For each vector length M and word size (32, 64) it measures, in words per second:

* ``mask``: expanding a seed's ChaCha20 mask and adding it into encoded words
  (``add_mask``; encoding excluded);
* ``encode_and_mask``: ``mask_update``, encoding fused with masking (what an
  updater does with its delta), and ``encode`` alone;
* ``aggregate_mask``: a summer expanding and summing the masks of several seeds;
* ``unmask``: subtracting the aggregate mask from the masked sum;
* ``add``: the aggregation-side modular add of one masked vector.

Plus the reference points (whole-stream ``mask_stream`` and PyNaCl's
``randombytes_buf_deterministic``) and a sweep of the keystream chunk size,
which is how ``DEFAULT_CHUNK_BYTES`` was chosen. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import nacl.bindings
import numpy as np

from maskfl.protocol.masking import (
    DEFAULT_CHUNK_BYTES,
    MaskConfig,
    WordBits,
    Words,
    add_mask,
    add_words,
    aggregate_mask,
    encode_update,
    mask_stream,
    mask_update,
    unmask,
)

DEFAULT_SIZES = (100_000, 1_000_000)
CHUNK_SWEEP = (16 * 1024, 32 * 1024, 64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024)
TARGETS = {"mask_words_per_s": 0.5e9, "add_words_per_s": 2e9}
WORD_BITS: tuple[WordBits, ...] = (32, 64)


def add_parser(subparsers: Any) -> None:
    """Register ``protocol`` on the ``maskfl-bench`` command line."""
    parser = subparsers.add_parser("protocol", help="masking, unmasking and add throughput")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=list(DEFAULT_SIZES),
        help="comma-separated vector lengths M (default 1e5,1e6)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per aggregate mask")
    parser.add_argument("--no-sweep", action="store_true", help="skip the chunk-size sweep")
    parser.add_argument("--json", help="write the JSON here instead of stdout")


def _time(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Best and median wall time, and best CPU time of this thread.

    On a shared machine the wall time of a run includes time the scheduler gave
    to other processes; the thread's CPU time does not, so ``cpu_best_s`` is the
    better measure of what one core can do (cache interference still counts).
    """
    fn()  # warm up: page in buffers, build cipher contexts
    wall, cpu = [], []
    for _ in range(repeats):
        cpu_start = time.thread_time()
        start = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - cpu_start)
    return {"best_s": min(wall), "median_s": statistics.median(wall), "cpu_best_s": min(cpu)}


def _rate(fn: Callable[[], object], words: int, repeats: int) -> dict[str, float]:
    timing = _time(fn, repeats)
    return {
        "words_per_s": words / timing["best_s"],
        "words_per_s_median": words / timing["median_s"],
        "words_per_s_cpu": words / timing["cpu_best_s"],
        **timing,
    }


def _sizes_of(args: argparse.Namespace | Sequence[int]) -> tuple[list[int], int, int, bool]:
    if isinstance(args, argparse.Namespace):
        return list(args.sizes), args.repeats, args.seeds, not args.no_sweep
    return [int(m) for m in args], 7, 8, True


def _one_size(m: int, bits: WordBits, repeats: int, n_seeds: int) -> dict[str, Any]:
    rng = np.random.default_rng(m + bits)
    cfg = MaskConfig(bound=1.0, n_max=1000, word_bits=bits)
    delta = rng.normal(0.0, 0.1, m).astype(np.float32)
    seed = rng.bytes(32)
    seeds = [rng.bytes(32) for _ in range(n_seeds)]
    encoded = encode_update(delta, 0.5, cfg)
    n = m + 1
    masked: Words = encoded.copy()
    acc: Words = np.zeros(n, dtype=cfg.dtype)
    agg = aggregate_mask(seeds, n, bits)
    return {
        "mask": _rate(lambda: add_mask(masked, seed), n, repeats),
        "encode_and_mask": _rate(lambda: mask_update(delta, 0.5, seed, cfg), n, repeats),
        "encode": _rate(lambda: encode_update(delta, 0.5, cfg), n, repeats),
        "aggregate_mask": {
            "seeds": n_seeds,
            **_rate(lambda: aggregate_mask(seeds, n, bits), n * n_seeds, repeats),
        },
        "unmask": _rate(lambda: unmask(masked, agg), n, repeats),
        "add": _rate(lambda: add_words(acc, masked), n, repeats),
        "reference_mask_stream": _rate(lambda: mask_stream(seed, n, bits), n, repeats),
        "reference_pynacl": _rate(
            lambda: nacl.bindings.randombytes_buf_deterministic(n * bits // 8, seed),
            n,
            repeats,
        ),
    }


def _sweep(m: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    delta = rng.normal(0.0, 0.1, m).astype(np.float32)
    seed = rng.bytes(32)
    out: dict[str, Any] = {}
    for bits in WORD_BITS:
        cfg = MaskConfig(bound=1.0, n_max=1000, word_bits=bits)
        target: Words = encode_update(delta, 0.5, cfg)
        rows = []
        for chunk in CHUNK_SWEEP:
            mask = _rate(partial(add_mask, target, seed, chunk_bytes=chunk), m + 1, repeats)
            fused = _rate(
                partial(mask_update, delta, 0.5, seed, cfg, chunk_bytes=chunk), m + 1, repeats
            )
            rows.append(
                {
                    "chunk_bytes": chunk,
                    "mask_words_per_s": mask["words_per_s"],
                    "encode_and_mask_words_per_s": fused["words_per_s"],
                }
            )
        out[f"u{bits}"] = rows
    return out


def run(args: argparse.Namespace | Sequence[int]) -> dict[str, Any]:
    """Measure; ``args`` is the parsed command line or just the list of sizes M."""
    sizes, repeats, n_seeds, sweep = _sizes_of(args)
    results: dict[str, Any] = {
        "unit": "words per second on one core: best wall time of the repeats "
        "(words_per_s), median (words_per_s_median), and by thread CPU time "
        "(words_per_s_cpu, immune to other processes on a shared machine)",
        "default_chunk_bytes": DEFAULT_CHUNK_BYTES,
        "targets": TARGETS,
        "sizes": {},
    }
    for m in sizes:
        per_bits = {f"u{bits}": _one_size(m, bits, repeats, n_seeds) for bits in WORD_BITS}
        results["sizes"][str(m)] = per_bits
    if sweep and sizes:
        results["chunk_sweep"] = {"m": max(sizes), **_sweep(max(sizes), max(3, repeats // 2))}
    results["summary"] = _summary(results["sizes"])
    return results


def _summary(sizes: dict[str, Any]) -> dict[str, Any]:
    """Giga-words per second at a glance (wall and CPU time), and whether targets are met.

    The targets are judged on CPU time: they are about what one core can do.
    """
    summary: dict[str, Any] = {}
    for m, per_bits in sizes.items():
        for bits, rows in per_bits.items():
            timed = {
                name: row
                for name, row in rows.items()
                if isinstance(row, dict) and "words_per_s" in row
            }
            summary[f"M={m} {bits}"] = {
                "g_words_per_s": {k: round(r["words_per_s"] / 1e9, 3) for k, r in timed.items()},
                "g_words_per_s_cpu": {
                    k: round(r["words_per_s_cpu"] / 1e9, 3) for k, r in timed.items()
                },
                "meets_mask_target": rows["mask"]["words_per_s_cpu"] >= TARGETS["mask_words_per_s"],
                "meets_add_target": rows["add"]["words_per_s_cpu"] >= TARGETS["add_words_per_s"],
            }
    return summary
