"""Simulated participants: enrolled devices that speak the PET protocol, and nothing more.

No TFLite and no agent: a :class:`SimParticipant` speaks the PET protocol with
:mod:`maskfl.protocol` over :mod:`maskfl.transport` and sends whatever delta
its :class:`Behaviour` says, so tests, the benchmarks and the conformance bench can
check that the coordinator publishes exactly the weighted mean of what was sent
(:func:`expected_mean`). Its identity comes from :class:`maskfl.testing.fleet.SimFleet`
(or a provisioned bundle).

What a participant saw and did is public: ``roles``, ``sent``, ``receipts``,
``models``, ``sum_dicts``, ``seed_dicts``, ``ephemeral`` and ``errors``, each by round
where it belongs to one; :meth:`SimParticipant.arrived` is the hook a subclass
overrides to time what arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.protocol.chunking import split_payload
from maskfl.protocol.crypto import EphemeralKeyPair, new_seed, open_seed, seal_seed
from maskfl.protocol.dp import masked_update
from maskfl.protocol.errors import CryptoError, MaskflError
from maskfl.protocol.identity import Identity
from maskfl.protocol.ids import Role
from maskfl.protocol.masking import (
    NO_EVALUATION,
    EvalCounts,
    Words,
    aggregate_mask,
    update_words,
)
from maskfl.protocol.messages import (
    GlobalModel,
    Receipt,
    RoundParams,
    SeedDict,
    Sum,
    Sum2,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.sortition import Task, select_task
from maskfl.protocol.topics import TopicKind, Topics, parse_topic
from maskfl.transport import MqttConfig, MqttTransport, Transport

__all__ = [
    "Behaviour",
    "Sent",
    "SimParticipant",
    "expected_mean",
    "start_all",
    "stop_all",
    "wait_for",
]

F32 = npt.NDArray[np.float32]
_MAX_IN = 64 * 1024 * 1024


@dataclass
class Behaviour:
    """What a simulated participant does. ``delta(round_id, m)`` gives its update."""

    delta: Callable[[int, int], tuple[F32, float]] | None = None
    skip_sum2: bool = False
    sum2_delay_s: float = 0.0
    update_delay_s: float = 0.0
    corrupt_seed_for_all_summers: bool = False
    send_heartbeat: bool = True
    select: Callable[[RoundParams, bytes], Task] | None = None
    """Replaces the sortition (``select_task``): a deliberately wrong participant."""
    one_seed_for_all_groups: bool = False
    """Masks with the same seed for every mask group (fault: a group's summers could
    then open the others' sub-masks; the sum still unmasks, so only a check sees it)."""
    tamper_update: Callable[[Words, RoundParams], None] | None = None
    """Changes the masked words in place before they are signed (fault injection)."""
    evaluation: Callable[[int], EvalCounts] | None = None
    """Its federated evaluation counts for a round (default: none, zero words)."""
    update_gate: asyncio.Event | None = None
    """The update is sent only once this event is set (a test holds it back to a chosen
    instant; never set, the updater drops out after reading the sum dictionary)."""


@dataclass
class Sent:
    delta: F32
    weight: float
    digest: bytes
    seeds: tuple[bytes, ...] = ()
    """One seed per mask group (the sub-mask of group j is ChaCha20(seeds[j]))."""


class SimParticipant:
    """One enrolled device speaking the protocol over a real broker."""

    def __init__(
        self,
        identity: Identity,
        *,
        ca_public_key: bytes,
        host: str,
        port: int,
        behaviour: Behaviour | None = None,
        mqtt: MqttConfig | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.identity = identity
        self.device = identity.device_id
        self.fleet = identity.fleet
        self.topics = Topics(self.fleet)
        self.ca = ca_public_key
        self.behaviour = behaviour or Behaviour()
        self.transport: Transport = transport or MqttTransport(
            mqtt
            or MqttConfig(
                host=host,
                port=port,
                client_id=self.device,  # as an agent: its device id
                max_incoming_payload=_MAX_IN,
                incoming_queue_size=10_000,
            )
        )
        self.sent: dict[int, Sent] = {}
        self.receipts: list[Receipt] = []
        self.models: list[GlobalModel] = []
        self.roles: dict[int, Task] = {}
        self.ephemeral: dict[int, EphemeralKeyPair] = {}
        self.errors: list[str] = []
        self.sum_dicts: dict[int, SumDict] = {}
        """The sum dictionary of each round, as it arrived (updaters read it)."""
        self.seed_dicts: dict[int, SeedDict] = {}
        """This summer's seed dictionary of each round, as it arrived."""
        self._sums: dict[int, asyncio.Future[SumDict]] = {}
        self._seeds: dict[int, asyncio.Future[SeedDict]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._seen_rounds: set[int] = set()

    async def start(self, *, models: bool = True) -> None:
        """Connect and subscribe like a device. Unlike an agent, which fetches a model
        only when it trains, a simulated participant watches every global model (tests
        read them from ``models``); ``models=False`` leaves the model topics out (a
        benchmark that does not want the models' fan-out to load the round)."""
        await self.transport.connect()
        filters = [*self.topics.agent_filters(self.device), self.topics.model_latest_filter()]
        if not models:
            filters = [f for f in filters if "/model/" not in f]
        await self.transport.subscribe(filters, qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"sim {self.device}")

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._reader] if self._reader else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.transport.disconnect()

    def _future(self, table: dict[int, asyncio.Future[Any]], round_id: int) -> asyncio.Future[Any]:
        if round_id not in table:
            table[round_id] = asyncio.get_running_loop().create_future()
        return table[round_id]

    async def _read(self) -> None:
        async for msg in self.transport.messages():
            if not msg.payload:
                continue
            try:
                parsed = parse_topic(msg.topic)
                signed = decode_message(msg.payload, max_size=_MAX_IN)
            except MaskflError as exc:
                self.errors.append(f"{msg.topic}: {exc}")
                continue
            body = signed.body
            rid = int(signed.header.round_id)
            match parsed.kind:
                case TopicKind.ROUND if isinstance(body, RoundParams):
                    if rid not in self._seen_rounds:
                        self._seen_rounds.add(rid)
                        self.arrived(parsed.kind, rid)
                        self._spawn(self._round(body, signed.header.sender))
                case TopicKind.SUMS if isinstance(body, SumDict):
                    self._deliver(self.sum_dicts, self._sums, parsed.kind, rid, body)
                case TopicKind.SEEDS if isinstance(body, SeedDict):
                    self._deliver(self.seed_dicts, self._seeds, parsed.kind, rid, body)
                case TopicKind.RECEIPTS if isinstance(body, Receipt):
                    self.receipts.append(body)
                case TopicKind.MODEL_LATEST if isinstance(body, GlobalModel):
                    self.models.append(body)
                case _:
                    pass

    def _deliver(
        self,
        record: dict[int, Any],
        waiting: dict[int, asyncio.Future[Any]],
        kind: TopicKind,
        rid: int,
        body: Any,
    ) -> None:
        """The first dictionary of a round is recorded and handed to the waiting phase."""
        if rid in record:
            return
        record[rid] = body
        self.arrived(kind, rid)
        fut = self._future(waiting, rid)
        if not fut.done():
            fut.set_result(body)

    def arrived(self, kind: TopicKind, round_id: int) -> None:
        """Called once per round when its parameters (``ROUND``), the sum dictionary
        (``SUMS``) or this summer's seed dictionary (``SEEDS``) first arrive, before the
        participant acts on them. Does nothing; a subclass overrides it to time them."""

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self, topic: str, payload: bytes, chunk_size: int) -> None:
        for frame in split_payload(payload, chunk_size):
            await self.transport.publish(topic, frame, qos=1)

    def sign(self, body: Any, round_id: int) -> bytes:
        return encode_message(
            body, fleet=self.fleet, round_id=round_id, signing_key=self.identity.signing_key
        )

    async def _round(self, params: RoundParams, sender: bytes) -> None:
        if params.certificate.public_key != sender or params.certificate.role != Role.COORDINATOR:
            self.errors.append("round parameters not signed by the coordinator certificate")
            return
        if self.behaviour.select is not None:
            task = self.behaviour.select(params, self.identity.public_key)
        else:
            task = select_task(params.seed, self.identity.public_key, params.p_sum, params.p_update)
        rid = int(params.round_id)
        self.roles[rid] = task
        try:
            if task is Task.SUM:
                await self._summer(params)
            elif task is Task.UPDATE:
                await self._updater(params)
        except asyncio.CancelledError:
            raise
        except MaskflError as exc:
            self.errors.append(f"round {rid}: {exc}")

    async def _summer(self, params: RoundParams) -> None:
        rid = int(params.round_id)
        keys = EphemeralKeyPair.generate()
        self.ephemeral[rid] = keys
        raw = self.sign(Sum(self.identity.certificate, keys.public_key), rid)
        await self.publish(self.topics.sum(rid, self.device), raw, params.chunk_size)
        seed_dict: SeedDict = await self._future(self._seeds, rid)
        if seed_dict.group != params.group_of(self.identity.public_key):
            self.errors.append(f"round {rid}: seed dictionary names group {seed_dict.group}")
            return
        if self.behaviour.skip_sum2:
            return
        if self.behaviour.sum2_delay_s:
            await asyncio.sleep(self.behaviour.sum2_delay_s)
        seeds, failed = [], []
        for digest, sealed in sorted(seed_dict.sealed_seeds.items()):
            try:
                seeds.append(open_seed(sealed, keys.private_key))
            except CryptoError:
                failed.append(digest)
        words = await asyncio.to_thread(
            aggregate_mask, seeds, update_words(params.vector_length), params.mask.word_bits
        )
        raw = self.sign(Sum2(self.identity.certificate, words, tuple(sorted(failed))), rid)
        await self.publish(self.topics.sum2(rid, self.device), raw, params.chunk_size)

    async def _updater(self, params: RoundParams) -> None:
        rid = int(params.round_id)
        sum_dict: SumDict = await self._future(self._sums, rid)
        sums = open_sum_dict(
            sum_dict,
            fleet=self.fleet,
            round_id=rid,
            ca_public_key=self.ca,
            now=time.time(),
            revocations=None,
            groups=params.groups,
            round_seed=params.seed,
        )
        if self.behaviour.update_delay_s:
            await asyncio.sleep(self.behaviour.update_delay_s)
        if self.behaviour.update_gate is not None:
            await self.behaviour.update_gate.wait()
        m = params.vector_length
        if self.behaviour.delta is not None:
            delta, weight = self.behaviour.delta(rid, m)
        else:
            rng = np.random.default_rng()
            delta = rng.uniform(-0.5, 0.5, m).astype(np.float32)
            weight = float(rng.uniform(0.2, 1.0))
        seeds = tuple(new_seed() for _ in range(params.groups))
        if self.behaviour.one_seed_for_all_groups:
            seeds = (seeds[0],) * params.groups
        evaluation = (
            NO_EVALUATION if self.behaviour.evaluation is None else (self.behaviour.evaluation(rid))
        )
        words = await asyncio.to_thread(masked_update, params, delta, weight, seeds, evaluation)
        if self.behaviour.tamper_update is not None:
            self.behaviour.tamper_update(words, params)
        sealed = {}
        for s in sums:
            if self.behaviour.corrupt_seed_for_all_summers:
                sealed[s.certificate.public_key] = bytes(80)
            else:
                group = params.group_of(s.certificate.public_key)
                sealed[s.certificate.public_key] = seal_seed(seeds[group], s.ephemeral_pk)
        raw = self.sign(Update(self.identity.certificate, sealed, words), rid)
        digest = decode_message(raw, max_size=len(raw)).digest
        self.sent[rid] = Sent(delta, weight, digest, seeds)
        await self.publish(self.topics.update(rid, self.device), raw, params.chunk_size)


def expected_mean(sent: list[Sent], bound: float) -> npt.NDArray[np.float64]:
    """``Σ a_k·clip(δ_k) / Σ a_k``: what the coordinator must publish as the mean delta."""
    num = np.zeros(sent[0].delta.size, dtype=np.float64)
    den = 0.0
    for s in sent:
        num += s.weight * np.clip(s.delta.astype(np.float64), -bound, bound)
        den += s.weight
    return num / den


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms of real time until true; TimeoutError naming ``what``.

    It polls because no one event covers what callers wait on: besides these
    participants' state, the in-process coordinator's runner and enrollment, a
    killer thread's ``threading.Event``, and the database of a coordinator running
    in another process (crash tests). Round logic on a fake clock waits on events
    instead (``tests/support/harness.py``, ``Bench.until``).
    """
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def start_all(participants: list[SimParticipant]) -> None:
    await asyncio.gather(*(p.start() for p in participants))


async def stop_all(participants: list[SimParticipant]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.gather(*(p.stop() for p in participants), return_exceptions=True)
