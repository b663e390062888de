"""A round without a broker: a real coordinator, simulated participants, a fake clock.

The coordinator is the production one (:class:`Coordinator`, its SQLite store in the
test's directory, the numpy aggregator); only its two kinds of I/O are swapped, as
the agent's can be: the broker link is a :class:`MemoryBroker` client and the clock
is a :class:`FakeClock`. The participants are :class:`SimParticipant`s on the same
in-memory broker. So a round runs in milliseconds and its timing is the test's to
decide: a phase window closes when the test advances the clock past it, never
because a machine was slow, and nothing sleeps. Waiting is on events: every
message the broker routes wakes :meth:`Harness.until`, which re-checks its
predicate (receipts, models, the runner's phase); a predicate that never comes true
fails after ``limit_s`` of real time, naming what it waited for.

What this does not cover is the network: sessions across a broker restart, ACLs,
TLS, chunked delivery over a real socket, a killed process. Those stay tested
against a real mosquitto (maskfl.testing.broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskfl.agent.config import load_config as load_agent_config
from maskfl.agent.daemon import Agent
from maskfl.agent.identity import load_identity
from maskfl.agent.state import Journal
from maskfl.broker_coordinator.config import load_config
from maskfl.broker_coordinator.service import Coordinator
from maskfl.protocol.identity import Identity
from maskfl.testing.participants import Behaviour, SimParticipant
from maskfl.transport import MemoryBroker, MqttConfig, Transport
from tests.broker_coordinator.support import Setup, fixed_delta, make_setup

#: The coordinator's configured broker port; the memory broker ignores it (no socket
#: is ever opened), and it is not 1883, the system broker's, which tests never use.
UNUSED_PORT = 9


class FakeClock:
    """Wall-clock seconds that move only when the test says so (:meth:`advance`).

    Starts at the real time of its creation (certificates are valid then), as an
    integer, so that every deadline a test computes is exact.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time()) if start is None else start)
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self.now

    def on_advance(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time does not go back ({seconds} s)")
        self.now += seconds
        for listener in list(self._listeners):
            listener()


class TrafficBroker(MemoryBroker):
    """A :class:`MemoryBroker` that wakes waiters whenever it routes a message."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = asyncio.Event()

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        super()._route(topic, payload, qos, retain)
        self.traffic.set()


@dataclass
class Harness:
    """One test's fleet: a coordinator bundle, a broker, a clock and participants."""

    setup: Setup
    broker: TrafficBroker
    clock: FakeClock
    participants: list[SimParticipant] = field(default_factory=list)
    coordinator: Coordinator | None = None
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event | None = None

    # -- the coordinator ----------------------------------------------------------

    def _transport(self, config: MqttConfig) -> Transport:
        return self.broker.transport(config.client_id, manual_ack=config.manual_ack)

    async def start_coordinator(self) -> Coordinator:
        """A fresh :class:`Coordinator` on the bundle's config and store; returns once
        it serves (the round in the store resumed, its retained state published)."""
        assert self._task is None or self._task.done(), "a coordinator is running"
        coordinator = Coordinator(
            load_config(self.setup.config_path),
            transport_factory=self._transport,
            clock=self.clock,
        )
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(coordinator.run(self._stop), name="coordinator")
        self.coordinator = coordinator
        started = asyncio.create_task(coordinator.started.wait())
        await asyncio.wait({started, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            self._task.result()  # raises what stopped it
            raise AssertionError("the coordinator returned before it started")
        return coordinator

    async def finished(self, limit_s: float = 30.0) -> None:
        """Wait for the coordinator to end by itself (``max_rounds`` reached)."""
        assert self._task is not None
        async with asyncio.timeout(limit_s):
            await asyncio.shield(self._task)

    async def discard_coordinator(self) -> None:
        """Throw the coordinator object away mid-round, as a crash would: its task is
        cancelled wherever it stands; only what it committed to the store survives."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.coordinator = None

    async def stop_coordinator(self) -> None:
        if self._task is None:
            return
        assert self._stop is not None
        self._stop.set()
        async with asyncio.timeout(30):
            await self._task

    # -- time and events -----------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the clock; the runner re-reads it at once (not at its next poll)."""
        self.clock.advance(seconds)
        coordinator = self.coordinator
        if coordinator is not None and coordinator.services is not None:
            coordinator.services.changed.set()

    async def until(self, predicate: Callable[[], bool], what: str, limit_s: float = 20) -> None:
        """Wait, on broker traffic and the coordinator's end, until ``predicate()``."""
        try:
            async with asyncio.timeout(limit_s):
                while not predicate():
                    self.broker.traffic.clear()
                    waiters = [asyncio.create_task(self.broker.traffic.wait())]
                    if self._task is not None and not self._task.done():
                        waiters.append(asyncio.ensure_future(asyncio.shield(self._task)))
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
                    if self._task is not None and self._task.done() and not predicate():
                        self._task.result()  # a crashed coordinator: its error, not a timeout
                        raise AssertionError(f"the coordinator ended before {what}")
        except TimeoutError:
            raise AssertionError(f"no {what} after {limit_s} s") from None

    # -- participants --------------------------------------------------------------

    def participant(self, identity: Identity, behaviour: Behaviour | None = None) -> SimParticipant:
        p = SimParticipant(
            identity,
            ca_public_key=self.setup.fleet.ca_public_key,
            host="memory",
            port=UNUSED_PORT,
            behaviour=behaviour,
            transport=self.broker.transport(identity.device_id),
        )
        self.participants.append(p)
        return p

    def fleet(
        self, behaviours: dict[str, Behaviour] | None = None
    ) -> tuple[list[SimParticipant], list[SimParticipant]]:
        """The setup's summers and updaters as participants (updaters send
        :func:`fixed_delta` unless their behaviour says otherwise)."""
        behaviours = behaviours or {}
        summers = [self.participant(i, behaviours.get(i.device_id)) for i in self.setup.summers]
        updaters = []
        for k, i in enumerate(self.setup.updaters):
            b = behaviours.get(i.device_id) or Behaviour()
            if b.delta is None:
                b.delta = fixed_delta(k)
            updaters.append(self.participant(i, b))
        return summers, updaters

    @contextlib.asynccontextmanager
    async def agent(self, config_path: Path) -> AsyncIterator[Agent]:
        """A real :class:`Agent` (its journal, its learner) on this broker and clock."""
        config = load_agent_config(config_path)
        identity = load_identity(config.device, now=self.clock())
        async with Journal.open(config.state.database) as journal:
            agent = Agent(
                config, identity, journal, transport_factory=self._transport, clock=self.clock
            )
            task = asyncio.create_task(agent.run(), name=f"agent {config.device.id}")
            try:
                yield agent
            finally:
                agent.request_stop()
                async with asyncio.timeout(15):
                    await task

    async def start(self, participants: list[SimParticipant]) -> None:
        await asyncio.gather(*(p.start() for p in participants))

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.participants), return_exceptions=True)
        if self._task is not None and not self._task.done():
            await self.stop_coordinator()


@contextlib.asynccontextmanager
async def harness(tmp: Path, **setup: Any) -> AsyncIterator[Harness]:
    """A :class:`Harness` on :func:`make_setup`'s bundle (same keyword arguments);
    pauses between and after rounds are zero (a pause is real time, not round logic)."""
    pet = {"round_pause_s": 0.0, "failure_pause_s": 0.0, **setup.pop("pet", {})}
    h = Harness(make_setup(tmp, UNUSED_PORT, pet=pet, **setup), TrafficBroker(), FakeClock())
    try:
        yield h
    finally:
        await h.close()
