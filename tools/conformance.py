"""``maskfl-conformance``: check a participant implementation against a real coordinator.

For each scenario (the participant as *summer*, then as *updater*; ``--roles groups``
adds an updater in a round of g = 2 mask groups) the tool

1. provisions a fresh fleet with ``maskfl-provision`` (fleet CA, broker TLS CA,
   mosquitto config and ACL, bundles for the participant, five helpers and a
   monitor) in a work directory, and starts that mosquitto on loopback;
2. picks the initial seed so that round 1's tickets (docs/protocol.md §4) make
   the participant a summer (or an updater) and the helpers fill the other roles,
   with ``p_sum`` and ``p_update`` fixed in the coordinator's config; the seed is
   also chosen so that the usual ticket mistakes (big-endian, no personalisation)
   would give the participant the other role, so they cannot pass by chance;
3. starts a monitor that reads every topic of the fleet, the helpers (protocol-
   level participants of :mod:`maskfl.testing.participants` with known deltas), the
   participant command, and the coordinator;
4. waits for round 1 to publish its model (or fail), then judges every message
   the participant sent against the specification and prints one line per rule:
   ``ok`` or ``FAIL`` with the section of docs/protocol.md it breaks.

The command runs with ``MASKFL_BUNDLE`` (the device's bundle directory, with its
``agent.toml``), ``MASKFL_DEVICE_ID``, ``MASKFL_BROKER_HOST`` and
``MASKFL_BROKER_PORT`` in its environment, e.g.::

    maskfl-conformance --participant 'maskfl-agent run --config "$MASKFL_BUNDLE/agent.toml"'

This is a test bench: the monitor may read every topic and the tool opens the
participant's sealed seed with its own summer's key to check the encoding, which
no party of a real fleet can do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from maskfl.agent.config import load_config
from maskfl.agent.daemon import build_mqtt_config
from maskfl.agent.identity import load_identity
from maskfl.broker_coordinator.config import OptimizerConfig
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.models import shipped_model
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
    weights_digest,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.sortition import Task, group_of, next_round_seed, select_task, threshold
from maskfl.protocol.sortition import ticket as compute_ticket
from maskfl.protocol.topics import TopicKind, parse_topic
from maskfl.protocol.version import version_text
from maskfl.testing.participants import Behaviour, SimParticipant
from maskfl.tools._demo_fleet import (
    OBSERVER,
    DemoFleet,
    FleetSettings,
    _edit_toml,
    console_script,
    provision_fleet,
)
from maskfl.tools._demo_watch import observer_config
from maskfl.tools._supervise import Supervisor
from maskfl.transport import MqttConfig, MqttTransport

__all__ = ["Check", "main", "run_conformance"]

HELPERS = 5
P_SUM = 0.25
P_UPDATE = 1.0
MODEL = "mlp"
ROLES = ("summer", "updater")
GROUPS_ROLE = "groups"
"""The optional scenario: the participant updates in a round of g = 2 mask groups (one
helper sums in each), so it must seal a different seed to each group's summer (§4.4)."""
ALL_ROLES = (*ROLES, GROUPS_ROLE)
_MAX_IN = 64 * 1024 * 1024


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


# --- choosing the seed ---------------------------------------------------------------------


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


def _task_with(ticket: Callable[[bytes, str, bytes], int], seed: bytes, pk: bytes) -> Task:
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
        if all(_task_with(v, seed, participant) is not wanted for v in WRONG_TICKETS.values()):
            return initial
    raise MaskflError("found no seed with the wanted roles")  # pragma: no cover


# --- one scenario ------------------------------------------------------------------------------


def _pet(role: str) -> dict[str, Any]:
    # five updaters either way: five helpers, or the participant and four (three with
    # g = 2, where two helpers sum); target only bounds [masking] groups (prob is set)
    summers = 2 if role == GROUPS_ROLE else 1
    updaters = HELPERS + 1 - summers if role == GROUPS_ROLE else HELPERS
    return {
        "sum": {
            "prob": P_SUM,
            "target": 3,
            "count_min": summers,
            "count_max": summers,
            "time_min_s": 0.0,
            "time_max_s": 60.0,
        },
        "update": {
            "prob": P_UPDATE,
            "count_min": updaters,
            "count_max": updaters,
            "time_min_s": 0.0,
            "time_max_s": 90.0,
        },
        "sum2": {
            "count_min": summers,
            "count_max": summers,
            "time_min_s": 0.0,
            "time_max_s": 60.0,
        },
        "alive_window_s": 30.0,
        "round_pause_s": 0.5,
        "failure_pause_s": 1.0,
    }


def _allow_monitor(fleet: DemoFleet) -> None:
    """The monitor (the provisioned observer) may read every topic of the fleet."""
    text = fleet.broker_conf.read_text(encoding="utf-8")
    found = re.search(r"^acl_file\s+(.+)$", text, re.MULTILINE)
    if found is None:
        raise MaskflError(f"{fleet.broker_conf} names no acl_file")
    acl = Path(found.group(1).strip())
    with acl.open("a", encoding="utf-8") as out:
        out.write(
            f"\n# maskfl-conformance: the monitor reads the whole fleet\nuser {OBSERVER}\n"
            f"topic read maskfl/v1/{fleet.fleet}/#\n"
        )


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
                    out.append((rec.topic, decode_message(payload, max_size=_MAX_IN)))
            except RemoteProtocolError:
                continue
        return out


def _load(fleet: DemoFleet, device: str) -> tuple[Identity, Any]:
    config = load_config(fleet.agent_toml(device))
    ident = load_identity(config.device)
    return ident.identity, build_mqtt_config(config, None)


RoundSeen = Literal["model", "failed", "timeout"]
"""What the monitor saw of round 1: its model, round 2 starting (so it failed), or neither."""


async def _wait_outcome(monitor: Monitor, limit_s: float) -> RoundSeen:
    """'model' when round 1 published its model, 'failed' when round 2 started, else 'timeout'."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for _, signed in monitor.decoded(TopicKind.MODEL_LATEST):
            if signed.header.round_id == 1:
                return "model"
        for _, signed in monitor.decoded(TopicKind.ROUND):
            if signed.header.round_id >= 2:
                return "failed"
        monitor.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(monitor.changed.wait(), 1.0)
    return "timeout"


async def run_scenario(
    role: str, command: str, workdir: Path, *, say: Callable[[str], None], limit_s: float
) -> list[Check]:
    """Provision, start everything, run round 1 with the participant as ``role``, judge."""
    judge = Judge(role)
    root = workdir / role
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model = shipped_model(MODEL)
    initial = model.initial_weights()
    settings = FleetSettings(
        devices=1 + HELPERS, model=MODEL, num_params=model.num_params, epochs=1, heartbeat_s=2.0
    )
    say(f"[{role}] provisioning a fleet in {root}")
    fleet = await asyncio.to_thread(
        provision_fleet, root, settings, pet=_pet(role), initial=initial
    )
    _allow_monitor(fleet)
    device, helper_ids = fleet.device_ids[0], fleet.device_ids[1:]
    me, _ = _load(fleet, device)
    helpers = [_load(fleet, h) for h in helper_ids]
    initial_seed = choose_initial_seed(
        role, me.public_key, [h.public_key for h, _ in helpers], weights_digest(initial)
    )
    _edit_toml(fleet.coordinator_toml, {"pet": {"initial_seed": initial_seed.hex()}})
    if role == GROUPS_ROLE:
        _edit_toml(fleet.coordinator_toml, {"masking": {"groups": 2}})
    rng = np.random.default_rng(int.from_bytes(initial_seed[:8], "little"))
    plans: dict[str, tuple[npt.NDArray[np.float32], float]] = {
        str(h.device_id): (
            rng.uniform(-0.02, 0.02, model.num_params).astype(np.float32),
            round(float(rng.uniform(0.3, 1.0)), 3),
        )
        for h, _ in helpers
    }

    def plan(device_id: str) -> Callable[[int, int], tuple[npt.NDArray[np.float32], float]]:
        return lambda _rid, _m: plans[device_id]

    with Supervisor(root / "logs") as sup:
        await asyncio.to_thread(sup.start_broker, fleet.broker_conf, fleet.broker_port)
        monitor = Monitor(MqttTransport(_monitor_config(fleet)), fleet.fleet)
        await monitor.start()
        sims = [
            SimParticipant(
                h,
                ca_public_key=b"",
                host="127.0.0.1",
                port=fleet.broker_port,
                behaviour=Behaviour(delta=plan(h.device_id)),
                mqtt=mqtt,
            )
            for h, mqtt in helpers
        ]
        for sim in sims:
            sim.ca = _ca_key(fleet, sim.device)
            await sim.start()
        env = {
            "MASKFL_BUNDLE": str(fleet.device_dir(device)),
            "MASKFL_DEVICE_ID": device,
            "MASKFL_BROKER_HOST": "127.0.0.1",
            "MASKFL_BROKER_PORT": str(fleet.broker_port),
        }
        participant = sup.start("participant", ["/bin/sh", "-c", command], env=env)
        say(f"[{role}] participant {device}: pid {participant.pid}, log {participant.log_path}")
        await asyncio.sleep(1.0)
        sup.start(
            "coordinator",
            [
                *console_script("maskfl-coordinator", "maskfl.broker_coordinator.cli"),
                "run",
                "--config",
                str(fleet.coordinator_toml),
            ],
        )
        outcome = await _wait_outcome(monitor, limit_s)
        say(f"[{role}] round 1: {outcome}")
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        await monitor.stop()
    _judge(
        judge,
        role=role,
        device=device,
        me=me,
        monitor=monitor,
        sims=sims,
        initial=initial,
        outcome=outcome,
        log_tail=participant.log_tail(5),
        ca=_ca_key(fleet, device),
    )
    return judge.checks


def _monitor_config(fleet: DemoFleet) -> MqttConfig:
    """The provisioned read-only observer's TLS identity (the ACL is widened for it)."""
    return dataclasses.replace(
        observer_config(fleet.observer_dir, "127.0.0.1", fleet.broker_port),
        max_incoming_payload=_MAX_IN,
        incoming_queue_size=100_000,
    )


def _ca_key(fleet: DemoFleet, device: str) -> bytes:
    config = load_config(fleet.agent_toml(device))
    return load_identity(config.device).ca_public_key


# --- judging -------------------------------------------------------------------------------


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


def _judge(
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
    rounds = [s for _, s in monitor.decoded(TopicKind.ROUND) if s.header.round_id == 1]
    if not judge.add(bool(rounds), "§5.2", "round 1 started", "" if rounds else "no ROUND_PARAMS"):
        return
    params = rounds[0].body
    assert isinstance(params, RoundParams)
    pk = me.public_key
    wanted = Task.SUM if role == "summer" else Task.UPDATE
    t_sum = compute_ticket(params.seed, Task.SUM, pk)
    sent = _sent(monitor, device, params)
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
    _check_chunking(judge, monitor, device, params)
    receipts = _receipts(monitor, device)
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
        signed = decode_message(payload, max_size=_MAX_IN)
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
    cfg = params.mask
    words = np.asarray(body.words)
    m = params.vector_length
    if words.size != update_words(m) or words.dtype != cfg.dtype:
        judge.add(False, "§7", "UPDATE words", f"{words.size} words of {words.dtype}")
        return None
    plain: Words = words
    for seed in seeds.values():  # the mask is the sum of the g sub-masks
        plain = np.subtract(plain, mask_stream(seed, words.size, cfg.word_bits))
    n_eval, correct, loss_units = (int(w) for w in plain[m + 1 :])
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
    s_w = cfg.weight_scale
    units = (int(plain[m]) - s_w) % cfg.modulus
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
        else f"the unmasked weight word {int(plain[m])} decodes to a = (word − S_w)/S_w = "
        f"{a:.6g} with S_w = {s_w}; it must be round_half_even(a·S_w) + S_w for the weight "
        "a = min(samples, cap)/cap in (0, 1]",
    )
    if not ok:
        return plain  # the elements cannot be judged without the weight
    signed_t = np.int32 if cfg.word_bits == 32 else np.int64
    values = np.subtract(plain[:m], cfg.dtype(cfg.offset)).view(signed_t)
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
    return plain


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


# --- the command -------------------------------------------------------------------------------


async def run_conformance(
    command: str,
    workdir: Path,
    *,
    roles: tuple[str, ...] = ROLES,
    say: Callable[[str], None] = print,
    limit_s: float = 240.0,
) -> list[Check]:
    checks: list[Check] = []
    for role in roles:
        checks += await run_scenario(role, command, workdir, say=say, limit_s=limit_s)
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-conformance",
        description="Check a maskfl participant implementation against a real coordinator "
        "and mosquitto on loopback (docs/protocol.md §14).",
        epilog="example:\n  maskfl-conformance --participant "
        "'maskfl-agent run --config \"$MASKFL_BUNDLE/agent.toml\"'\n\n"
        "The command gets MASKFL_BUNDLE (its provisioned bundle directory), MASKFL_DEVICE_ID,\n"
        "MASKFL_BROKER_HOST and MASKFL_BROKER_PORT. Exit status: 0 every check passed,\n"
        "1 a check failed, 2 the bench itself could not run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-conformance"))
    parser.add_argument(
        "--participant", required=True, metavar="COMMAND", help="shell command of the participant"
    )
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help="scenarios to run, comma separated (default: summer,updater; also groups: an "
        "updater in a round of g = 2 mask groups, sealing a seed per group)",
    )
    parser.add_argument("--workdir", type=Path, help="keep fleets and logs here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the checks as JSON")
    parser.add_argument(
        "--timeout", type=float, default=240.0, help="seconds per round (default 240)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    unknown = [r for r in roles if r not in ALL_ROLES]
    if unknown or not roles:
        print(f"--roles: unknown {unknown}; choose from {', '.join(ALL_ROLES)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="maskfl-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        checks = asyncio.run(
            run_conformance(args.participant, workdir, roles=roles, limit_s=args.timeout)
        )
    except (MaskflError, OSError) as exc:
        print(f"maskfl-conformance: cannot run the bench: {exc}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(
        f"{len(checks) - len(failed)} of {len(checks)} checks passed; logs and fleets in {workdir}"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in checks], indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
