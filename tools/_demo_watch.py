"""What the demo watches: the fleet over MQTT, the coordinator's status and store,
the agents' journals and local logs.

- :class:`Observer` connects to the broker with the demo's own enrolled identity
  (mutual TLS, confined by the ACL to what any device may read) and turns the signed,
  retained round parameters, sum dictionaries and global models into events; every
  coordinator message is checked against the fleet CA like an agent checks it.
- :func:`fetch_status` reads the coordinator's ``/status`` page (phase, counts).
- :class:`StoreSampler` copies, while a round runs, one masked update exactly as the
  coordinator stored it (its update log), before the coordinator prunes it: the
  sample for the privacy check.
- :func:`journal_rounds` reads an agent's journal (role, step and bytes sent per
  round) and :func:`plain_update` its local log of plain deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.agent.steps import Step
from maskfl.broker_coordinator.store import LOGGED_PHASES
from maskfl.protocol.chunking import is_chunk
from maskfl.protocol.errors import CryptoError, RemoteProtocolError, StorageError, sqlite_errors
from maskfl.protocol.identity import Certificate
from maskfl.protocol.keys import public_key_from_pem
from maskfl.protocol.messages import (
    GlobalModel,
    MessageType,
    RoundParams,
    SumDict,
    decode_message,
    verify_sender,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.round import RoundOutcome
from maskfl.protocol.sortition import Task
from maskfl.protocol.topics import TopicKind, Topics
from maskfl.transport import MqttConfig, MqttTransport, TlsConfig, broker_identity

__all__ = [
    "ModelEvent",
    "Observer",
    "RoundEvent",
    "StoreSampler",
    "StoredUpdate",
    "SumsEvent",
    "fetch_status",
    "journal_rounds",
    "plain_update",
]

MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class RoundEvent:
    round_id: int
    params: RoundParams
    at: float


@dataclass(frozen=True)
class SumsEvent:
    round_id: int
    summers: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class ModelEvent:
    model: GlobalModel
    at: float

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.model.metrics)


Event = RoundEvent | SumsEvent | ModelEvent


async def next_event(events: asyncio.Queue[Event], limit_s: float) -> Event | None:
    """The next event, or None after ``limit_s``. A cancel (Ctrl-C) is never lost to an
    event arriving at the same moment: :func:`asyncio.wait_for` on Python 3.11 returns
    the event then and drops the cancel, so the demo ran on after a Ctrl-C."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            return await events.get()
    return None


class Observer:
    """Watches round parameters, sum dictionaries and global models on the broker."""

    def __init__(self, bundle: Path, *, fleet: str, model_id: str, host: str, port: int) -> None:
        self.topics = Topics(fleet)
        self.fleet = fleet
        self.model_id = model_id
        self.ca_public_key = public_key_from_pem((bundle / "ca.pub").read_bytes())
        self.config = dataclasses.replace(
            observer_config(bundle, host, port),
            max_incoming_payload=MAX_MESSAGE,
            reconnect_min_s=0.2,
            reconnect_max_s=2.0,
        )
        self.events: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self.coordinator: Certificate | None = None
        self.ignored = 0
        self._seen_rounds: set[int] = set()
        self._seen_sums: set[int] = set()
        self._model_version = -1
        self._reassembler: Reassembler[None] = Reassembler(8, MAX_MESSAGE, 120.0)
        self._transport: MqttTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        transport = MqttTransport(self.config)
        await transport.connect()
        p = self.topics.prefix
        await transport.subscribe(
            [self.topics.round, f"{p}round/+/sums", self.topics.model_latest(self.model_id)], qos=1
        )
        self._transport = transport
        self._task = asyncio.create_task(self._receive(transport), name="observer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.disconnect()

    def check(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc

    async def _receive(self, transport: MqttTransport) -> None:
        while True:
            message = await transport.receive()
            payload = message.payload
            try:
                if is_chunk(payload):
                    whole = self._reassembler.feed(message.topic, payload, time.monotonic())
                    if whole is None:
                        continue
                    payload = whole.payload
                self._handle(message.topic, payload)
            except (RemoteProtocolError, CryptoError):
                self.ignored += 1

    def _handle(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        parsed = self.topics.parse(topic)
        signed = decode_message(payload, max_size=MAX_MESSAGE)
        match parsed.kind:
            case TopicKind.ROUND:
                signed.expect(fleet=self.fleet, types=(MessageType.ROUND_PARAMS,))
                cert = verify_sender(
                    signed,
                    ca_public_key=self.ca_public_key,
                    fleet=self.fleet,
                    now=time.time(),
                    revocations=None,
                )
                params = signed.body
                assert isinstance(params, RoundParams)
                self.coordinator = cert
                rid = int(params.round_id)
                if rid not in self._seen_rounds:
                    self._seen_rounds.add(rid)
                    self.events.put_nowait(RoundEvent(rid, params, now))
            case TopicKind.SUMS if self.coordinator is not None:
                signed.expect(fleet=self.fleet, types=(MessageType.SUM_DICT,))
                self._verify(signed)
                body = signed.body
                assert isinstance(body, SumDict)
                rid = int(signed.header.round_id)
                if rid not in self._seen_sums:
                    self._seen_sums.add(rid)
                    names = []
                    for raw in body.entries:
                        entry = decode_message(raw, max_size=MAX_MESSAGE).certificate
                        names.append(entry.subject if entry is not None else "?")
                    self.events.put_nowait(SumsEvent(rid, tuple(names), now))
            case TopicKind.MODEL_LATEST if self.coordinator is not None:
                signed.expect(fleet=self.fleet, types=(MessageType.GLOBAL_MODEL,))
                self._verify(signed)
                model = signed.body
                assert isinstance(model, GlobalModel)
                if model.version > self._model_version:
                    self._model_version = model.version
                    self.events.put_nowait(ModelEvent(model, now))
            case _:
                pass

    def _verify(self, signed: Any) -> None:
        verify_sender(
            signed,
            ca_public_key=self.ca_public_key,
            fleet=self.fleet,
            now=time.time(),
            revocations=None,
            certificate=self.coordinator,
        )


async def fetch_status(port: int, limit_s: float = 2.0) -> dict[str, Any] | None:
    """The coordinator's ``GET /status`` as a dict, or None if it does not answer."""
    body = await _get(port, "/status", limit_s)
    if body is None:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def fetch_ready(port: int, limit_s: float = 2.0) -> bool:
    """Whether the coordinator's ``GET /readyz`` says 200 (its database open, its broker
    link up, its round services built: what /status reports is then all there)."""
    return await _get(port, "/readyz", limit_s) is not None


async def _get(port: int, path: str, limit_s: float) -> bytes | None:
    """The body of the coordinator's 200 answer to ``GET path``, or None."""
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else None


def observer_config(bundle: Path, host: str, port: int) -> MqttConfig:
    """The MQTT settings of a provisioned read-only observer (``maskfl-provision
    add-observer``): its TLS identity from ``bundle``, the client id its certificate
    names (set queue and payload sizes on the result)."""
    tls = TlsConfig(
        ca_file=bundle / "broker-ca.pem",
        cert_file=bundle / "observer-tls.pem",
        key_file=bundle / "observer-tls.key",
    )
    return MqttConfig(host=host, port=port, client_id=broker_identity(tls, None) or "", tls=tls)


@dataclass(frozen=True)
class StoredUpdate:
    """One accepted update's masked words, as the coordinator stored them."""

    round_id: int
    device_id: str
    data: bytes


def query_read_only(
    path: Path, *queries: tuple[str, tuple[Any, ...]], timeout_s: float = 1.0
) -> list[list[Any]]:
    """The rows of each query, read through a read-only connection to another process's
    database (blocking); a sqlite error is a :class:`StorageError`."""
    with sqlite_errors(path, "read (read-only)"):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s)
        try:
            con.execute("PRAGMA query_only = 1")
            return [con.execute(sql, params).fetchall() for sql, params in queries]
        finally:
            con.close()


@dataclass(frozen=True)
class RoundRow:
    """A round as the coordinator's database records it: outcome, reason, phase times."""

    round_id: int
    outcome: RoundOutcome | None
    detail: str | None
    phases: dict[str, float]
    """Seconds in each timed phase it reached (store.LOGGED_PHASES), by name."""
    started_at: float
    finished_at: float | None


def coordinator_round(state_dir: Path, round_id: int, *, timeout_s: float = 5.0) -> RoundRow | None:
    """Read one round's row and its phase log from the coordinator's database (read-only;
    blocking; the demo, maskfl-bench scale). Phase durations run from a phase's opening
    to the next one's, the last to the round's end. None if the round is not there (yet)."""
    db = state_dir / "coordinator.db"
    if not db.exists():
        return None
    rows, opened = query_read_only(
        db,
        (
            "SELECT outcome, detail, started_at, finished_at FROM rounds WHERE round_id = ?",
            (round_id,),
        ),
        (
            "SELECT phase, opened_at FROM phase_log WHERE round_id = ? ORDER BY opened_at",
            (round_id,),
        ),
        timeout_s=timeout_s,
    )
    if not rows:
        return None
    outcome, detail, started, finished = rows[0]
    phases: dict[str, float] = {}
    for i, (phase, at) in enumerate(opened):
        until = opened[i + 1][1] if i + 1 < len(opened) else finished
        if until is not None and phase in LOGGED_PHASES:
            phases[str(phase)] = max(0.0, float(until) - float(at))
    return RoundRow(
        round_id,
        None if outcome is None else RoundOutcome(outcome),
        detail,
        phases,
        float(started),
        None if finished is None else float(finished),
    )


class StoreSampler:
    """Polls the coordinator's database and update log; keeps the first stored update
    of every round (the coordinator deletes them once the round is aggregated).

    An asyncio task; each poll runs in a worker thread (sqlite and file reads block).
    """

    def __init__(self, state_dir: Path, interval_s: float = 0.1) -> None:
        self.db = state_dir / "coordinator.db"
        self.log_dir = state_dir / "updates"
        self.interval_s = interval_s
        self.samples: dict[int, StoredUpdate] = {}
        self.accepted: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="store-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        """Poll once now (errors of a coordinator mid-write are retried next time)."""
        with contextlib.suppress(StorageError, OSError):
            await asyncio.to_thread(self.poll)

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        if not self.db.exists():
            return
        (rows,) = query_read_only(
            self.db,
            (
                "SELECT round_id, device_id, log_offset, log_length FROM updates "
                "ORDER BY round_id, log_offset",
                (),
            ),
        )
        for round_id, device_id, offset, length in rows:
            self.accepted.setdefault(int(round_id), set()).add(str(device_id))
            if int(round_id) in self.samples:
                continue
            path = self.log_dir / f"round-{int(round_id)}.log"
            try:
                with path.open("rb") as f:
                    f.seek(int(offset))
                    data = f.read(int(length))
            except OSError:
                continue  # that round's log is already pruned
            if len(data) == int(length):
                self.samples[int(round_id)] = StoredUpdate(int(round_id), str(device_id), data)


def journal_rounds(state_dir: Path) -> dict[int, dict[str, Any]]:
    """An agent's journal: ``{round_id: {task, step, bytes_sent}}`` (recent rounds), its
    task a :class:`Task` and its step a :class:`Step`."""
    db = state_dir / "agent.sqlite3"
    if not db.exists():
        return {}
    try:
        (rows,) = query_read_only(db, ("SELECT round_id, task, step, bytes_sent FROM rounds", ()))
    except StorageError:
        return {}
    return {int(r): {"task": Task(t), "step": Step(s), "bytes_sent": int(b)} for r, t, s, b in rows}


def plain_update(log_dir: Path, round_id: int) -> tuple[npt.NDArray[np.float32], int] | None:
    """The plain delta and sample count a demo agent logged for ``round_id``."""
    path = log_dir / f"round-{round_id}.npz"
    try:
        with np.load(path) as data:
            return np.asarray(data["delta"], dtype=np.float32), int(data["num_samples"])
    except (OSError, KeyError, ValueError):
        return None
