"""What ``maskfl-conformance`` holds a participant to: the initial seed chosen so that the
usual ticket mistakes give the wrong role, the monitor's record of everything the fleet
sent, and each rule judged against it, naming the section of docs/protocol.md (or
wire-format.md) it comes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from maskfl.broker_coordinator.config import OptimizerConfig
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.protocol.chunking import is_chunk
from maskfl.protocol.crypto import open_seed
from maskfl.protocol.errors import CryptoError, MaskflError, Reason, RemoteProtocolError
from maskfl.protocol.identity import Identity
from maskfl.protocol.masking import (
    LOSS_CAP,
    MaskConfig,
    Words,
    decode_aggregate,
    encode_update,
    error_bound,
    mask_stream,
    update_words,
)
from maskfl.protocol.messages import (
    PARTICIPANT_KINDS,
    PARTICIPANT_MESSAGES,
    GlobalModel,
    MessageType,
    Receipt,
    RoundParams,
    SignedMessage,
    Sum2,
    Update,
    decode_message,
    verify_sender,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.sortition import Task, group_of, next_round_seed, select_task, threshold
from maskfl.protocol.sortition import ticket as compute_ticket
from maskfl.protocol.topics import TopicKind, parse_topic
from maskfl.testing.participants import SimParticipant
from maskfl.transport import MqttTransport

P_SUM = 0.25
P_UPDATE = 1.0
ROLES = ("summer", "updater")
GROUPS_ROLE = "groups"
"""The optional scenario: the participant updates in a round of g = 2 mask groups (one
helper sums in each), so it must seal a different seed to each group's summer (§4.4)."""
MAX_IN = 64 * 1024 * 1024


@dataclass
class Check:
    """One judged rule: ``ok`` or not, the section it comes from, and why."""

    scenario: str
    rule: str
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        detail = f": {self.detail}" if self.detail else ""
        return f"{mark}  [{self.scenario}] {self.rule} {self.name}{detail}"


@dataclass
class Judge:
    scenario: str
    checks: list[Check] = field(default_factory=list)

    def add(self, ok: bool, rule: str, name: str, detail: str = "") -> bool:
        self.checks.append(Check(self.scenario, rule, name, ok, detail))
        return ok


# --- choosing the seed ----------------------------------------------------------------------


def _variant_big_endian(seed: bytes, task: str, pk: bytes) -> int:
    h = hashlib.blake2b(seed + task.encode() + pk, digest_size=8, person=b"maskfl/ticket/v1")
    return int.from_bytes(h.digest(), "big")


def _variant_no_person(seed: bytes, task: str, pk: bytes) -> int:
    return int.from_bytes(
        hashlib.blake2b(seed + task.encode() + pk, digest_size=8).digest(), "little"
    )


WRONG_TICKETS: dict[str, Callable[[bytes, str, bytes], int]] = {
    "big-endian ticket": _variant_big_endian,
    "ticket without personalisation": _variant_no_person,
}
"""Common mistakes in the ticket; the seed is chosen so that each gives the wrong role."""


def task_with(ticket: Callable[[bytes, str, bytes], int], seed: bytes, pk: bytes) -> Task:
    if ticket(seed, "sum", pk) < threshold(P_SUM):
        return Task.SUM
    if ticket(seed, "update", pk) < threshold(P_UPDATE):
        return Task.UPDATE
    return Task.NONE


def choose_initial_seed(
    role: str, participant: bytes, helpers: list[bytes], initial_digest: bytes
) -> bytes:
    """An initial seed whose round 1 gives ``participant`` the role and the helpers the rest.

    As summer: the participant is the only summer. As updater: exactly one helper
    sums. Every wrong ticket of :data:`WRONG_TICKETS` gives the participant another role.
    """
    wanted = Task.SUM if role == "summer" else Task.UPDATE
    for _ in range(1_000_000):
        initial = secrets.token_bytes(32)
        seed = next_round_seed(initial, initial_digest, 1)
        if select_task(seed, participant, P_SUM, P_UPDATE) is not wanted:
            continue
        summers = [pk for pk in helpers if select_task(seed, pk, P_SUM, P_UPDATE) is Task.SUM]
        if len(summers) != {"summer": 0, "updater": 1, GROUPS_ROLE: 2}[role]:
            continue
        if role == GROUPS_ROLE and len({group_of(seed, pk, 2) for pk in summers}) != 2:
            continue  # one summer in each of the two groups
        if all(task_with(v, seed, participant) is not wanted for v in WRONG_TICKETS.values()):
            return initial
    raise MaskflError("found no seed with the wanted roles")  # pragma: no cover


# --- what the fleet sent ---------------------------------------------------------------------


@dataclass
class Recorded:
    at: float
    topic: str
    payload: bytes


class Monitor:
    """Reads every topic of the fleet and keeps what it saw, in order."""

    def __init__(self, transport: MqttTransport, fleet: str) -> None:
        self.transport = transport
        self.fleet = fleet
        self.seen: list[Recorded] = []
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.transport.connect()
        await self.transport.subscribe(f"maskfl/v1/{self.fleet}/#", qos=1)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.transport.messages():
            self.seen.append(Recorded(time.monotonic(), msg.topic, msg.payload))
            self.changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(MaskflError):
            await self.transport.disconnect()

    def decoded(self, kind: TopicKind) -> list[tuple[str, SignedMessage]]:
        """Every whole, decodable message seen on topics of ``kind`` (chunks reassembled)."""
        out = []
        reassembler: Reassembler[None] = Reassembler(64, 1 << 30, 3600.0)
        for rec in self.seen:
            if not rec.payload:
                continue
            try:
                if parse_topic(rec.topic).kind is not kind:
                    continue
                payload: bytes | None = rec.payload
                if is_chunk(rec.payload):
                    whole = reassembler.feed(rec.topic, rec.payload, 0.0)
                    payload = None if whole is None else whole.payload
                if payload is not None:
                    out.append((rec.topic, decode_message(payload, max_size=MAX_IN)))
            except RemoteProtocolError:
                continue
        return out


RoundSeen = Literal["model", "failed", "timeout"]
"""What the monitor saw of round 1: its model, round 2 starting (so it failed), or neither."""


# --- judging ---------------------------------------------------------------------------------


def _sent(monitor: Monitor, device: str, params: RoundParams) -> dict[TopicKind, list[bytes]]:
    """Whole payloads the participant sent per kind; checks the chunking rule on the way."""
    raw: dict[TopicKind, list[Recorded]] = {}
    for rec in monitor.seen:
        with contextlib.suppress(RemoteProtocolError):
            parsed = parse_topic(rec.topic)
            if parsed.device == device and parsed.kind in PARTICIPANT_KINDS:
                raw.setdefault(parsed.kind, []).append(rec)
    out: dict[TopicKind, list[bytes]] = {}
    for kind, recs in raw.items():
        reassembler: Reassembler[None] = Reassembler(16, 1 << 30, 3600.0)
        for rec in recs:
            if is_chunk(rec.payload):
                whole = reassembler.feed(rec.topic, rec.payload, 0.0)
                if whole is not None:
                    out.setdefault(kind, []).append(whole.payload)
            else:
                out.setdefault(kind, []).append(rec.payload)
        out.setdefault(kind, [])
    return out


def judge_round(
    judge: Judge,
    *,
    role: str,
    device: str,
    me: Identity,
    monitor: Monitor,
    sims: list[SimParticipant],
    initial: npt.NDArray[np.float32],
    outcome: RoundSeen,
    log_tail: str,
    ca: bytes,
) -> None:
    """Every rule, in order, against what the monitor saw of round 1."""
    rounds = [s for _, s in monitor.decoded(TopicKind.ROUND) if s.header.round_id == 1]
    if not judge.add(bool(rounds), "§5.2", "round 1 started", "" if rounds else "no ROUND_PARAMS"):
        return
    params = rounds[0].body
    assert isinstance(params, RoundParams)
    sent = _sent(monitor, device, params)
    _check_sortition(
        judge, role=role, params=params, pk=me.public_key, sent=sent, log_tail=log_tail
    )
    _check_chunking(judge, monitor, device, params)
    messages = _check_messages(judge, sent, _receipts(monitor, device), me, ca)
    contributions: list[Words] = []
    for sim in sims:
        sent_update = sim.sent.get(1)
        if sent_update is not None:
            contributions.append(encode_update(sent_update.delta, sent_update.weight, params.mask))
    if TopicKind.SUM2 in messages:
        _check_sum2(judge, messages[TopicKind.SUM2], sims, params)
    if TopicKind.UPDATE in messages:
        plain = _check_update(judge, messages[TopicKind.UPDATE], sims, params)
        if plain is not None:
            contributions.append(plain)
    _check_model(
        judge, monitor, params=params, contributions=contributions, initial=initial, outcome=outcome
    )


def _check_sortition(
    judge: Judge,
    *,
    role: str,
    params: RoundParams,
    pk: bytes,
    sent: dict[TopicKind, list[bytes]],
    log_tail: str,
) -> None:
    """§4: the participant sent the messages of the role its tickets give it, no others."""
    wanted = Task.SUM if role == "summer" else Task.UPDATE
    t_sum = compute_ticket(params.seed, Task.SUM, pk)
    kinds = [k.topic.value for k in PARTICIPANT_MESSAGES if sent.get(k.topic)]
    expected_kinds = ["sum", "sum2"] if wanted is Task.SUM else ["update"]
    relation = "below" if t_sum < threshold(params.p_sum) else "not below"
    judge.add(
        kinds == expected_kinds,
        "§4",
        "sortition",
        f"its sum ticket u64le(BLAKE2b-64(person='maskfl/ticket/v1', seed ‖ 'sum' ‖ "
        f"public key)) = {t_sum} is {relation} threshold(p_sum = {params.p_sum}) = "
        f"{threshold(params.p_sum)}, so it is {'a summer' if wanted is Task.SUM else 'an updater'}"
        f" in round 1 and must send {' and '.join(expected_kinds).upper()}; it sent "
        f"{' and '.join(kinds).upper() if kinds else 'nothing'}"
        + ("" if kinds else f" (its log ends: {log_tail[-300:]!r})")
        + ("" if kinds == expected_kinds else _mistakes(params, pk)),
    )


def _check_messages(
    judge: Judge,
    sent: dict[TopicKind, list[bytes]],
    receipts: dict[bytes, Receipt],
    me: Identity,
    ca: bytes,
) -> dict[TopicKind, SignedMessage]:
    """Each kind's first message decodes, verifies and was accepted (its receipt)."""
    messages: dict[TopicKind, SignedMessage] = {}
    for kind, payloads in sent.items():
        for payload in payloads[:1]:
            signed = _check_message(judge, kind, payload, me, ca)
            if signed is None:
                continue
            messages[kind] = signed
            receipt = receipts.get(signed.digest)
            if receipt is None:
                judge.add(False, "§10.1", f"{kind.value.upper()} receipt", "no receipt arrived")
            else:
                ok = receipt.accepted or str(receipt.reason) == "duplicate"
                judge.add(
                    ok,
                    "§10",
                    f"{kind.value.upper()} accepted",
                    "" if ok else f"rejected {receipt.reason}: {receipt.detail}",
                )
    return messages


def _mistakes(params: RoundParams, pk: bytes) -> str:
    """What the usual ticket mistakes would make of this device (the seed makes them differ)."""
    roles = []
    for name, variant in WRONG_TICKETS.items():
        if variant(params.seed, "sum", pk) < threshold(params.p_sum):
            task = Task.SUM
        elif variant(params.seed, "update", pk) < threshold(params.p_update):
            task = Task.UPDATE
        else:
            task = Task.NONE
        roles.append(f"a {name} makes it {task.value}")
    return "; " + ", ".join(roles)


def _check_chunking(judge: Judge, monitor: Monitor, device: str, params: RoundParams) -> None:
    bad = []
    for rec in monitor.seen:
        with contextlib.suppress(RemoteProtocolError):
            parsed = parse_topic(rec.topic)
            if parsed.device != device or parsed.kind not in PARTICIPANT_KINDS:
                continue
            if len(rec.payload) > params.chunk_size:
                bad.append(f"a {len(rec.payload)}-byte publish on {parsed.kind.value}")
    judge.add(
        not bad,
        "§9",
        "chunking",
        f"publishes above the chunk size {params.chunk_size}: {', '.join(bad)}" if bad else "",
    )


def _receipts(monitor: Monitor, device: str) -> dict[bytes, Receipt]:
    out = {}
    for topic, signed in monitor.decoded(TopicKind.RECEIPTS):
        if topic.endswith(f"/receipts/{device}") and isinstance(signed.body, Receipt):
            out[signed.body.message_digest] = signed.body
    return out


def _check_message(
    judge: Judge, kind: TopicKind, payload: bytes, me: Identity, ca: bytes
) -> SignedMessage | None:
    name = kind.value.upper()
    try:
        signed = decode_message(payload, max_size=MAX_IN)
        signed.expect(fleet=me.fleet, round_id=1, types=(MessageType[name],))
        cert = verify_sender(
            signed, ca_public_key=ca, fleet=me.fleet, now=time.time(), revocations=None
        )
        if cert.subject != me.device_id:
            raise RemoteProtocolError(
                Reason.UNENROLLED, f"certificate of {cert.subject!r} on {me.device_id!r}'s topic"
            )
    except RemoteProtocolError as exc:
        judge.add(False, "wire-format §4, §1", f"{name} decodes and verifies", str(exc))
        return None
    judge.add(True, "wire-format §4, §1", f"{name} decodes and verifies")
    return signed


def _check_sum2(
    judge: Judge, signed: SignedMessage, sims: list[SimParticipant], params: RoundParams
) -> None:
    body = signed.body
    assert isinstance(body, Sum2)
    group = params.group_of(signed.header.sender)  # the summer's mask group's seeds
    seeds = [s.sent[1].seeds[group] for s in sims if 1 in s.sent]
    n_words = update_words(params.vector_length)
    expected = np.zeros(n_words, dtype=params.mask.dtype)
    for seed in seeds:
        expected += mask_stream(seed, n_words, params.mask.word_bits)
    judge.add(
        not body.failed,
        "§6.1",
        "SUM2 failed list",
        "" if not body.failed else f"{len(body.failed)} seeds listed as failed; all of them open",
    )
    words = np.asarray(body.words)
    if words.shape != expected.shape or words.dtype != expected.dtype:
        judge.add(False, "§6.1", "SUM2 aggregate mask", f"{words.size} words of {words.dtype}")
        return
    differ = np.flatnonzero(words != expected)
    detail = ""
    if differ.size:
        i = int(differ[0])
        detail = (
            f"{differ.size} of {words.size} words differ from the sum mod 2^w of the "
            f"{len(seeds)} ChaCha20 masks (§7.5); first at {i}: {int(words[i])}, "
            f"expected {int(expected[i])}"
        )
    judge.add(not differ.size, "§6.1 §7.5", "SUM2 aggregate mask", detail)


def _check_update(
    judge: Judge, signed: SignedMessage, sims: list[SimParticipant], params: RoundParams
) -> Words | None:
    body = signed.body
    assert isinstance(body, Update)
    summers = {s.identity.public_key: s.ephemeral[1] for s in sims if 1 in s.ephemeral}
    if not judge.add(
        set(body.sealed_seeds) == set(summers),
        "§6.2",
        "UPDATE sealed seeds",
        "" if set(body.sealed_seeds) == set(summers) else "not keyed by exactly the summers' keys",
    ):
        return None
    seeds = _open_seeds(judge, body, summers, params)
    if seeds is None:
        return None
    cfg = params.mask
    words = np.asarray(body.words)
    m = params.vector_length
    if words.size != update_words(m) or words.dtype != cfg.dtype:
        judge.add(False, "§7", "UPDATE words", f"{words.size} words of {words.dtype}")
        return None
    plain: Words = words
    for seed in seeds.values():  # the mask is the sum of the g sub-masks
        plain = np.subtract(plain, mask_stream(seed, words.size, cfg.word_bits))
    _check_evaluation_words(judge, plain[m + 1 :], cfg)
    a = _check_weight_word(judge, int(plain[m]), cfg)
    if a is None:
        return plain  # the elements cannot be judged without the weight
    _check_elements(judge, plain[:m], a, cfg)
    return plain


def _open_seeds(
    judge: Judge, body: Update, summers: dict[bytes, Any], params: RoundParams
) -> dict[int, bytes] | None:
    """Each summer opens its sealed seed (§6.3); one seed per mask group, a fresh one in
    each (§4.4). The seeds by group, None when one does not open or a group has two."""
    seeds: dict[int, bytes] = {}  # one per mask group: every summer of group j opens seed j
    for key, pair in summers.items():
        try:
            seed = open_seed(body.sealed_seeds[key], pair.private_key)
        except CryptoError as exc:
            judge.add(False, "§6.3", "sealed seed opens", str(exc))
            return None
        group = params.group_of(key)
        if seeds.setdefault(group, seed) != seed:
            judge.add(False, "§4.4", "one seed per mask group", f"group {group}: two seeds")
            return None
    judge.add(True, "§6.3", "sealed seed opens")
    if params.groups > 1:
        fresh = len(set(seeds.values())) == len(seeds) == params.groups
        judge.add(
            fresh,
            "§4.4",
            "a fresh seed per mask group",
            ""
            if fresh
            else f"{len(set(seeds.values()))} distinct seeds for {params.groups} groups: the "
            "summers of one group must not learn another group's seed",
        )
    return seeds


def _check_evaluation_words(judge: Judge, words: Words, cfg: MaskConfig) -> None:
    """§7.4: examples, correct and loss units within their bounds."""
    n_eval, correct, loss_units = (int(w) for w in words)
    eval_ok = correct <= n_eval <= cfg.eval_max_examples and (
        loss_units <= n_eval * LOSS_CAP * cfg.loss_scale
    )
    judge.add(
        eval_ok,
        "§7.4",
        "evaluation words",
        ""
        if eval_ok
        else f"examples {n_eval}, correct {correct}, loss units {loss_units}: need correct <= "
        f"examples <= E = {cfg.eval_max_examples} and loss units <= examples·32·Q "
        f"(Q = {cfg.loss_scale})",
    )


def _check_weight_word(judge: Judge, word: int, cfg: MaskConfig) -> float | None:
    """§7.3: the unmasked weight word encodes a weight in (0, 1]; that weight, or None."""
    s_w = cfg.weight_scale
    units = (word - s_w) % cfg.modulus
    if units >= cfg.modulus // 2:
        units -= cfg.modulus
    a = units / s_w
    ok = 0 < units <= s_w
    judge.add(
        ok,
        "§7.3",
        "weight word",
        ""
        if ok
        else f"the unmasked weight word {word} decodes to a = (word − S_w)/S_w = "
        f"{a:.6g} with S_w = {s_w}; it must be round_half_even(a·S_w) + S_w for the weight "
        "a = min(samples, cap)/cap in (0, 1]",
    )
    return a if ok else None


def _check_elements(judge: Judge, elements: Words, a: float, cfg: MaskConfig) -> None:
    """§7.2: every element encodes at most a·B·S + 1 in magnitude (clipped, then weighted)."""
    signed_t = np.int32 if cfg.word_bits == 32 else np.int64
    values = np.subtract(elements, cfg.dtype(cfg.offset)).view(signed_t)
    limit = a * cfg.bound * cfg.scale + 1
    beyond = int(np.count_nonzero(np.abs(values.astype(np.float64)) > limit))
    judge.add(
        beyond == 0,
        "§7.2",
        "element encoding (clip, then weight)",
        ""
        if beyond == 0
        else f"{beyond} of {values.size} elements encode |v| > a·B·S + 1 = {limit:.6g}: "
        "v_i = rint(clip(δ_i, −B, B)·a·S), word = v_i + K",
    )


def _check_model(
    judge: Judge,
    monitor: Monitor,
    *,
    params: RoundParams,
    contributions: list[Words],
    initial: npt.NDArray[np.float32],
    outcome: RoundSeen,
) -> None:
    models = [
        s.body
        for _, s in monitor.decoded(TopicKind.MODEL_LATEST)
        if s.header.round_id == 1 and isinstance(s.body, GlobalModel)
    ]
    if not judge.add(
        bool(models),
        "§5.6",
        "round 1 publishes a model",
        "" if models else f"the round {'failed' if outcome == 'failed' else 'timed out'}",
    ):
        return
    model = models[-1]
    cfg: MaskConfig = params.mask
    total = np.zeros(update_words(params.vector_length), dtype=cfg.dtype)
    for words in contributions:
        total += words
    n = len(contributions)
    values, weight_sum = decode_aggregate(total, n, cfg)
    expected = ServerOptimizer(OptimizerConfig()).step(initial, values / weight_sum)
    metrics = dict(model.metrics)
    diff = float(np.max(np.abs(model.weights.astype(np.float64) - expected)))
    ok = metrics.get("updates") == n and diff == 0.0
    judge.add(
        ok,
        "§5.6 §7.6 §8",
        "the model is the weighted mean of the updates",
        ""
        if ok
        else f"{metrics.get('updates')} updates (expected {n}), max |w − expected| = {diff:.3g} "
        f"(error bound {error_bound(n, weight_sum, cfg):.3g})",
    )
