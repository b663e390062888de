"""Test support for the agent: a real fleet on disk and a protocol-level coordinator stand-in.

:class:`Fleet` makes a CA, device keys (PEM, 0600), enrollment certificates and an
``agent.toml`` per device, pointing at a test mosquitto. :class:`StandIn` plays the
coordinator side with the protocol functions only (no coordinator code): it signs
round parameters, global models, sum and seed dictionaries and receipts, and hands
the tests every participant message it receives, decoded and signature-checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np

from maskfl.protocol.chunking import is_chunk, split_payload
from maskfl.protocol.crypto import EphemeralKeyPair
from maskfl.protocol.identity import Certificate, Identity
from maskfl.protocol.ids import Role
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.messages import (
    GlobalModel,
    MessageType,
    Receipt,
    RoundParams,
    SeedDict,
    SignedMessage,
    Sum,
    SumDict,
    decode_message,
    encode_message,
    weights_digest,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.sortition import next_round_seed
from maskfl.protocol.topics import TopicKind, Topics, parse_topic
from maskfl.testing.broker import Mosquitto
from maskfl.testing.fleet import SimFleet, write_agent_bundle
from maskfl.transport import MqttConfig, MqttTransport, Transport

FLEET = "testfleet"


def write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


class Fleet(SimFleet):
    """A :class:`SimFleet` with a folder: its CA's public key in ``root/ca.pub`` and the
    device bundles beside it."""

    def __init__(
        self, root: Path, name: str = FLEET, ca: nacl.signing.SigningKey | None = None
    ) -> None:
        super().__init__(name, ca or nacl.signing.SigningKey.generate())
        self.root = root
        self.write_ca(root / "ca.pub")

    @property
    def name(self) -> str:
        return self.fleet

    @property
    def ca(self) -> nacl.signing.SigningKey:
        return self.ca_key

    def device(
        self, device_id: str, broker: Mosquitto, *, extra: str = "", state_dir: Path | None = None
    ) -> Path:
        """Write a bundle for a new key of ``device_id``; returns the path of its agent.toml."""
        return write_agent_bundle(
            self.root / device_id,
            self.identity(device_id),
            fleet=self.name,
            ca_public_key_file=self.root / "ca.pub",
            host=broker.host,
            port=broker.port,
            extra=extra,
            state_dir=state_dir,
        )


@dataclass
class RoundSetup:
    params: RoundParams
    weights: np.ndarray[Any, np.dtype[np.float32]]
    raw: bytes


class StandIn:
    """The coordinator side of the protocol, for tests (an MQTT or a memory client)."""

    def __init__(
        self, fleet: Fleet, broker: Mosquitto | None = None, *, transport: Transport | None = None
    ) -> None:
        """On ``broker`` (a real one), or on ``transport`` (a harness's memory client,
        not connected yet)."""
        self.fleet = fleet
        self.identity = fleet.identity("coordinator", Role.COORDINATOR)
        self.topics = Topics(fleet.name)
        if transport is None:
            assert broker is not None, "a broker or a transport"
            transport = MqttTransport(
                MqttConfig(host=broker.host, port=broker.port, client_id="standin")
            )
        self.transport = transport
        self.queues: dict[TopicKind, asyncio.Queue[tuple[str, SignedMessage]]] = defaultdict(
            asyncio.Queue
        )
        self.raw: dict[TopicKind, list[bytes]] = defaultdict(list)
        self._reassembler: Reassembler[None] = Reassembler(8, 1 << 28, 60)
        self._reader: asyncio.Task[None] | None = None
        self.previous_seed = bytes(32)
        self.gone: list[str] = []
        self._said_gone = asyncio.Event()

    async def __aenter__(self) -> StandIn:
        await self.transport.connect()
        await self.transport.subscribe(self.topics.coordinator_filters(), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.transport.disconnect()

    async def _read(self) -> None:
        async for message in self.transport.messages():
            parsed = parse_topic(message.topic)
            payload = message.payload
            if is_chunk(payload):
                whole = self._reassembler.feed(message.topic, payload, time.monotonic())
                if whole is None:
                    continue
                payload = whole.payload
            self.raw[parsed.kind].append(payload)
            if not payload:  # a status "gone" (last will or goodbye)
                self.gone.append(message.topic)
                self._said_gone.set()
                continue
            signed = decode_message(payload, max_size=1 << 28)
            await self.queues[parsed.kind].put((message.topic, signed))

    async def wait_gone(self, device: str, wait_s: float = 20.0) -> None:
        """Until ``device``'s status topic is emptied (its last will or goodbye)."""
        topic = self.topics.status(device)
        async with asyncio.timeout(wait_s):
            while topic not in self.gone:
                self._said_gone.clear()
                await self._said_gone.wait()

    async def expect(self, kind: TopicKind, wait_s: float = 20.0) -> SignedMessage:
        """The next participant message of ``kind`` (sum, update, sum2, status)."""
        async with asyncio.timeout(wait_s):
            _, signed = await self.queues[kind].get()
        return signed

    def sign(self, body: Any, round_id: int) -> bytes:
        return encode_message(
            body, fleet=self.fleet.name, round_id=round_id, signing_key=self.identity.signing_key
        )

    async def publish(self, topic: str, payload: bytes, *, retain: bool, chunk: int = 0) -> None:
        frames = split_payload(payload, chunk) if chunk and len(payload) > chunk else [payload]
        for frame in frames:
            await self.transport.publish(topic, frame, qos=1, retain=retain)

    def round_params(
        self,
        round_id: int,
        *,
        p_sum: float,
        p_update: float,
        weights: np.ndarray[Any, np.dtype[np.float32]],
        model_id: str = "mlp",
        mask: MaskConfig | None = None,
        chunk_size: int = 256 * 1024,
        seed: bytes | None = None,
        certificate: Certificate | None = None,
    ) -> RoundParams:
        digest = weights_digest(weights)
        return RoundParams(
            round_id=round_id,  # type: ignore[arg-type]
            seed=seed or next_round_seed(self.previous_seed, digest, round_id),
            previous_seed=self.previous_seed,
            p_sum=p_sum,
            p_update=p_update,
            sum_time_max_s=60.0,
            update_time_max_s=60.0,
            sum2_time_max_s=60.0,
            model_id=model_id,
            model_version=round_id - 1,
            model_digest=digest,
            mask=mask or MaskConfig(1.0, 100, 32),
            vector_length=weights.size,
            chunk_size=chunk_size,
            certificate=certificate or self.identity.certificate,
        )

    async def start_round(
        self,
        round_id: int,
        *,
        p_sum: float,
        p_update: float,
        weights: np.ndarray[Any, np.dtype[np.float32]],
        chunk_size: int = 256 * 1024,
        mask: MaskConfig | None = None,
        model_id: str = "mlp",
        graph_digest: bytes = bytes(32),
    ) -> RoundSetup:
        """Publish the global model (naming ``graph_digest``) and the round parameters,
        both retained."""
        params = self.round_params(
            round_id,
            p_sum=p_sum,
            p_update=p_update,
            weights=weights,
            chunk_size=chunk_size,
            mask=mask,
            model_id=model_id,
        )
        model = GlobalModel(
            model_id,
            round_id - 1,
            round_id,  # type: ignore[arg-type]
            bytes(32),
            weights,
            graph_digest=graph_digest,
        )
        await self.publish(
            self.topics.model_latest(model_id), self.sign(model, round_id), retain=True
        )
        raw = self.sign(params, round_id)
        await self.publish(self.topics.round, raw, retain=True)
        return RoundSetup(params, weights, raw)

    async def receipt(
        self,
        device: str,
        message: SignedMessage,
        *,
        accepted: bool = True,
        reason: Any = None,
        detail: str = "",
    ) -> None:
        body = Receipt(message.digest, message.header.message_type, accepted, reason, detail)
        await self.publish(
            self.topics.receipts(device),
            self.sign(body, int(message.header.round_id)),
            retain=False,
        )

    async def publish_sums(self, round_id: int, entries: list[bytes]) -> None:
        await self.publish(
            self.topics.sums(round_id), self.sign(SumDict(tuple(entries)), round_id), retain=True
        )

    async def publish_seeds(
        self, round_id: int, summer: str, summer_pk: bytes, seeds: Mapping[bytes, bytes]
    ) -> None:
        await self.publish(
            self.topics.seeds(round_id, summer),
            self.sign(SeedDict(summer_pk, dict(seeds)), round_id),
            retain=True,
        )


def summer_entry(fleet: Fleet, name: str, round_id: int) -> tuple[Identity, bytes, bytes, bytes]:
    """A fake summer: (identity, ephemeral sk, ephemeral pk, its signed Sum message)."""
    ident = fleet.identity(name)
    keys = EphemeralKeyPair.generate()
    raw = encode_message(
        Sum(ident.certificate, keys.public_key),
        fleet=fleet.name,
        round_id=round_id,
        signing_key=ident.signing_key,
    )
    return ident, keys.private_key, keys.public_key, raw


def message_type(signed: SignedMessage) -> MessageType:
    return signed.header.message_type
