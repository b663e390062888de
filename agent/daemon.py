"""The agent daemon: one MQTT link, message dispatch, heartbeats, rounds, systemd.

``run_daemon(config)`` loads the identity, opens the journal, tells systemd it is
ready and then keeps one MQTT 5 session to the broker (persistent, so receipts and
seed dictionaries that arrive while the device is down are kept for it; the last will
is an empty message on ``status/<device>``, which the coordinator reads as "gone").
Connecting is retried with the transport's shared :class:`~maskfl.transport.Backoff`,
which starts again from ``reconnect_min_s`` only once a link proved healthy (its first
heartbeat acknowledged): a broker that accepts the connection but refuses the device's
messages (``Not authorized (135)``: its ACL is not loaded yet) is retried ever more
slowly, with one log line naming the likely cause, not one per attempt. Later link
losses are repaired by the transport. When the broker refuses the certificate as
revoked (its TLS alert, which is what a broker reloaded with a new CRL answers before
the coordinator's revocation list arrives) the agent stops for good with
:data:`EXIT_REVOKED`, as it does when a verified revocation list names it.

Every received message goes through :meth:`Agent.handle` (:mod:`maskfl.agent.inbound`),
which checks topic, size, signature and certificate before anything acts on it.
Nothing a peer sends ends the process; the only bare ``except Exception`` is the
supervisor's, around each message, which logs the bug and keeps serving. The broker
settings are :mod:`maskfl.agent.link`'s, the global models :mod:`maskfl.agent.global_models`'.

The timers that shape a round (heartbeat interval, receipt timeout, guard time
windows, the age of a partly reassembled message) run on the injected
:class:`~maskfl.transport.Clock`, so the round harness moves them with its fake
clock; reconnect back-off and acknowledgement waits are the link's, on real time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from datetime import datetime

from maskfl.agent.config import AgentConfig
from maskfl.agent.global_models import GlobalModels
from maskfl.agent.graphs import GraphGate
from maskfl.agent.guards import Guards
from maskfl.agent.identity import DeviceIdentity, load_identity
from maskfl.agent.inbound import EXIT_REVOKED, REENROLL, Inbound, RoundCoordinator
from maskfl.agent.learning import Learner, LiteRTLearner
from maskfl.agent.link import build_mqtt_config
from maskfl.agent.rounds import RoundDriver
from maskfl.agent.sdnotify import Notifier
from maskfl.agent.state import InboxKey, Journal, SettingKey
from maskfl.protocol.chunking import split_payload
from maskfl.protocol.errors import RemoteProtocolError, TransportError
from maskfl.protocol.identity import RevocationList
from maskfl.protocol.messages import GlobalModel, Heartbeat, encode_message
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.topics import Topics
from maskfl.transport import (
    SYSTEM_CLOCK,
    Backoff,
    Cause,
    Clock,
    Diagnosis,
    LinkEvent,
    LinkReport,
    LinkState,
    MqttTransport,
    Transport,
    TransportFactory,
    diagnose,
)

__all__ = ["EXIT_REVOKED", "Agent", "build_mqtt_config", "run_daemon"]

log = logging.getLogger("maskfl.agent")


class Agent(Inbound):
    """The daemon's state: link, current round, verified inputs. See the module doc."""

    def __init__(
        self,
        config: AgentConfig,
        identity: DeviceIdentity,
        journal: Journal,
        *,
        notifier: Notifier | None = None,
        learner: Learner | None = None,
        transport_factory: TransportFactory | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.identity = identity
        self.journal = journal
        self.notifier = notifier or Notifier({})
        self.learner: Learner = learner or LiteRTLearner(config.training, config.data)
        self._factory: TransportFactory = transport_factory or MqttTransport
        self.clock = clock
        self.device = config.device.id
        self.fleet = config.device.fleet
        self.topics = Topics(self.fleet)
        self.guards = Guards(config.guards, now=lambda: datetime.fromtimestamp(clock()))
        self.revocations: RevocationList | None = identity.revocations
        self.coordinator: RoundCoordinator | None = None
        self.driver: RoundDriver | None = None
        self.transport: Transport | None = None
        self.ignored: collections.Counter[str] = collections.Counter()
        self.handler_errors = 0
        self.graphs = GraphGate(config.limits.max_graph_bytes, self.ignored)
        self.models = GlobalModels(self.topics, self.learner, lambda: self.transport)
        self._early: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._reassembler: Reassembler[None] = Reassembler(
            config.limits.max_reassembly_messages,
            config.limits.max_message_bytes,
            config.limits.reassembly_max_age_s,
        )
        self._started = time.monotonic()
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._on_healthy: Callable[[], None] = lambda: None
        self._served = False
        self.exit_code = 0

    # -- lifecycle -------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until :meth:`request_stop` (SIGTERM/SIGINT in the daemon); returns 0, or
        :data:`EXIT_REVOKED` once a verified revocation list names our certificate."""
        await self._load_journal()
        watchdog = asyncio.create_task(self.notifier.watchdog_loop(), name="watchdog")
        self.notifier.ready(f"connecting to {self.config.broker.host}:{self.config.broker.port}")
        try:
            await self._supervise()
        finally:
            self.notifier.stopping()
            if self.driver is not None:
                await self.driver.stop()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        return self.exit_code

    async def _supervise(self) -> None:
        broker = self.config.broker
        backoff = Backoff(broker.reconnect_min_s, broker.reconnect_max_s)
        report = LinkReport(log, f"broker {broker.host}:{broker.port}")

        def healthy() -> None:
            backoff.reset()
            report.up()

        self._on_healthy = healthy
        # One transport for the daemon's life: it repairs lost links itself; a first
        # connect that fails leaves it unconnected, to be tried again.
        # The will, and the goodbye, are an empty status message: "gone" (the
        # coordinator drops the device from its alive count at once).
        transport = self._factory(build_mqtt_config(self.config, b""))
        transport.add_listener(self._on_link)
        try:
            while not self._stop.is_set():
                try:
                    if transport.state is LinkState.NEW:
                        await transport.connect()
                    await self._serve(transport)
                    continue  # stopped
                except TransportError as exc:
                    diagnosis = diagnose(exc)
                finally:
                    self._connected.clear()
                    self.transport = None
                if self._stop.is_set():
                    break
                if diagnosis.cause is Cause.REVOKED:
                    self._revoked_at_broker(diagnosis)
                    break
                delay = backoff.next_delay()
                report.failed(diagnosis, delay)
                self.notifier.status(f"broker: {diagnosis.advice}; retrying in {delay:.0f} s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
        finally:
            await self._say_goodbye(transport)
            await transport.disconnect()

    def _on_link(self, event: LinkEvent) -> None:
        """The transport's own reconnects: a broker that now refuses us as revoked."""
        if event.state is LinkState.DISCONNECTED and event.cause is Cause.REVOKED:
            self._revoked_at_broker(Diagnosis(Cause.REVOKED, event.reason))

    def _revoked_at_broker(self, diagnosis: Diagnosis) -> None:
        """The broker refused our TLS certificate as revoked: stop for good, once."""
        if self.exit_code == EXIT_REVOKED:
            return
        log.error(
            "the broker refuses this device's certificate (%s) as revoked (%s): stopping "
            "for good (exit status %d). %s",
            self.device,
            diagnosis.detail,
            EXIT_REVOKED,
            REENROLL.format(device=self.device),
        )
        self.notifier.status("revoked (the broker refuses this certificate)")
        self.exit_code = EXIT_REVOKED
        self.request_stop()

    async def _serve(self, transport: Transport) -> None:
        self.transport = transport
        # The link may be down (the transport reconnects by itself): a stop request,
        # e.g. the broker refusing us as revoked meanwhile, must not wait for it.
        subscribing = asyncio.ensure_future(
            transport.subscribe(self.topics.agent_filters(self.device), qos=1)
        )
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({subscribing, stop_wait}, return_when="FIRST_COMPLETED")
        subscribing.cancel()
        stop_wait.cancel()
        await asyncio.gather(subscribing, stop_wait, return_exceptions=True)
        if self._stop.is_set():
            return
        subscribing.result()
        stale, wanted = self.models.subscriptions()
        await transport.unsubscribe(stale)
        if wanted:
            await transport.subscribe(wanted, qos=1)
        self._connected.set()
        log.log(
            logging.DEBUG if self._served else logging.INFO,
            "connected to %s:%d as %s; subscribed",
            self.config.broker.host,
            self.config.broker.port,
            self.device,
        )
        self._served = True
        self.notifier.status("connected, idle")
        heartbeats = asyncio.create_task(self._heartbeats(transport), name="heartbeats")
        receiving = asyncio.create_task(self._receive(transport), name="receive")
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                {receiving, stopping, heartbeats}, return_when="FIRST_COMPLETED"
            )
            for task in done:
                if task is not stopping:
                    task.result()  # a TransportError ends this link
        finally:
            # Every task is cancelled and awaited, whichever ended first and how: one that
            # failed must not leave the others' exceptions unretrieved.
            tasks = (heartbeats, receiving, stopping)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, transport: Transport) -> None:
        while True:
            message = await transport.receive()
            try:
                await self.handle(message)
            except TransportError:
                raise
            except Exception:  # the supervisor: a bug must not end the daemon
                self.handler_errors += 1
                log.exception("error while handling a message on %s; continuing", message.topic)

    async def _say_goodbye(self, transport: Transport) -> None:
        """A clean DISCONNECT suppresses the will, so say "gone" ourselves."""
        if not transport.is_connected:
            return
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(2):
                await transport.publish(self.topics.status(self.device), b"", qos=1)

    async def _load_journal(self) -> None:
        """Resume an unfinished round from the journal, without waiting for the broker."""
        raw = await self.journal.setting(SettingKey.REVOCATIONS)
        if raw is not None:
            with contextlib.suppress(RemoteProtocolError):
                self._accept_revocations(raw)
        latest = await self.journal.latest()
        if latest is None or latest.step.terminal:
            return
        params_raw = await self.journal.inbox(latest.round_id, InboxKey.PARAMS)
        if params_raw is None:
            log.warning("round %d in the journal has no parameters; leaving it", latest.round_id)
            return
        try:
            await self._on_round(params_raw, from_journal=True)
        except RemoteProtocolError as exc:
            log.warning("journaled round %d cannot resume: %s", latest.round_id, exc)

    # -- heartbeats ------------------------------------------------------------------

    def _heartbeat_bytes(self, state: str) -> bytes:
        ident = self.identity.identity
        version = 0 if self.coordinator is None else self.coordinator.params.model_version
        rid = 0 if self.coordinator is None else int(self.coordinator.params.round_id)
        return encode_message(
            Heartbeat(ident.certificate, state[:64], time.monotonic() - self._started, version),
            fleet=self.fleet,
            round_id=rid,
            signing_key=ident.signing_key,
        )

    def _state_text(self) -> str:
        return "idle" if self.driver is None else self.driver.describe()

    async def _heartbeats(self, transport: Transport) -> None:
        interval = self.config.heartbeat.interval_s
        topic = self.topics.status(self.device)
        while True:
            state = self._state_text()
            self.notifier.status(f"connected, {state}")
            try:  # the broker's acknowledgement is the link's: real time
                async with asyncio.timeout(interval):
                    await transport.publish(topic, self._heartbeat_bytes(state), qos=1)
            except TimeoutError:
                log.debug("heartbeat not acknowledged within %.0f s", interval)
            else:
                # The broker accepted a message of ours: the link, the certificate and
                # the ACL work, so the next failure may retry quickly again.
                self._on_healthy()
            await self.clock.sleep(interval)

    # -- publishing (used by the rounds) ---------------------------------------------

    async def publish(self, topic: str, payload: bytes, chunk_size: int) -> None:
        """QoS 1, split into chunk frames above ``chunk_size``; waits for the link."""
        frames = [payload] if len(payload) <= chunk_size else split_payload(payload, chunk_size)
        for frame in frames:
            while True:
                await self._connected.wait()
                transport = self.transport
                if transport is None:
                    continue
                try:
                    await transport.publish(topic, frame, qos=1)
                    break
                except TransportError as exc:
                    if transport is self.transport and transport.is_connected:
                        raise
                    log.info("publish to %s interrupted (%s); retrying", topic, exc)
                    await asyncio.sleep(self.config.broker.reconnect_min_s)

    def global_model(self, model_id: str) -> GlobalModel | None:
        """The newest verified global model ``model_id`` received, if any."""
        return self.models.get(model_id)


async def run_daemon(
    config: AgentConfig,
    *,
    notifier: Notifier | None = None,
    learner: Learner | None = None,
) -> int:
    """Load identity and journal, then serve until SIGTERM or SIGINT."""
    identity = load_identity(config.device)
    notifier = notifier or Notifier()
    async with Journal.open(config.state.database) as journal:
        agent = Agent(config, identity, journal, notifier=notifier, learner=learner)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.request_stop)
        log.info(
            "maskfl-agent %s starting (fleet %s, state %s)",
            config.device.id,
            config.device.fleet,
            config.state.database,
        )
        try:
            return await agent.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            notifier.close()
            log.info("maskfl-agent stopped")
