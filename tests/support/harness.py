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

Beyond an honest round the harness can hold back a participant's messages and
deliver them later or out of order (:meth:`TrafficBroker.hold`), drop a client's
link (:meth:`Harness.drop_link`), give raw clients to a test that plays a hostile
client or a stand-in coordinator (:meth:`Harness.client`), throw the coordinator
away mid-phase and start a new one on the same SQLite files
(:meth:`Harness.restart_coordinator`), and run real agents whose journal writes
wake :meth:`Harness.until` like broker traffic does (:meth:`Harness.agent`). Log
records wake it too, so a test can await "the agent logged that it ignored this".
The agents' and the coordinator's timers (receipt timeout, heartbeats, the pauses,
the group commit, a phase window) are sleeps on the fake clock: a test awaits the
sleep it wants to end (:attr:`FakeClock.sleeps`), then advances.

What this does not cover is the network: sessions across a broker restart, ACLs,
TLS, chunked delivery over a real socket, a killed process. Those stay tested
against a real mosquitto (maskfl.testing.broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from maskfl.agent.config import load_config as load_agent_config
from maskfl.agent.daemon import Agent
from maskfl.agent.identity import load_identity
from maskfl.agent.state import Journal, ReceiptStatus, SentMessage
from maskfl.agent.steps import DeviceRound
from maskfl.broker_coordinator.config import load_config
from maskfl.broker_coordinator.service import Coordinator
from maskfl.protocol.identity import Identity
from maskfl.protocol.topics import TopicKind
from maskfl.testing.participants import Behaviour, SimParticipant
from maskfl.transport import (
    MemoryBroker,
    MemoryTransport,
    Message,
    MqttConfig,
    Transport,
    topic_matches,
)
from tests.broker_coordinator.support import Setup, fixed_delta, make_setup

#: The coordinator's configured broker port; the memory broker ignores it (no socket
#: is ever opened), and it is not 1883, the system broker's, which tests never use.
UNUSED_PORT = 9

#: A broker address for bundles whose clients the harness connects (agent.toml needs
#: one; no socket is opened to it).
NOWHERE = SimpleNamespace(host="127.0.0.1", port=UNUSED_PORT)

B = TypeVar("B", bound="Bench")

#: What a test may wait for: a plain predicate, or a coroutine function (a journal read).
Predicate = Callable[[], bool] | Callable[[], Awaitable[bool]]


class FakeClock:
    """Wall-clock seconds that move only when the test says so (:meth:`advance`): a
    :class:`~maskfl.transport.Clock` whose sleeps end when the time passes their end.

    Starts at the real time of its creation (certificates are valid then), as an
    integer, so that every deadline a test computes is exact. Arming a sleep and
    moving the time tell the listeners (:meth:`on_change`: the harness wakes its
    waiters), so a test can await "the agent waits on the clock until t"
    (:attr:`sleeps`) before it moves the time past t.

    A sleep's end is ``now + seconds`` when the sleep first runs, not when the code
    that will sleep is called, and :func:`maskfl.transport.wait_for` arms its timer
    lazily: a task of ``clock.sleep`` that runs on a later loop iteration. Time moved
    before then is not counted (the sleep ends that much later and the test hangs
    until its limit), so a test that expects a window or timeout to expire awaits the
    armed sleep first (:meth:`Bench.fire_timer`, or :meth:`Bench.until` on
    :attr:`sleeps`) and only then advances.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time()) if start is None else start)
        self._listeners: list[Callable[[], None]] = []
        self._sleeps: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    @property
    def sleeps(self) -> list[float]:
        """When the sleeps armed now end, soonest first."""
        return sorted(end for end, future in self._sleeps if not future.done())

    async def sleep(self, seconds: float) -> None:
        """Return once :meth:`advance` has moved the time ``seconds`` on (0: at once)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleeps.append(entry)
        self._changed()
        try:
            await entry[1]
        finally:
            self._sleeps.remove(entry)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        """Move the time on; every sleep it passes the end of ends (soonest first)."""
        if seconds < 0:
            raise ValueError(f"time does not go back ({seconds} s)")
        self.now += seconds
        for end, future in sorted(self._sleeps, key=lambda entry: entry[0]):
            if end <= self.now and not future.done():
                future.set_result(None)
        self._changed()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()


@dataclass
class Hold:
    """Messages kept back by :meth:`TrafficBroker.hold` until :meth:`release`."""

    broker: TrafficBroker
    match: Callable[[str], bool]
    held: list[tuple[str, bytes, int, bool]] = field(default_factory=list)

    @property
    def topics(self) -> list[str]:
        return [topic for topic, *_ in self.held]

    def release(self, *, reverse: bool = False) -> int:
        """Route what was held (newest first with ``reverse``) and stop holding;
        returns how many messages that was."""
        if self in self.broker.holds:
            self.broker.holds.remove(self)
        held, self.held = self.held, []
        for message in reversed(held) if reverse else held:
            self.broker.route(*message)
        return len(held)

    def drop(self) -> int:
        """Stop holding and lose what was held (a client that never got it out)."""
        if self in self.broker.holds:
            self.broker.holds.remove(self)
        lost, self.held = len(self.held), []
        return lost


class _WakingTransport(MemoryTransport):
    """A client that wakes waiters again once its reader took a message: whatever the
    reader does with it before its next await (a receipt appended, a round noted) is
    done by the time the waiter re-checks."""

    def __init__(self, broker: TrafficBroker, client_id: str, *, manual_ack: bool) -> None:
        super().__init__(broker, client_id, manual_ack=manual_ack)
        self.traffic = broker.traffic
        self.drop_after: Callable[[str], bool] | None = None
        """See :meth:`Bench.drop_link_after`."""

    async def receive(self) -> Message:
        message = await super().receive()
        if self.drop_after is not None and self.drop_after(message.topic):
            self.drop_after = None
            asyncio.get_running_loop().call_soon(self.drop_link)
        self.traffic.set()
        return message


class TrafficBroker(MemoryBroker):
    """A :class:`MemoryBroker` that wakes waiters whenever it routes a message or a
    client reads one, and can hold messages back (:meth:`hold`)."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = asyncio.Event()
        self.holds: list[Hold] = []

    def transport(self, client_id: str = "", *, manual_ack: bool = False) -> MemoryTransport:
        return _WakingTransport(self, client_id or f"mem-{next(self._ids)}", manual_ack=manual_ack)

    def hold(self, match: str | Callable[[str], bool]) -> Hold:
        """From now on, keep back every published message whose topic matches
        (an MQTT topic filter, or a predicate on the topic) until ``release()``:
        the sender's publish returns as if the broker took it, nobody receives it."""
        test = (lambda topic: topic_matches(match, topic)) if isinstance(match, str) else match
        hold = Hold(self, test)
        self.holds.append(hold)
        return hold

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Deliver one message now, past every hold."""
        super()._route(topic, payload, qos, retain)
        self.traffic.set()

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        for hold in self.holds:
            if hold.match(topic):
                hold.held.append((topic, payload, qos, retain))
                self.traffic.set()
                return
        self.route(topic, payload, qos, retain)


class _Wakeup(logging.Handler):
    """Sets an event on every log record (from any thread), so waiters re-check."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.event = event
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self.loop.call_soon_threadsafe(self.event.set)


class LogWatch(contextlib.AbstractContextManager["LogWatch"]):
    """Log records from the moment it is entered, to await one (no broker, no
    harness needed): ``with LogWatch() as logs: ...; await logs.until("words")``."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self._event = asyncio.Event()
        self._handler = _Wakeup(self._event)
        self._handler.emit = self._emit  # type: ignore[method-assign]

    def _emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        _Wakeup.emit(self._handler, record)

    def __enter__(self) -> LogWatch:
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self._handler)

    async def until(self, words: str, limit_s: float = 20) -> logging.LogRecord:
        """The first record (since entering) whose message contains ``words``."""
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    self._event.clear()
                    for record in self.records:
                        if words in record.getMessage():
                            return record
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"no log line with {words!r} after {limit_s} s") from None


class _ClearPokes(asyncio.Event):
    """The runner's ``changed`` event; clearing it (the runner is about to wait again,
    having looked at the clock and its counts) also wakes :meth:`Harness.until`."""

    def __init__(self, poke: asyncio.Event) -> None:
        super().__init__()
        self.poke = poke

    def clear(self) -> None:
        super().clear()
        self.poke.set()


class WatchedJournal(Journal):
    """The agent's real journal; each write also wakes :meth:`Harness.until`."""

    wake: asyncio.Event | None = None

    async def save(self, state: DeviceRound, *, sent: SentMessage | None = None) -> DeviceRound:
        saved = await super().save(state, sent=sent)
        if self.wake is not None:
            self.wake.set()
        return saved

    async def mark_receipt(
        self, round_id: int, kind: TopicKind, status: ReceiptStatus, reason: str = ""
    ) -> None:
        await super().mark_receipt(round_id, kind, status, reason)
        if self.wake is not None:
            self.wake.set()


@dataclass(kw_only=True)
class Bench:
    """A memory broker, a fake clock, raw clients and real agents: what a test of the
    agent against a stand-in coordinator needs (:func:`bench`). :class:`Harness`
    adds the real coordinator and simulated participants."""

    broker: TrafficBroker
    clock: FakeClock
    clients: list[MemoryTransport] = field(default_factory=list)

    def _transport(self, config: MqttConfig) -> Transport:
        return self.broker.transport(config.client_id, manual_ack=config.manual_ack)

    def _running(self) -> asyncio.Task[None] | None:
        """A task whose end must stop a wait (the coordinator's, in a :class:`Harness`)."""
        return None

    # -- time and events -----------------------------------------------------------

    def wake(self) -> None:
        """Make :meth:`until` re-check its predicate now."""
        self.broker.traffic.set()

    def advance(self, seconds: float) -> None:
        """Move the clock on (its sleeps that end by then end)."""
        self.clock.advance(seconds)

    async def fire_timer(self, seconds: float, what: str) -> None:
        """Wait until something sleeps on the clock until ``seconds`` from now (an
        agent's receipt timeout, say), then move the time that far: it fires."""
        end = self.clock() + seconds
        await self.until(lambda: end in self.clock.sleeps, f"wait on the clock for {what}")
        self.advance(seconds)

    async def until(self, predicate: Predicate, what: str, limit_s: float = 20) -> None:
        """Wait until ``predicate()`` (a coroutine function's result is awaited) is
        true, re-checking on every broker message, journal write, log record and clock
        move, and when the coordinator ends; never by polling."""

        async def check() -> bool:
            value = predicate()
            return bool(await value) if inspect.isawaitable(value) else bool(value)

        try:
            async with asyncio.timeout(limit_s):
                while True:
                    self.broker.traffic.clear()  # before the check: no wake-up is lost
                    if await check():
                        return
                    task = self._running()
                    waiters: list[asyncio.Future[Any]] = [
                        asyncio.ensure_future(self.broker.traffic.wait())
                    ]
                    if task is not None and not task.done():
                        waiters.append(asyncio.ensure_future(asyncio.shield(task)))
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
                    if task is not None and task.done() and not await check():
                        task.result()  # a crashed coordinator: its error, not a timeout
                        raise AssertionError(f"the coordinator ended before {what}")
        except TimeoutError:
            raise AssertionError(f"no {what} after {limit_s} s") from None

    # -- clients -------------------------------------------------------------------

    async def client(self, client_id: str) -> MemoryTransport:
        """A connected raw client (a prober, a hostile client, a stand-in), closed
        with the harness. Like any client of a broker without ACLs it may publish
        anywhere."""
        transport = self.broker.transport(client_id)
        await transport.connect()
        self.clients.append(transport)
        return transport

    def drop_link(self, transport: Transport) -> None:
        """Lose ``transport``'s link; it comes back at once to its session, and what
        it had not acknowledged is delivered again with ``dup`` set."""
        assert isinstance(transport, MemoryTransport), transport
        transport.drop_link()
        self.wake()

    def drop_link_after(self, transport: Transport | None, topic_filter: str) -> None:
        """Lose ``transport``'s link just after its reader took the next message on
        ``topic_filter``, before it could acknowledge it: the broker delivers that
        message again (``dup``) while the first copy is being handled."""
        assert isinstance(transport, _WakingTransport), transport
        transport.drop_after = lambda topic: topic_matches(topic_filter, topic)

    def handled(self, agent: Agent, which: Callable[[str], bool]) -> asyncio.Event:
        """Set once ``agent`` has handled a message whose topic ``which`` picks
        (handling that changes nothing is otherwise invisible)."""
        event = asyncio.Event()
        handle = agent.handle

        async def handle_and_tell(message: Message) -> None:
            await handle(message)
            if which(message.topic):
                event.set()
                self.wake()

        agent.handle = handle_and_tell  # type: ignore[method-assign]
        return event

    @contextlib.asynccontextmanager
    async def agent(self, config_path: Path) -> AsyncIterator[Agent]:
        """A real :class:`Agent` (its journal, its learner) on this broker and clock.
        Leaving the block stops it as a service stop would; entering again with the
        same bundle is a restart on the same journal."""
        config = load_agent_config(config_path)
        identity = load_identity(config.device, now=self.clock())
        async with WatchedJournal.open(config.state.database) as journal:
            assert isinstance(journal, WatchedJournal)
            journal.wake = self.broker.traffic
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

    async def close(self) -> None:
        for transport in self.clients:
            await transport.disconnect()


@dataclass(kw_only=True)
class Harness(Bench):
    """One test's fleet: a coordinator bundle, a broker, a clock and participants."""

    setup: Setup
    participants: list[SimParticipant] = field(default_factory=list)
    coordinator: Coordinator | None = None
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event | None = None

    def _running(self) -> asyncio.Task[None] | None:
        return self._task

    # -- the coordinator ----------------------------------------------------------

    async def start_coordinator(self) -> Coordinator:
        """A fresh :class:`Coordinator` on the bundle's config and store; returns once
        it serves (the round in the store resumed, its retained state published)."""
        assert self._task is None or self._task.done(), "a coordinator is running"
        config = load_config(self.setup.config_path)
        written = tomllib.loads(self.setup.config_path.read_text())
        if "group_commit_ms" not in written.get("storage", {}):
            # The window runs on the fake clock: unless the test sets one (and advances
            # past it), each batch is what is queued when the committer looks.
            storage = config.storage.model_copy(update={"group_commit_ms": 0.0})
            config = config.model_copy(update={"storage": storage})
        coordinator = Coordinator(config, transport_factory=self._transport, clock=self.clock)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(coordinator.run(self._stop), name="coordinator")
        self.coordinator = coordinator
        started = asyncio.create_task(coordinator.started.wait())
        await asyncio.wait({started, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            self._task.result()  # raises what stopped it
            raise AssertionError("the coordinator returned before it started")
        services = coordinator.services
        if services is not None and not isinstance(services.changed, _ClearPokes):
            waited_on, services.changed = services.changed, _ClearPokes(self.broker.traffic)
            waited_on.set()  # the runner may wait on the old one: it comes round to the new
        return coordinator

    async def settle(self, what: str = "the runner to look at the clock") -> None:
        """Wait until the runner has re-read the clock and its counts since the last
        :meth:`advance` (or message) and waits again: after this, a window that the
        new time closes is closed, and one still open stayed open at that time."""
        coordinator = self.coordinator
        assert coordinator is not None and coordinator.services is not None
        services = coordinator.services
        await self.until(lambda: not services.changed.is_set(), what)

    async def spin_until(
        self, predicate: Callable[[], bool], what: str, limit_s: float = 10
    ) -> None:
        """Yield to the event loop until ``predicate()``: for states of the coordinator that
        signal nothing (a batch held open, a pause armed on the clock), so :meth:`until`
        has nothing to wake on. No timed sleep: each turn lets every ready task run."""
        try:
            async with asyncio.timeout(limit_s):
                while not predicate():  # noqa: ASYNC110 nothing to await: see the docstring
                    await asyncio.sleep(0)
        except TimeoutError:
            raise AssertionError(f"not {what} after {limit_s} s") from None

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

    async def restart_coordinator(self, *, crash: bool = True) -> Coordinator:
        """A new coordinator on the same config and SQLite files, mid-phase: the old one
        is thrown away (``crash``) or stopped as a service stop would, then a new one
        resumes from the store. Returns the new one."""
        if crash:
            await self.discard_coordinator()
        else:
            await self.stop_coordinator()
        return await self.start_coordinator()

    def advance(self, seconds: float) -> None:
        """Move the clock (its sleeps that end by then end); the runner looks at its
        window again even if the move ends none of its sleeps, so :meth:`settle` can
        tell when it has taken the new time in."""
        self.clock.advance(seconds)
        coordinator = self.coordinator
        if coordinator is not None and coordinator.services is not None:
            coordinator.services.changed.set()
        self.wake()

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

    async def start(self, participants: list[SimParticipant]) -> None:
        await asyncio.gather(*(p.start() for p in participants))

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.participants), return_exceptions=True)
        if self._task is not None and not self._task.done():
            await self.stop_coordinator()
        await super().close()


@contextlib.asynccontextmanager
async def _serving(b: B) -> AsyncIterator[B]:
    """``b`` with log records waking its waiters; closed at the end."""
    handler = _Wakeup(b.broker.traffic)
    b.clock.on_change(b.wake)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield b
    finally:
        root.removeHandler(handler)
        await b.close()


def bench() -> contextlib.AbstractAsyncContextManager[Bench]:
    """A :class:`Bench`: memory broker, fake clock, no coordinator."""
    return _serving(Bench(broker=TrafficBroker(), clock=FakeClock()))


def harness_on(setup: Setup) -> contextlib.AbstractAsyncContextManager[Harness]:
    """A :class:`Harness` on a bundle the test wrote itself (its config as it wants
    it; the broker port in it is ignored)."""
    return _serving(Harness(setup=setup, broker=TrafficBroker(), clock=FakeClock()))


@contextlib.asynccontextmanager
async def harness(tmp: Path, **setup: Any) -> AsyncIterator[Harness]:
    """A :class:`Harness` on :func:`make_setup`'s bundle (same keyword arguments).

    Every wait of the coordinator is on the fake clock: the pauses between and after
    rounds and the group-commit window (:meth:`Harness.start_coordinator`) are zero
    unless the test sets them, and then end when the test advances the clock past
    them."""
    pet = {"round_pause_s": 0.0, "failure_pause_s": 0.0, **setup.pop("pet", {})}
    async with harness_on(make_setup(tmp, UNUSED_PORT, pet=pet, **setup)) as h:
        yield h
