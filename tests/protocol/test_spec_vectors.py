"""The known answers of docs/vectors/ against the code, computation by computation.

Each test reads a JSON file as an outside implementer would (hex, decimal strings,
float hex) and recomputes it with the reference implementation. If one fails,
code and specification have drifted: fix the code, or change the rule in
docs/protocol.md and regenerate with ``python -m tests.protocol.spec_vectors``.
"""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maskfl.broker_coordinator.config import OptimizerConfig
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.protocol import masking, sortition
from maskfl.protocol.chunking import split_payload
from maskfl.protocol.crypto import open_seed
from maskfl.protocol.dp import aggregate_noise_bound, updater_variance
from maskfl.protocol.errors import CryptoError, RemoteProtocolError
from maskfl.protocol.messages import decode_message, verify_sender, weights_digest
from maskfl.protocol.reassembly import Reassembler
from tests.protocol import spec_vectors

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "docs" / "vectors"
SPEC = ROOT / "docs" / "protocol.md"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def f(entry: dict[str, Any]) -> float:
    value = float.fromhex(entry["hex"])
    assert value == entry["value"]
    return value


def cfg(spec: list[Any]) -> masking.MaskConfig:
    return masking.MaskConfig(float(spec[0]), int(spec[1]), int(spec[2]))  # type: ignore[arg-type]


def ints(words: list[str]) -> list[int]:
    return [int(w) for w in words]


def test_the_files_are_what_the_generator_writes() -> None:
    """Regenerating changes nothing: the files hold the code's current answers."""
    built = spec_vectors.build()
    assert sorted(p.name for p in VECTORS.glob("*.json")) == sorted(built)
    for name, value in built.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == spec_vectors.render(value), name


def test_seed_chain() -> None:
    data = load("seed_chain.json")
    for case in data["weights_digest"]:
        weights = np.frombuffer(bytes.fromhex(case["weights_le_hex"]), dtype="<f4")
        assert weights.tolist() == case["weights_f32"]
        assert weights_digest(weights).hex() == case["digest"]
    previous = None
    for case in data["chain"]:
        if previous is not None:
            assert case["previous_seed"] == previous
        seed = sortition.next_round_seed(
            bytes.fromhex(case["previous_seed"]),
            bytes.fromhex(case["model_digest"]),
            case["round_id"],
        )
        assert seed.hex() == case["seed"]
        previous = case["seed"]


def test_sortition_tickets() -> None:
    data = load("sortition.json")
    for case in data["tickets"]:
        seed, pk = bytes.fromhex(case["seed"]), bytes.fromhex(case["public_key"])
        raw = hashlib.blake2b(
            seed + case["task"].encode("ascii") + pk, digest_size=8, person=b"maskfl/ticket/v1"
        ).digest()
        assert raw.hex() == case["digest"]
        assert int.from_bytes(raw, "little") == int(case["ticket"])
        assert sortition.ticket(seed, case["task"], pk) == int(case["ticket"])
    for case in data["thresholds"]:
        assert sortition.threshold(f(case["p"])) == int(case["threshold"])
    tasks = set()
    for case in data["select_task"]:
        task = sortition.select_task(
            bytes.fromhex(case["seed"]),
            bytes.fromhex(case["public_key"]),
            f(case["p_sum"]),
            f(case["p_update"]),
        )
        assert task.value == case["task"]
        tasks.add(task.value)
    assert tasks == {"sum", "update", "none"}, "the vectors must show every outcome"
    seen = set()
    for case in data["groups"]:
        seed, pk = bytes.fromhex(case["seed"]), bytes.fromhex(case["public_key"])
        raw = hashlib.blake2b(seed + pk, digest_size=8, person=b"maskfl/group/v1").digest()
        assert raw.hex() == case["digest"]
        assert int.from_bytes(raw, "little") % case["groups"] == case["group"]
        assert sortition.group_of(seed, pk, case["groups"]) == case["group"]
        seen.add(case["group"])
    assert len(seen) >= 3, "the vectors must show several groups"


def test_probabilities() -> None:
    for case in load("probabilities.json")["cases"]:
        p_sum, p_update = sortition.probabilities_for_targets(
            case["alive"], case["target_summers"], case["target_updaters"], case["min_updaters"]
        )
        assert (p_sum, p_update) == (f(case["p_sum"]), f(case["p_update"])), case


def test_mask_config_constants() -> None:
    for c in load("masking.json")["configs"]:
        mask = masking.MaskConfig(c["bound"], c["n_max"], c["word_bits"])
        assert (str(mask.scale), str(mask.offset), str(mask.weight_scale)) == (
            c["scale"],
            c["offset"],
            c["weight_scale"],
        )
        assert mask.resolution == f(c["resolution"])


def test_encoding_and_the_weight_word() -> None:
    cases = load("masking.json")["encode"]
    assert any(f(c["weight"]) == 0.0 for c in cases)
    for case in cases:
        mask = cfg(case["config"])
        delta = np.frombuffer(bytes.fromhex(case["delta_f32_le_hex"]), dtype="<f4")
        weight = f(case["weight"])
        examples, correct, loss = case["evaluation"]
        ev = masking.EvalCounts(examples, correct, f(loss))
        words = masking.encode_update(delta, weight, mask, evaluation=ev)
        assert words.tolist() == ints(case["words"]), case["config"]
        # The weight word, from its definition: round half to even of a·S_w, plus S_w.
        m = delta.size
        s_w = mask.weight_scale
        assert int(words[m]) == round(Fraction(weight) * s_w) + s_w
        # The evaluation words (§7.4): examples, correct, rint(loss · Q).
        q = mask.loss_scale
        assert words[m + 1 :].tolist() == [examples, correct, round(Fraction(f(loss)) * q)]


def test_rounding_is_half_to_even_before_the_offset() -> None:
    """With a = 0.5 and B = 1, S odd: delta = ±1 encodes ±S/2, an exact tie.

    It must round to the even neighbour of S/2 (then K is added), at every word
    size; rounding the *word* to even instead picks the other neighbour when K is odd.
    """
    checked = 0
    for case in load("masking.json")["encode"]:
        mask = cfg(case["config"])
        if f(case["weight"]) != 0.5 or mask.bound != 1.0 or mask.scale % 2 == 0:
            continue
        delta = np.frombuffer(bytes.fromhex(case["delta_f32_le_hex"]), dtype="<f4")
        words = ints(case["words"])
        half = mask.scale // 2  # S/2 = half + 0.5
        even = half if half % 2 == 0 else half + 1
        for i, x in enumerate(delta.tolist()):
            if x in (1.0, -1.0):
                assert words[i] - mask.offset == int(x) * even, case["config"]
                checked += 1
    assert checked >= 4


def test_mask_stream_known_answers() -> None:
    data = load("mask_stream.json")
    for case in data["cases"]:
        seed = bytes.fromhex(case["seed_hex"])
        assert masking.mask_stream(seed, 8, 64).tolist() == case["first_8_words_u64"]
        assert masking.mask_stream(seed, 8, 32).tolist() == case["first_8_words_u32"]


def test_masked_updates_and_aggregate_masks() -> None:
    data = load("masking.json")
    for case in data["mask_update"]:
        mask = cfg(case["config"])
        seed = bytes.fromhex(case["seed"])
        delta = np.array(case["delta_f32"], dtype=np.float32)
        n_words = masking.update_words(delta.size)
        assert masking.mask_stream(seed, n_words, mask.word_bits).tolist() == ints(case["mask"])
        examples, correct, loss = case["evaluation"]
        ev = masking.EvalCounts(examples, correct, f(loss))
        masked = masking.mask_update(delta, f(case["weight"]), seed, mask, evaluation=ev)
        assert masked.tolist() == ints(case["masked_words"])
        modulus = 1 << mask.word_bits
        plain = masking.encode_update(delta, f(case["weight"]), mask, evaluation=ev).tolist()
        assert [(p + m) % modulus for p, m in zip(plain, ints(case["mask"]), strict=True)] == ints(
            case["masked_words"]
        )
    case = data["mask_update_groups"]  # one seed per mask group: the sum of their masks
    mask = cfg(case["config"])
    seeds = [bytes.fromhex(s) for s in case["seeds"]]
    delta = np.array(case["delta_f32"], dtype=np.float32)
    ev = masking.EvalCounts(case["evaluation"][0], case["evaluation"][1], f(case["evaluation"][2]))
    masked = masking.mask_update(delta, f(case["weight"]), seeds, mask, evaluation=ev)
    assert masked.tolist() == ints(case["masked_words"])
    total = masking.encode_update(delta, f(case["weight"]), mask, evaluation=ev).astype(object)
    for seed, stream in zip(seeds, case["masks"], strict=True):
        assert masking.mask_stream(seed, delta.size + 4, mask.word_bits).tolist() == ints(stream)
        total = (total + np.array(ints(stream), dtype=object)) % (1 << mask.word_bits)
    assert total.tolist() == ints(case["masked_words"])
    for case in data["aggregate_mask"]:
        seeds = [bytes.fromhex(s) for s in case["seeds"]]
        got = masking.aggregate_mask(seeds, case["n_words"], case["word_bits"])
        assert got.tolist() == ints(case["aggregate_mask"])


def test_decoding_and_error_bound() -> None:
    data = load("masking.json")
    for case in data["decode"]:
        mask = cfg(case["config"])
        words = np.array(ints(case["sum_of_words"]), dtype=mask.dtype)
        values, weight_sum = masking.decode_aggregate(words, case["n"], mask)
        assert [float(v) for v in values] == [f(v) for v in case["weighted_sum"]]
        assert weight_sum == f(case["weight_sum"])
        assert masking.error_bound(case["n"], weight_sum, mask) == f(case["error_bound"])
        # The bound holds against exact arithmetic on the clipped, weighted deltas.
        exact_num = sum(
            a * np.clip(np.array(d, dtype=np.float64), -mask.bound, mask.bound)
            for d, a in zip(case["deltas_f32"], case["weights"], strict=True)
        )
        exact = exact_num / sum(case["weights"])
        mean = np.array([f(v) for v in case["mean"]])
        assert np.all(np.abs(mean - exact) <= f(case["error_bound"]))
        fleet = masking.decode_evaluation(words, case["n"], mask)
        assert [fleet.examples, fleet.correct] == case["fleet_evaluation"][:2]
        assert fleet.loss_sum == f(case["fleet_evaluation"][2])
        assert fleet.examples == sum(e[0] for e in case["evaluations"])
    for case in data["error_bound"]:
        got = masking.error_bound(case["n"], f(case["weight_sum"]), cfg(case["config"]))
        assert got == f(case["error_bound"])
    assert {c["word_bits"] for c in data["word_size_auto"]} == {32, 64}  # both outcomes
    for case in data["word_size_auto"]:
        chosen = masking.MaskConfig.for_tolerance(case["bound"], case["n_max"], case["tolerance"])
        assert chosen.word_bits == case["word_bits"]


def test_dp_noise_bound_variance_and_noisy_encoding() -> None:
    cases = load("masking.json")["dp"]
    assert cases
    for c in cases:
        noise = aggregate_noise_bound(
            c["noise_multiplier"], c["clip_norm"], c["min_updates"], c["n_max"], c["elements"]
        )
        assert noise == f(c["noise_bound"])
        bound, n_max, bits = c["config"]
        cfg = masking.MaskConfig(bound, n_max, bits, noise)
        assert (str(cfg.scale), str(cfg.offset)) == (c["scale"], c["offset"])
        assert cfg.scale < masking.MaskConfig(bound, n_max, bits).scale  # the tail takes room
        v = updater_variance(c["noise_multiplier"], c["clip_norm"], cfg.scale, c["min_updates"])
        assert str(v) == c["noise_variance"]
        auto = masking.MaskConfig.for_tolerance(bound, n_max, 1e-6, noise).word_bits
        assert auto == c["word_bits_auto_1e-6"]
        delta = np.array([f(x) for x in c["delta"]], dtype=np.float32)
        shares = np.array(c["shares"], dtype=np.int64)
        words = masking.encode_update(delta, 1.0, cfg, noise=shares)
        assert [str(int(w)) for w in words] == c["words"]
        # The shares are exactly what separates the noisy words from the plain ones.
        plain = masking.encode_update(delta, 1.0, cfg)
        diff = (words.astype(object) - plain.astype(object)) % cfg.modulus
        assert [int(d) % cfg.modulus for d in diff[: shares.size]] == [
            int(x) % cfg.modulus for x in shares
        ]


def test_sealed_seed_opening() -> None:
    for case in load("sealed_seed.json")["cases"]:
        sealed, sk = bytes.fromhex(case["sealed"]), bytes.fromhex(case["recipient_sk"])
        if case["opens"]:
            assert open_seed(sealed, sk).hex() == case["seed"]
        else:
            with pytest.raises(CryptoError):
                open_seed(sealed, sk)


def test_messages_decode_and_verify() -> None:
    data = load("messages.json")
    ca = bytes.fromhex(data["ca_public_key"])
    coordinator_cert = None
    for name, entry in data["vectors"].items():
        if not name.startswith("message_"):
            continue
        raw = bytes.fromhex(entry["hex"])
        signed = decode_message(raw, max_size=len(raw))
        assert int(signed.header.message_type) == entry["type"]
        assert signed.header.sender.hex() == entry["sender"]
        assert signed.digest.hex() == entry["digest"] == hashlib.sha256(raw[:152]).hexdigest()
        assert hashlib.sha256(raw[216:]).hexdigest() == entry["body_digest"]
        if name == "message_round_params":
            coordinator_cert = signed.certificate
        cert = verify_sender(
            signed,
            ca_public_key=ca,
            fleet="demo",
            now=data["now"],
            revocations=None,
            certificate=coordinator_cert,
        )
        assert cert.public_key.hex() == entry["sender"]
    for case in data["invalid"]:
        raw = bytes.fromhex(case["hex"])
        with pytest.raises(RemoteProtocolError) as caught:
            decode_message(raw, max_size=case.get("max_size", 1 << 20))
        assert str(caught.value.reason) == case["reason"], case["what"]


def test_chunk_framing() -> None:
    for case in load("chunking.json")["cases"]:
        payload = bytes.fromhex(case["payload"])
        frames = split_payload(payload, case["chunk_size"])
        assert [fr.hex() for fr in frames] == case["frames"]
        assert all(len(fr) <= case["chunk_size"] for fr in frames)
        if len(frames) > 1:
            r: Reassembler[None] = Reassembler(4, 1 << 20, 60.0)
            outs = [r.feed("t", bytes.fromhex(fr), 0.0) for fr in reversed(case["frames"])]
            assert outs[-1] is not None and outs[-1].payload == payload


def test_optimizer_steps() -> None:
    for case in load("optimizer.json")["cases"]:
        opt = ServerOptimizer(OptimizerConfig(kind=case["kind"], **case["params"]))
        weights = np.array(case["initial_weights_f32"], dtype=np.float32)
        for step in case["steps"]:
            weights = opt.step(weights, np.array(step["mean_delta"], dtype=np.float64))
            assert weights.tolist() == step["weights_f32"]


def test_worked_example_in_the_spec() -> None:
    """Every number of the worked example appears in docs/protocol.md as computed."""
    data = load("worked_example.json")
    mask = masking.MaskConfig(1.0, 4, 32)
    total = np.zeros(masking.update_words(2), dtype=np.uint32)
    for d, a, s, e, enc, masked in zip(
        data["deltas_f32"],
        data["weights"],
        data["seeds"],
        data["evaluations"],
        data["encoded"],
        data["masked"],
        strict=True,
    ):
        ev = masking.EvalCounts(*e)
        words = masking.encode_update(np.array(d, dtype=np.float32), a, mask, evaluation=ev)
        assert words.tolist() == ints(enc)
        mw = masking.mask_update(
            np.array(d, dtype=np.float32), a, bytes.fromhex(s), mask, evaluation=ev
        )
        assert mw.tolist() == ints(masked)
        total += mw
    assert total.tolist() == ints(data["masked_sum"])
    agg = masking.aggregate_mask(
        [bytes.fromhex(s) for s in data["seeds"]], masking.update_words(2), 32
    )
    plain = masking.unmask(total, agg)
    assert plain.tolist() == ints(data["unmasked_sum"])
    fleet = masking.decode_evaluation(plain, 3, mask)
    assert fleet.accuracy == data["fleet_evaluation"]["accuracy"]
    text = SPEC.read_text(encoding="utf-8")
    numbers = set(re.findall(r"-?\d[\d.e+-]*", text))
    wanted = [
        *(w for row in data["encoded"] for w in row),
        *(w for row in data["masks"] for w in row),
        *(w for row in data["masked"] for w in row),
        *data["masked_sum"],
        *data["aggregate_mask"],
        *data["unmasked_sum"],
        *(repr(v) for v in data["model_after_f32"]),
    ]
    sortition = load("sortition.json")["tickets"][:2]
    wanted += [c["ticket"] for c in sortition]
    missing = [w for w in wanted if w not in numbers]
    missing += [c["digest"] for c in sortition if c["digest"] not in text]
    assert not missing, f"docs/protocol.md §13 lacks {missing}"


def _sections(text: str) -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))


def test_section_references_exist() -> None:
    """Every §N.M cited by the spec or by maskfl-conformance's verdicts names a real section."""
    spec = SPEC.read_text(encoding="utf-8")
    wire = (ROOT / "docs" / "wire-format.md").read_text(encoding="utf-8")
    ours, theirs = _sections(spec), _sections(wire)
    assert {"4.2", "7.3", "10.2"} <= ours and {"4.4", "5"} <= theirs
    tools = [(f.name, f.read_text(encoding="utf-8")) for f in ROOT.glob("tools/*conformance*.py")]
    assert {"conformance.py", "_conformance_rules.py"} <= {name for name, _ in tools}
    missing = []
    for name, text in (("protocol.md", spec), *tools):
        # "wire-format §4.4" and "wire-format §4, §1" cite wire-format.md; the rest protocol.md
        for match in re.finditer(r"(wire-format )?§(\d+(?:\.\d+)?)", text):
            wire_ref = match.group(1) is not None
            if match.group(2) not in (theirs if wire_ref else ours):
                missing.append(f"{name}: {match.group(0)}")
    assert not missing, missing
