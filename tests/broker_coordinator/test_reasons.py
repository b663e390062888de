"""Every documented reason code is produced by some input, and every code is documented.

The docs are the contract: docs/protocol.md §10.2 (the reason table) and
docs/wire-format.md §4.7 (the list in the RECEIPT format) must name exactly the
codes of :class:`~maskfl.protocol.errors.Reason`, and a real coordinator (through
the in-memory harness, an honest round running) must answer one crafted message
per code with a receipt carrying that code: the code is the round's decision, not
the transport's. The cases the docs single out are included:
a certificate of a foreign CA and a topic naming another device than the
certificate (both ``unenrolled``), an earlier round's UPDATE replayed on the
current round's topic (``wrong_round``), and a heartbeat, which gets no receipt
whatever its payload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.errors import Reason
from maskfl.protocol.identity import Identity
from maskfl.protocol.ids import Role
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    Receipt,
    RoundParams,
    Sum,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.phases import Phase
from maskfl.protocol.sortition import Task, select_task
from maskfl.protocol.topics import Topics
from maskfl.testing.fleet import SimFleet, first_round_seed
from maskfl.transport import Transport
from tests.broker_coordinator.support import P_SUM, M, trained
from tests.broker_coordinator.test_round_harness import phase
from tests.support.harness import Harness, harness

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{2,3} ", text[start + len(heading) :], re.MULTILINE)
    return text[start : start + len(heading) + (nxt.start() if nxt else len(text))]


def test_every_reason_code_is_documented_and_nothing_else() -> None:
    codes = {str(r) for r in Reason}
    table = _section((DOCS / "protocol.md").read_text(), "### 10.2 Reason table")
    in_table = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert in_table == codes
    receipt = _section((DOCS / "wire-format.md").read_text(), "### 4.7 RECEIPT")
    listed = receipt.split("Reason codes:", 1)[1].split(".", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == codes


class Prober:
    """One MQTT client that publishes anything anywhere and reads every receipt."""

    def __init__(self, transport: Transport, fleet: str) -> None:
        self.t = transport
        self.topics = Topics(fleet)
        self.receipts: dict[str, list[Receipt]] = {}
        self.params: dict[int, RoundParams] = {}
        self.sum_dicts: list[SumDict] = []
        self.sent: dict[str, list[tuple[str, bytes]]] = {"sum": [], "update": []}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        p = self.topics.prefix
        await self.t.subscribe(
            [
                f"{p}round",
                f"{p}round/+/sums",
                f"{p}receipts/+",
                f"{p}round/+/sum/+",
                f"{p}round/+/update/+",
            ]
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.t.messages():
            if not msg.payload:
                continue
            level = msg.topic[len(self.topics.prefix) :].split("/")
            if level[0] == "receipts":
                body = decode_message(msg.payload, max_size=1 << 16).body
                assert isinstance(body, Receipt)
                self.receipts.setdefault(level[1], []).append(body)
            elif level == ["round"]:
                params = decode_message(msg.payload, max_size=1 << 20).body
                assert isinstance(params, RoundParams)
                self.params[int(params.round_id)] = params
            elif level[-1] == "sums":
                body = decode_message(msg.payload, max_size=1 << 20).body
                assert isinstance(body, SumDict)
                self.sum_dicts.append(body)
            elif level[2] in self.sent:
                self.sent[level[2]].append((msg.topic, msg.payload))

    def answers(self, device: str, digest: bytes) -> list[Receipt]:
        return [r for r in self.receipts.get(device, []) if r.message_digest == digest]

    def reason(self, device: str, digest: bytes) -> str | None:
        """The last answer ``device`` got for ``digest``."""
        answers = self.answers(device, digest)
        if not answers:
            return None
        return "accepted" if answers[-1].accepted else str(answers[-1].reason)

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


def _with_task(fleet: SimFleet, seed: bytes, task: Task, name: str, **kw: object) -> Identity:
    """An enrolled identity whose round-1 ticket gives it ``task``."""
    while True:
        key = SigningKey.generate()
        if select_task(seed, bytes(key.verify_key), P_SUM, 1.0) is task:
            return fleet.identity(name, key=key, **kw)  # type: ignore[arg-type]


def _sum(ident: Identity, round_id: int = 1, fleet: str | None = None) -> bytes:
    return encode_message(
        Sum(ident.certificate, os.urandom(32)),
        fleet=fleet or ident.certificate.fleet,
        round_id=round_id,
        signing_key=ident.signing_key,
    )


def _update(ident: Identity, sealed: dict[bytes, bytes]) -> bytes:
    words = mask_update(np.full(M, 0.5, np.float32), 1.0, new_seed(), MaskConfig(1.0, 100, 32))
    return encode_message(
        Update(ident.certificate, sealed, words),
        fleet=ident.certificate.fleet,
        round_id=1,
        signing_key=ident.signing_key,
    )


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw[:152]).digest()


def _raw_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


async def test_a_real_coordinator_answers_every_reason_code(
    tmp_path: Path,
) -> None:
    summers, updaters = 2, 3
    async with harness(
        tmp_path,
        summers=summers,
        updaters=updaters,
        # Sum and update stay open past their honest messages (count_max is one more
        # than the honest participants) until the test moves the clock past time_min,
        # so that phase-dependent probes land in them.
        pet={
            "sum": {"count_max": summers + 1, "time_min_s": 2.0},
            "update": {"count_max": updaters + 1, "time_min_s": 2.0},
            "max_rounds": 2,
        },
        extra={"fleet": {"revocations_file": "revocations.bin"}},
    ) as h:
        await _answers_every_reason_code(h)


async def _answers_every_reason_code(h: Harness) -> None:  # noqa: PLR0915 one message per reason code, in order
    setup = h.setup
    summers = len(setup.summers)
    fleet = setup.fleet
    name = fleet.fleet
    seed1 = first_round_seed(bytes(32), setup.initial)
    summer_ticket = _with_task(fleet, seed1, Task.SUM, "p-summer")
    updater_ticket = _with_task(fleet, seed1, Task.UPDATE, "p-updater")
    expired = _with_task(fleet, seed1, Task.SUM, "p-expired", not_after=int(time.time()) - 60)
    revoked = _with_task(fleet, seed1, Task.SUM, "p-revoked")
    fleet.revocations(setup.config_path.parent / "revocations.bin", [revoked.certificate.serial], 1)
    foreign = SimFleet(fleet=name).identity("p-foreign")  # another CA, same fleet name
    other_fleet = SimFleet(fleet="otherfleet").identity("p-otherfleet")
    coordinator_role = fleet.identity("p-coordinator", role=Role.COORDINATOR)

    ca = fleet.ca_public_key
    honest = [h.participant(i) for i in setup.summers + setup.updaters]
    prober = Prober(await h.client("prober"), name)
    await prober.start()
    await h.start(honest)
    t = Topics(name)
    expect: dict[str, tuple[str, bytes, str]] = {}
    """what -> (device answered, digest, reason)"""

    async def probe(what: str, topic: str, payload: bytes, digest: bytes, reason: str) -> None:
        device = topic.rsplit("/", 1)[1]
        answered_before[what] = len(prober.answers(device, digest))
        await prober.t.publish(topic, payload)
        expect[what] = (device, digest, reason)
        sent_in[what] = phase(h)

    answered_before: dict[str, int] = {}
    sent_in: dict[str, Phase] = {}

    def done(in_phase: str | None = None) -> bool:
        """Every probe (sent in ``in_phase``) has its answer; a wrong one fails below."""
        return all(
            len(prober.answers(d, g)) > answered_before[what]
            for what, (d, g, _) in expect.items()
            if in_phase is None or sent_in[what] == in_phase
        )

    try:
        await h.start_coordinator()
        await h.until(lambda: 1 in prober.params, "round 1")
        # -- the sum phase is open --------------------------------------------
        garbage = os.urandom(700)
        await probe("garbage", t.sum(1, "p-summer"), garbage, _raw_digest(garbage), "malformed")
        raw = _sum(summer_ticket)
        await probe(
            "SUM on an update topic", t.update(1, "p-summer"), raw, _digest(raw), "malformed"
        )
        raw = _sum(other_fleet, fleet="otherfleet")
        await probe("another fleet", t.sum(1, "p-otherfleet"), raw, _digest(raw), "wrong_fleet")
        raw = _sum(summer_ticket, round_id=7)
        await probe("a future round", t.sum(7, "p-summer"), raw, _digest(raw), "wrong_round")
        raw = _update(updater_ticket, {})
        await probe(
            "UPDATE in the sum phase",
            t.update(1, "p-updater"),
            raw,
            _digest(raw),
            "wrong_phase",
        )
        forged = bytearray(_sum(summer_ticket))
        forged[160] ^= 0xFF  # inside the header signature
        await probe(
            "forged signature",
            t.sum(1, "p-summer"),
            bytes(forged),
            _raw_digest(forged),
            "bad_signature",
        )
        raw = _sum(foreign)
        await probe("foreign CA", t.sum(1, "p-foreign"), raw, _digest(raw), "unenrolled")
        raw = _sum(summer_ticket)
        await probe(
            "topic names another device",
            t.sum(1, "p-updater"),
            raw,
            _digest(raw),
            "unenrolled",
        )
        raw = _sum(revoked)
        await probe("revoked", t.sum(1, "p-revoked"), raw, _digest(raw), "revoked")
        raw = _sum(expired)
        await probe("expired", t.sum(1, "p-expired"), raw, _digest(raw), "expired")
        big = os.urandom(100_000)
        await probe("oversize", t.sum(1, "p-summer"), big, _raw_digest(big), "oversize")
        raw = _sum(summer_ticket)[:-10]
        await probe("truncated", t.sum(1, "p-summer"), raw, _raw_digest(raw), "wrong_length")
        raw = _sum(updater_ticket)
        await probe("SUM from an updater", t.sum(1, "p-updater"), raw, _digest(raw), "not_eligible")
        raw = _sum(coordinator_role)
        await probe(
            "coordinator certificate",
            t.sum(1, "p-coordinator"),
            raw,
            _digest(raw),
            "wrong_role",
        )
        heartbeat = os.urandom(300)  # a heartbeat gets no receipt, whatever it holds
        await prober.t.publish(t.status("p-heartbeat"), heartbeat)
        # A replay of an accepted SUM.
        honest_sums = lambda: [s for s in prober.sent["sum"] if "/sum/dev-s" in s[0]]  # noqa: E731
        await h.until(lambda: len(honest_sums()) == summers, "the honest sums")
        topic, raw = honest_sums()[0]
        device = topic.rsplit("/", 1)[1]
        await h.until(lambda: prober.reason(device, _digest(raw)) == "accepted", "its receipt")
        await probe("replayed SUM", topic, raw, _digest(raw), "duplicate")
        await h.until(lambda: done("sum"), "every sum-phase receipt")
        h.advance(2.0)  # time_min: the sum phase closes
        # -- the update phase is open -----------------------------------------
        await h.until(lambda: bool(prober.sum_dicts), "the sum dictionary")
        raw = _sum(summer_ticket)
        await probe(
            "SUM in the update phase", t.sum(1, "p-summer"), raw, _digest(raw), "phase_closed"
        )
        opened = open_sum_dict(
            prober.sum_dicts[-1],
            fleet=name,
            round_id=1,
            ca_public_key=ca,
            now=time.time(),
            revocations=None,
        )
        sealed = {s.certificate.public_key: seal_seed(new_seed(), s.ephemeral_pk) for s in opened}
        sealed[bytes(SigningKey.generate().verify_key)] = bytes(80)
        raw = _update(updater_ticket, sealed)
        await probe(
            "seed sealed to a non-summer",
            t.update(1, "p-updater"),
            raw,
            _digest(raw),
            "unknown_summer",
        )
        await h.until(
            lambda: all(p.receipts for p in honest[summers:]) and done("update"),
            "every update-phase receipt",
        )
        h.advance(2.0)  # time_min: the update phase closes
        # -- round 2: an earlier round's UPDATE on the current round's topic -------
        await h.until(lambda: all(trained(p) for p in honest), "the global model")
        await h.until(lambda: 2 in prober.params, "round 2")
        topic, raw = next(u for u in prober.sent["update"] if "/update/dev-u" in u[0])
        device = topic.rsplit("/", 1)[1]
        await probe(
            "round 1 UPDATE replayed in round 2",
            t.update(2, device),
            raw,
            _digest(raw),
            "wrong_round",
        )
        await h.until(done, "every receipt")
    finally:
        prober.stop()
    got = {what: prober.reason(d, g) for what, (d, g, _) in expect.items()}
    assert got == {what: r for what, (_, _, r) in expect.items()}
    assert {r for _, _, r in expect.values()} == {str(r) for r in Reason}
    assert "p-heartbeat" not in prober.receipts
