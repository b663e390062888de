"""Known answers for every computation a maskfl participant must reproduce (docs/vectors/).

``python -m tests.protocol.spec_vectors`` rewrites the JSON files in docs/vectors/
from the reference implementation; ``--check`` compares instead (exit 1 on a
difference). tests/protocol/test_spec_vectors.py loads the files and checks the
code against them, so docs/protocol.md, the vectors and the code cannot drift.

Conventions in every file: byte strings are lowercase hex; integers that may
exceed 2^53 (tickets, thresholds, words, scales) are decimal *strings*; floats are
JSON numbers written with Python's shortest round-trip repr, with the exact
binary64 value beside them as ``float.hex()`` where exactness matters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import nacl.bindings
import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from maskfl.broker_coordinator.config import OptimizerConfig, OptimizerKind
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.protocol.chunking import split_payload
from maskfl.protocol.dp import aggregate_noise_bound, updater_variance
from maskfl.protocol.masking import (
    NO_EVALUATION,
    EvalCounts,
    MaskConfig,
    aggregate_mask,
    decode_aggregate,
    decode_evaluation,
    encode_update,
    error_bound,
    mask_stream,
    mask_update,
    unmask,
    update_words,
)
from maskfl.protocol.messages import decode_message, weights_digest
from maskfl.protocol.sortition import (
    Task,
    group_of,
    next_round_seed,
    probabilities_for_targets,
    select_task,
    threshold,
    ticket,
)
from tests.protocol import wire_samples

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "vectors"
SHARED_MASK_STREAM = Path(__file__).parent / "vectors" / "mask_stream.json"


def _key(n: int) -> bytes:
    """A fixed Ed25519 public key: that of the 32-byte seed ``n`` repeated."""
    return bytes(SigningKey(bytes([n]) * 32).verify_key)


def _f(x: float) -> dict[str, Any]:
    return {"value": float(x), "hex": float(x).hex()}


# --- seed chain -------------------------------------------------------------------------


def seed_chain() -> dict[str, Any]:
    initial = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    digest = weights_digest(initial)
    cases = []
    prev = bytes(32)
    for rid in (1, 2, 3):
        model = digest if rid == 1 else hashlib.sha256(b"model %d" % rid).digest()
        seed = next_round_seed(prev, model, rid)
        cases.append(
            {
                "round_id": rid,
                "previous_seed": prev.hex(),
                "model_digest": model.hex(),
                "seed": seed.hex(),
            }
        )
        prev = seed
    return {
        "about": "seed_r = BLAKE2b(digest_size=32, person=b'maskfl/seed/v1', "
        "previous_seed(32) || model_digest(32) || u64le(r)); docs/protocol.md §3.2. "
        "model_digest = SHA-256 of the float32 little-endian weights (weights_digest).",
        "weights_digest": [
            {
                "weights_f32": [float(x) for x in initial],
                "weights_le_hex": initial.astype("<f4").tobytes().hex(),
                "digest": digest.hex(),
            }
        ],
        "chain": cases,
    }


# --- sortition --------------------------------------------------------------------------


def sortition() -> dict[str, Any]:
    seed = bytes(range(32))
    tickets = []
    for n in (0x01, 0x02, 0xD1, 0x51):
        pk = _key(n)
        for task in (Task.SUM, Task.UPDATE):
            h = hashlib.blake2b(digest_size=8, person=b"maskfl/ticket/v1")
            h.update(seed + task.value.encode() + pk)
            tickets.append(
                {
                    "seed": seed.hex(),
                    "task": task.value,
                    "public_key": pk.hex(),
                    "digest": h.digest().hex(),
                    "ticket": str(ticket(seed, task, pk)),
                }
            )
    thresholds = [
        {"p": _f(p), "threshold": str(threshold(p))}
        for p in (0.0, 1e-9, 0.125, 0.1, 1 / 3, 0.5, 0.9999999999999999, 1.0)
    ]
    select = []
    for n in range(1, 13):
        pk = _key(n)
        for p_sum, p_update in ((0.25, 0.5), (0.5, 1.0), (0.0, 1.0), (1.0, 1.0)):
            select.append(
                {
                    "seed": seed.hex(),
                    "public_key": pk.hex(),
                    "p_sum": _f(p_sum),
                    "p_update": _f(p_update),
                    "task": select_task(seed, pk, p_sum, p_update).value,
                }
            )
    groups = []
    for n in (0x01, 0x02, 0xD1, 0x51, 0x07):
        pk = _key(n)
        h = hashlib.blake2b(digest_size=8, person=b"maskfl/group/v1")
        h.update(seed + pk)
        for g in (1, 2, 3, 5):
            groups.append(
                {
                    "seed": seed.hex(),
                    "public_key": pk.hex(),
                    "groups": g,
                    "digest": h.digest().hex(),
                    "group": group_of(seed, pk, g),
                }
            )
    return {
        "about": "ticket = u64 little-endian of BLAKE2b(digest_size=8, "
        "person=b'maskfl/ticket/v1', seed(32) || ascii(task) || public_key(32)), task "
        "'sum' or 'update'; threshold(p) = floor(p * 2^64) with p clamped to [0, 1]; "
        "a device is a summer when its sum ticket < threshold(p_sum), else an updater "
        "when its update ticket < threshold(p_update), else neither (docs/protocol.md §4). "
        "Public keys are those of the Ed25519 seeds 01*32, 02*32, ... "
        "A summer's mask group = (u64 little-endian of BLAKE2b(digest_size=8, "
        "person=b'maskfl/group/v1', seed(32) || public_key(32))) mod groups (§4.4).",
        "tickets": tickets,
        "groups": groups,
        "thresholds": thresholds,
        "select_task": select,
    }


def probabilities() -> dict[str, Any]:
    cases = []
    for alive, s, u, r in (
        (0, 3, 10, 3),
        (1, 3, 10, 3),
        (2, 3, 10, 3),
        (4, 1, 3, 3),
        (4, 3, 10, 3),
        (6, 3, 10, 3),
        (10, 3, 20, 3),
        (10, 3, 5, 3),
        (13, 3, 10, 3),
        (20, 3, 10, 3),
        (100, 3, 10, 3),
        (1000, 5, 100, 3),
        (50, 0, 10, 3),
        (50, 3, 0, 0),
    ):
        p_sum, p_update = probabilities_for_targets(alive, s, u, r)
        cases.append(
            {
                "alive": alive,
                "target_summers": s,
                "target_updaters": u,
                "min_updaters": r,
                "p_sum": _f(p_sum),
                "p_update": _f(p_update),
            }
        )
    return {
        "about": "(p_sum, p_update) from the devices alive, the targets and the update "
        "phase's count_min (probabilities_for_targets; docs/protocol.md §4.3).",
        "cases": cases,
    }


# --- masking ----------------------------------------------------------------------------

_CONFIGS = ((1.0, 1000, 32), (1.0, 4, 32), (0.1, 100, 32), (2.5, 1000, 64), (1.0, 4, 64))


def _cfg_json(cfg: MaskConfig) -> dict[str, Any]:
    return {
        "bound": cfg.bound,
        "n_max": cfg.n_max,
        "word_bits": cfg.word_bits,
        "scale": str(cfg.scale),
        "offset": str(cfg.offset),
        "weight_scale": str(cfg.weight_scale),
        "resolution": _f(cfg.resolution),
        "eval_capacity": str(cfg.eval_capacity),
        "eval_max_examples": cfg.eval_max_examples,
        "loss_scale": str(cfg.loss_scale),
    }


def _words(words: np.ndarray) -> list[str]:
    return [str(int(w)) for w in words]


def masking() -> dict[str, Any]:
    configs = [_cfg_json(MaskConfig(b, n, w)) for b, n, w in _CONFIGS]  # type: ignore[arg-type]
    encode = []
    for bound, n_max, bits in _CONFIGS:
        cfg = MaskConfig(bound, n_max, bits)  # type: ignore[arg-type]
        s = float(cfg.scale)
        delta = np.array(
            [0.0, 0.25, -0.5, 1.0, -1.0, 3.0, -1e30, 0.1, 1e-7, 0.5 / s, 1.5 / s, -0.5 / s],
            dtype=np.float64,
        ).astype(np.float32)
        for weight in (1.0, 0.5, 0.123, 0.0):
            ev = EvalCounts(37, 29, 11.0625) if weight == 0.5 else NO_EVALUATION
            words = encode_update(delta, weight, cfg, evaluation=ev)
            encode.append(
                {
                    "config": [bound, n_max, bits],
                    "delta_f32": [float(x) for x in delta],
                    "delta_f32_le_hex": delta.astype("<f4").tobytes().hex(),
                    "weight": _f(weight),
                    "evaluation": [ev.examples, ev.correct, _f(ev.loss_sum)],
                    "words": _words(words),
                }
            )
    # The mask of one seed added to encoded words (what an updater sends).
    seed = bytes(range(32))
    masked = []
    for bound, n_max, bits in _CONFIGS[:2] + _CONFIGS[3:4]:
        cfg = MaskConfig(bound, n_max, bits)  # type: ignore[arg-type]
        delta = np.array([0.25, -0.75, 0.0], dtype=np.float32)
        masked.append(
            {
                "config": [bound, n_max, bits],
                "delta_f32": [float(x) for x in delta],
                "weight": _f(0.75),
                "seed": seed.hex(),
                "evaluation": [20, 15, _f(6.5)],
                "mask": _words(mask_stream(seed, update_words(3), bits)),
                "masked_words": _words(
                    mask_update(delta, 0.75, seed, cfg, evaluation=EvalCounts(20, 15, 6.5))
                ),
            }
        )
    # Mask groups: one seed per group, the mask is the sum of their streams (§7.5).
    cfg = MaskConfig(*_CONFIGS[0])  # type: ignore[arg-type]
    group_seeds = [bytes([0x10 + j]) * 32 for j in range(3)]
    delta = np.array([0.25, -0.75, 0.0], dtype=np.float32)
    masked_groups = {
        "config": list(_CONFIGS[0]),
        "delta_f32": [float(x) for x in delta],
        "weight": _f(0.75),
        "evaluation": [20, 15, _f(6.5)],
        "seeds": [sd.hex() for sd in group_seeds],
        "masks": [_words(mask_stream(sd, update_words(3), cfg.word_bits)) for sd in group_seeds],
        "masked_words": _words(
            mask_update(delta, 0.75, group_seeds, cfg, evaluation=EvalCounts(20, 15, 6.5))
        ),
    }
    aggregate = []
    seeds = [bytes([i]) * 32 for i in (1, 2, 3)]
    for bits in (32, 64):
        aggregate.append(
            {
                "word_bits": bits,
                "seeds": [s.hex() for s in seeds],
                "n_words": 5,
                "aggregate_mask": _words(aggregate_mask(seeds, 5, bits)),  # type: ignore[arg-type]
            }
        )
    decode = []
    rng = np.random.default_rng(11)
    for bound, n_max, bits in _CONFIGS:
        cfg = MaskConfig(bound, n_max, bits)  # type: ignore[arg-type]
        n = min(3, n_max)
        deltas = [rng.uniform(-1.5 * bound, 1.5 * bound, 4).astype(np.float32) for _ in range(n)]
        weights = [float(w) for w in rng.uniform(0.1, 1.0, n).round(3)]
        evals = [EvalCounts(10 + k, 5 + k, 2.5 * k) for k in range(n)]
        total = np.zeros(update_words(4), dtype=cfg.dtype)
        for d, a, ev in zip(deltas, weights, evals, strict=True):
            total += encode_update(d, a, cfg, evaluation=ev)
        values, weight_sum = decode_aggregate(total, n, cfg)
        fleet = decode_evaluation(total, n, cfg)
        decode.append(
            {
                "config": [bound, n_max, bits],
                "deltas_f32": [[float(x) for x in d] for d in deltas],
                "weights": weights,
                "sum_of_words": _words(total),
                "n": n,
                "weighted_sum": [_f(v) for v in values],
                "weight_sum": _f(weight_sum),
                "mean": [_f(v / weight_sum) for v in values],
                "error_bound": _f(error_bound(n, weight_sum, cfg)),
                "evaluations": [[e.examples, e.correct, _f(e.loss_sum)] for e in evals],
                "fleet_evaluation": [fleet.examples, fleet.correct, _f(fleet.loss_sum)],
            }
        )
    bounds = []
    for bound, n_max, bits in _CONFIGS:
        cfg = MaskConfig(bound, n_max, bits)  # type: ignore[arg-type]
        for n, w in ((1, 1.0), (3, 1.5), (n_max, n_max * 0.5)):
            bounds.append(
                {
                    "config": [bound, n_max, bits],
                    "n": n,
                    "weight_sum": _f(w),
                    "error_bound": _f(error_bound(n, w, cfg)),
                }
            )
    tolerance = []
    for bound, n_max, tol in (
        (1.0, 1000, 1e-5),
        (1.0, 1000, 1e-6),
        (1.0, 100, 1e-6),
        (1.0, 1000, 1e-7),  # 32 bits give 4.66e-7: 64
        (1.0, 3_000_000, 1e-5),  # 32 bits give 1.4e-3: 64
    ):
        tolerance.append(
            {
                "bound": bound,
                "n_max": n_max,
                "tolerance": tol,
                "word_bits": MaskConfig.for_tolerance(bound, n_max, tol).word_bits,
            }
        )
    dp = []
    for z, clip, n_min, n_max, m, bits in (
        (1.0, 1.0, 3, 1000, 4810, 32),
        (0.5, 2.0, 5, 100, 7, 32),
    ):
        noise = aggregate_noise_bound(z, clip, n_min, n_max, m)
        cfg = MaskConfig(1.0, n_max, bits, noise)  # type: ignore[arg-type]
        shares = np.array([-3, 0, 7, -(2**20), 2**20, 1, -1][: min(m, 7)], dtype=np.int64)
        delta = np.linspace(-0.5, 0.5, shares.size).astype(np.float32)
        words = encode_update(delta, 1.0, cfg, noise=shares)
        dp.append(
            {
                "noise_multiplier": z,
                "clip_norm": clip,
                "min_updates": n_min,
                "n_max": n_max,
                "elements": m,
                "noise_bound": _f(noise),
                "config": [1.0, n_max, bits],
                "scale": str(cfg.scale),
                "offset": str(cfg.offset),
                "noise_variance": str(updater_variance(z, clip, cfg.scale, n_min)),
                "word_bits_auto_1e-6": MaskConfig.for_tolerance(1.0, n_max, 1e-6, noise).word_bits,
                "delta": [_f(float(x)) for x in delta],
                "shares": [int(x) for x in shares],
                "words": [str(int(w)) for w in words],
            }
        )
    return {
        "about": "Fixed-point encoding, the weight word, masks, decoding and the error "
        "bound (docs/protocol.md §7). config = [bound B, n_max, word bits w]. Words are "
        "decimal strings; an encoding of M elements has M + 4 words: the elements, the "
        "weight word, then the evaluation words [examples, correct, loss units] "
        "(evaluation = [examples, correct, summed loss]). dp: distributed DP "
        "(§7.9): the noise bound T and the scale it leaves, the per-updater variance v, "
        "and an encoding with given noise shares added (the element words only).",
        "configs": configs,
        "encode": encode,
        "mask_update": masked,
        "mask_update_groups": masked_groups,
        "aggregate_mask": aggregate,
        "decode": decode,
        "error_bound": bounds,
        "word_size_auto": tolerance,
        "dp": dp,
    }


# --- sealed seeds -----------------------------------------------------------------------


def sealed_seed() -> dict[str, Any]:
    recipient = PrivateKey(bytes([0x42]) * 32)
    sender = PrivateKey(bytes([0x43]) * 32)
    seed = bytes(range(100, 132))
    rpk, epk = bytes(recipient.public_key), bytes(sender.public_key)
    nonce = hashlib.blake2b(epk + rpk, digest_size=24).digest()
    boxed = nacl.bindings.crypto_box(seed, nonce, rpk, bytes(sender))
    sealed = epk + boxed
    tampered = bytearray(sealed)
    tampered[40] ^= 1
    return {
        "about": "libsodium crypto_box_seal: sealed = epk || crypto_box(seed, "
        "nonce = BLAKE2b-192(epk || recipient_pk), recipient_pk, esk); 80 bytes. "
        "A summer opens it with crypto_box_seal_open and its ephemeral X25519 key "
        "(docs/protocol.md §6.3).",
        "cases": [
            {
                "recipient_sk": bytes(recipient).hex(),
                "recipient_pk": rpk.hex(),
                "sender_ephemeral_sk": bytes(sender).hex(),
                "sealed": sealed.hex(),
                "opens": True,
                "seed": seed.hex(),
            },
            {
                "recipient_sk": bytes(recipient).hex(),
                "recipient_pk": rpk.hex(),
                "sealed": bytes(tampered).hex(),
                "opens": False,
            },
        ],
    }


# --- messages and chunks ----------------------------------------------------------------


def messages() -> dict[str, Any]:
    vectors = wire_samples.vectors()
    out: dict[str, Any] = {}
    for name, raw in vectors.items():
        entry: dict[str, Any] = {"hex": raw.hex()}
        if name.startswith("message_"):
            signed = decode_message(raw, max_size=len(raw))
            entry["type"] = int(signed.header.message_type)
            entry["sender"] = signed.header.sender.hex()
            entry["digest"] = signed.digest.hex()
            entry["body_digest"] = signed.header.body_digest.hex()
        out[name] = entry
    update = vectors["message_update"]
    bad_sig = bytearray(update)
    bad_sig[160] ^= 1
    bad_body = bytearray(update)
    bad_body[-1] ^= 1
    bad_magic = bytearray(update)
    bad_magic[0] = 0
    invalid = [
        {"what": "signature byte flipped", "hex": bytes(bad_sig).hex(), "reason": "bad_signature"},
        {"what": "last body byte flipped", "hex": bytes(bad_body).hex(), "reason": "bad_signature"},
        {"what": "bad magic", "hex": bytes(bad_magic).hex(), "reason": "malformed"},
        {"what": "one byte cut", "hex": update[:-1].hex(), "reason": "wrong_length"},
        {"what": "one byte appended", "hex": (update + b"\0").hex(), "reason": "wrong_length"},
        {
            "what": "larger than the receiver's limit (max_size = 507)",
            "hex": update.hex(),
            "max_size": len(update) - 1,
            "reason": "oversize",
        },
    ]
    return {
        "about": "Every message type signed with the fixed keys of docs/wire-format.md §7 "
        "(hex = the exact bytes); digest = SHA-256(bytes[0,152)) names the message in "
        "receipts and seed dictionaries; 'invalid' lists damaged copies and the reason a "
        "receiver gives (docs/wire-format.md §4 Receiving).",
        "ca_public_key": wire_samples.CA_PUBLIC.hex(),
        "now": wire_samples.NOW,
        "vectors": out,
        "invalid": invalid,
    }


def chunking() -> dict[str, Any]:
    cases = []
    for total, chunk in ((100, 84), (100, 100), (200, 64), (1000, 300)):
        payload = bytes(i % 256 for i in range(total))
        frames = split_payload(payload, chunk)
        cases.append(
            {
                "payload": payload.hex(),
                "chunk_size": chunk,
                "frames": [f.hex() for f in frames],
            }
        )
    return {
        "about": "A payload longer than chunk_size becomes frames of at most chunk_size "
        "bytes: 44-byte header (MFLC, version 1, 3 zero bytes, SHA-256(payload)[:16], "
        "u64 total, u32 part = chunk_size - 44, u32 index, u32 count) + data "
        "(docs/wire-format.md §5). A payload that fits is sent as it is (one 'frame' "
        "equal to the payload).",
        "cases": cases,
    }


# --- optimizer --------------------------------------------------------------------------


def optimizer() -> dict[str, Any]:
    weights = np.array([0.5, -1.0, 0.0, 2.0], dtype=np.float32)
    deltas = [
        np.array([0.1, -0.2, 0.0, 0.05], dtype=np.float64),
        np.array([-0.05, 0.1, 0.3, 0.0], dtype=np.float64),
    ]
    cases = []
    for kind, extra in (
        (OptimizerKind.FEDAVG, {"lr": 1.0}),
        (OptimizerKind.FEDAVG, {"lr": 0.5}),
        (OptimizerKind.FEDAVGM, {"lr": 1.0, "momentum": 0.9}),
        (OptimizerKind.FEDADAM, {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}),
    ):
        opt = ServerOptimizer(OptimizerConfig(kind=kind, **extra))
        w = weights
        steps = []
        for d in deltas:
            w = opt.step(w, d)
            steps.append(
                {"mean_delta": [float(x) for x in d], "weights_f32": [float(x) for x in w]}
            )
        cases.append(
            {
                "kind": kind.value,
                "params": extra,
                "initial_weights_f32": [float(x) for x in weights],
                "steps": steps,
            }
        )
    return {
        "about": "The server step from the mean delta (float64) to the next float32 weights; "
        "state (v, m) starts at zero and carries over steps (docs/protocol.md §8).",
        "cases": cases,
    }


# --- the worked example of docs/protocol.md §13 --------------------------------------------


def worked_example() -> dict[str, Any]:
    cfg = MaskConfig(1.0, 4, 32)
    deltas = [
        np.array([0.25, -2.0], dtype=np.float32),
        np.array([-0.5, 0.125], dtype=np.float32),
        np.array([0.75, 0.5], dtype=np.float32),
    ]
    weights = [0.5, 1.0, 0.25]
    seeds = [bytes([0x10 + i]) * 32 for i in range(3)]
    evals = [EvalCounts(10, 7, 4.5), EvalCounts(5, 2, 3.25), NO_EVALUATION]
    n_words = update_words(2)
    encoded, masks, masked = [], [], []
    total = np.zeros(n_words, dtype=np.uint32)
    for d, a, s, ev in zip(deltas, weights, seeds, evals, strict=True):
        e = encode_update(d, a, cfg, evaluation=ev)
        m = mask_stream(s, n_words, 32)
        encoded.append(_words(e))
        masks.append(_words(m))
        mw = mask_update(d, a, s, cfg, evaluation=ev)
        masked.append(_words(mw))
        total += mw
    agg = aggregate_mask(seeds, n_words, 32)
    plain = unmask(total, agg)
    values, weight_sum = decode_aggregate(plain, 3, cfg)
    fleet = decode_evaluation(plain, 3, cfg)
    mean = values / weight_sum
    model = np.array([0.5, -0.5], dtype=np.float32)
    opt = ServerOptimizer(OptimizerConfig(kind=OptimizerKind.FEDAVG, lr=1.0))
    new = opt.step(model, mean)
    return {
        "about": "docs/protocol.md §13: three updaters, one summer, B = 1, n_max = 4, "
        "32-bit words, M = 2, FedAvg with lr = 1.",
        "config": _cfg_json(cfg),
        "deltas_f32": [[float(x) for x in d] for d in deltas],
        "weights": weights,
        "evaluations": [[e.examples, e.correct, e.loss_sum] for e in evals],
        "fleet_evaluation": {
            "examples": fleet.examples,
            "correct": fleet.correct,
            "loss_sum": fleet.loss_sum,
            "accuracy": fleet.accuracy,
            "loss": fleet.loss,
        },
        "seeds": [s.hex() for s in seeds],
        "encoded": encoded,
        "masks": masks,
        "masked": masked,
        "masked_sum": _words(total),
        "aggregate_mask": _words(agg),
        "unmasked_sum": _words(plain),
        "weighted_sum": [float(v) for v in values],
        "weight_sum": float(weight_sum),
        "mean": [float(v) for v in mean],
        "error_bound": float(error_bound(3, weight_sum, cfg)),
        "model_before_f32": [float(x) for x in model],
        "model_after_f32": [float(x) for x in new],
    }


def build() -> dict[str, Any]:
    """Every file of docs/vectors/ as its JSON value."""
    shared = json.loads(SHARED_MASK_STREAM.read_text(encoding="utf-8"))
    return {
        "seed_chain.json": seed_chain(),
        "sortition.json": sortition(),
        "probabilities.json": probabilities(),
        "masking.json": masking(),
        "mask_stream.json": shared,
        "sealed_seed.json": sealed_seed(),
        "messages.json": messages(),
        "chunking.json": chunking(),
        "optimizer.json": optimizer(),
        "worked_example.json": worked_example(),
    }


def render(value: Any) -> str:
    return json.dumps(value, indent=1, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    differ = []
    for name, value in build().items():
        path = args.out / name
        text = render(value)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differ.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if differ:
        print("differ from the code: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
