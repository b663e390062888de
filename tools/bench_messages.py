"""``maskfl-bench messages``: encoding, verifying and chunking an Update on one core.

For each vector length M and word size (32, 64) it times, on a message of
M + 1 masked words with one sealed seed:

* ``encode``: ``encode_message`` (SHA-256 of the body, one Ed25519 signature,
  one copy into the message);
* ``decode_verify``: ``decode_message`` (size checks, one Ed25519 verification
  of the header, SHA-256 of the body, parse, zero-copy view of the words);
* ``sha256``: hashlib SHA-256 of the body alone, the floor of the above;
* ``chunk``: ``split_payload`` at the default 256 KiB (a quarter of the message
  when that is smaller) plus reassembly: two SHA-256 passes and three copies.

Rates are message bytes per second (GB/s = 1e9). The target is verifying an
8 MB update (M = 1e6, 64-bit words) at >= 1 GB/s; ``target_met`` says whether
this machine reaches it. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from nacl.signing import SigningKey

from maskfl.protocol.chunking import DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, split_payload
from maskfl.protocol.identity import issue_certificate
from maskfl.protocol.ids import Role
from maskfl.protocol.masking import Words
from maskfl.protocol.messages import (
    BODY_OFFSET,
    Update,
    decode_message,
    encode_message,
)
from maskfl.protocol.reassembly import Reassembler

DEFAULT_SIZES = (100_000, 1_000_000)
TARGET_VERIFY_GBPS = 1.0
TARGET_SIZE = (1_000_000, 64)


def add_parser(subparsers: Any) -> None:
    """Register ``messages`` on the ``maskfl-bench`` command line."""
    parser = subparsers.add_parser("messages", help="encode / verify / chunk an Update")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=list(DEFAULT_SIZES),
        help="comma-separated vector lengths M (default 1e5,1e6)",
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per measurement")
    parser.add_argument("--json", help="write the JSON here instead of stdout")


def _time(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"best_s": min(samples), "median_s": statistics.median(samples)}


def _rate(fn: Callable[[], object], nbytes: int, repeats: int) -> dict[str, float]:
    t = _time(fn, repeats)
    return {
        **t,
        "gbps_median": nbytes / t["median_s"] / 1e9,
        "gbps_best": nbytes / t["best_s"] / 1e9,
    }


def _update(m: int, word_bits: int) -> tuple[Update, SigningKey]:
    ca = SigningKey(bytes([0xCA]) * 32)
    key = SigningKey(bytes([0xD1]) * 32)
    cert = issue_certificate(
        ca,
        fleet="bench",
        serial=1,
        subject="device-1",
        role=Role.DEVICE,
        public_key=bytes(key.verify_key),
        not_before=0,
        not_after=2**40,
    )
    rng = np.random.default_rng(0)
    dtype = np.uint32 if word_bits == 32 else np.uint64
    words = rng.integers(0, np.iinfo(dtype).max, size=m + 1, dtype=dtype, endpoint=True)
    return Update(cert, {bytes(32): bytes(80)}, cast(Words, words)), key


def measure(m: int, word_bits: int, repeats: int) -> dict[str, Any]:
    body, key = _update(m, word_bits)
    raw = encode_message(body, fleet="bench", round_id=1, signing_key=key)
    size = len(raw)

    # small messages are split into 4 so that there is something to reassemble
    chunk_size = min(DEFAULT_CHUNK_SIZE, max(MIN_CHUNK_SIZE, size // 4))

    def chunk_round_trip() -> bytes | None:
        r: Reassembler[None] = Reassembler(4, size, 60.0)
        out = None
        for frame in split_payload(raw, chunk_size):
            out = r.feed("t", frame, 0.0)
        return None if out is None else out.payload

    view = memoryview(raw)[BODY_OFFSET:]
    return {
        "M": m,
        "word_bits": word_bits,
        "message_bytes": size,
        "chunk_size": chunk_size,
        "encode": _rate(
            lambda: encode_message(body, fleet="bench", round_id=1, signing_key=key),
            size,
            repeats,
        ),
        "decode_verify": _rate(lambda: decode_message(raw, max_size=size), size, repeats),
        "sha256": _rate(lambda: hashlib.sha256(view).digest(), size, repeats),
        "chunk": _rate(chunk_round_trip, size, max(3, repeats // 3)),
    }


def run(args: argparse.Namespace | Sequence[int] = DEFAULT_SIZES) -> dict[str, Any]:
    """Measure every size in ``args`` (a list of M, or the parsed command line)."""
    if isinstance(args, argparse.Namespace):
        sizes, repeats = list(args.sizes), int(args.repeats)
    else:
        sizes, repeats = list(args), 9
    results = [measure(m, bits, repeats) for m in sizes for bits in (32, 64)]
    target = next(
        (r for r in results if (r["M"], r["word_bits"]) == TARGET_SIZE),
        None,
    )
    return {
        "results": results,
        "target": {
            "what": "decode_verify of an 8 MB Update (M=1e6, 64-bit words), median",
            "gbps_required": TARGET_VERIFY_GBPS,
            "gbps_measured": None if target is None else target["decode_verify"]["gbps_median"],
            "target_met": None
            if target is None
            else target["decode_verify"]["gbps_median"] >= TARGET_VERIFY_GBPS,
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
