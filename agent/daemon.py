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

Every received message goes through :meth:`Agent.handle`, which checks topic, size,
signature and certificate before anything acts on it. A message that breaks the
protocol is a :class:`RemoteProtocolError`: one log line (``ignored message on
<topic>: <reason>: <why>``), a counter, and the agent goes on. Nothing a peer sends
ends the process; the only bare ``except Exception`` is the supervisor's, around each
message, which logs the bug and keeps serving.

Coordinator messages are checked against the coordinator certificate carried in the
round parameters (itself checked against the fleet CA). Messages that arrive before
the parameters they belong to (retained messages come in any order) wait in a small
bounded buffer. The one unsigned input, the model graph on ``model/<id>/graph``, goes
through a :class:`~maskfl.agent.graphs.GraphGate`: the learner sees it only once its
SHA-256 equals the ``graph_digest`` of a verified global model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from maskfl.agent.config import AgentConfig
from maskfl.agent.graphs import NOT_STATED, GraphGate
from maskfl.agent.guards import Guards
from maskfl.agent.identity import DeviceIdentity, load_identity
from maskfl.agent.learning import Learner, LiteRTLearner
from maskfl.agent.rounds import Outcome, RoundContext, RoundDriver, classify_receipt
from maskfl.agent.sdnotify import Notifier
from maskfl.agent.state import Journal, OutboxStatus
from maskfl.protocol.chunking import Reassembler, is_chunk, split_payload
from maskfl.protocol.errors import (
    ConfigError,
    CryptoError,
    Reason,
    RemoteProtocolError,
    TransportError,
)
from maskfl.protocol.identity import Certificate, RevocationList
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import (
    GlobalModel,
    Heartbeat,
    MessageType,
    Receipt,
    RoundParams,
    SeedDict,
    SignedMessage,
    SumDict,
    decode_message,
    encode_message,
    open_sum_dict,
    verify_sender,
    weights_digest,
)
from maskfl.protocol.topics import ParsedTopic, TopicKind, Topics
from maskfl.transport import (
    Backoff,
    Cause,
    Diagnosis,
    LastWill,
    LinkEvent,
    LinkReport,
    LinkState,
    Message,
    MqttConfig,
    MqttTransport,
    Transport,
    TransportFactory,
    broker_identity,
    diagnose,
)

__all__ = ["Agent", "build_mqtt_config", "run_daemon"]

log = logging.getLogger("maskfl.agent")

#: Round parameters, receipts and seed-less small messages are far below this.
MAX_SMALL_MESSAGE = 64 * 1024
#: The largest single PUBLISH payload we ask for: MQTT's 268,435,455-byte packet limit less
#: the room the transport adds for topic and properties (larger messages come in chunks).
MAX_PUBLISH_PAYLOAD = 268_000_000
#: Messages waiting for the round parameters they belong to.
MAX_EARLY_MESSAGES = 32
#: Exit status once a verified revocation list names this device's certificate: the
#: systemd unit has ``RestartPreventExitStatus=2``, so a revoked device stays stopped
#: instead of reconnecting forever (re-enroll it, then start it again).
EXIT_REVOKED = 2

#: What to do about a revoked certificate. A rotate revokes the old credentials too,
#: and ``add-device --force`` after a rotate would revoke the new ones as well.
_REENROLL = (
    "If {device} was rotated (maskfl-provision rotate), install its new bundle "
    "(devices/{device}.tar.gz from the operator) and start the agent again; do not run "
    "add-device --force, which would revoke that bundle too. If it was revoked, it stays "
    "out until re-enrolled with `maskfl-provision add-device {device} --force` and that "
    "bundle is installed."
)


def build_mqtt_config(config: AgentConfig, will: bytes | None = b"") -> MqttConfig:
    """The transport settings of the agent's broker section."""
    broker = config.broker
    tls = broker.tls_config()
    topics = Topics(config.device.fleet)
    # The broker knows the device by its certificate (or username) and files its session
    # under that name whatever client id is sent (use_username_as_clientid); one that is
    # not device.id would get no rights on this device's topics.
    known_as = broker_identity(tls, broker.username)
    if known_as is not None and known_as != config.device.id:
        field = "broker.cert_file" if tls is not None and tls.cert_file else "broker.username"
        raise ConfigError(
            f"{field}: the broker knows this client as {known_as!r}, but device.id is "
            f"{config.device.id!r}; use the certificate (or username) issued for "
            f"{config.device.id!r}, as in its bundle",
            field=field,
        )
    return dataclasses.replace(
        broker.mqtt_config(config.device.id, clean_start=broker.session_expiry_s == 0),
        will=None if will is None else LastWill(topics.status(config.device.id), will, qos=1),
        max_incoming_payload=min(config.limits.max_message_bytes, MAX_PUBLISH_PAYLOAD),
    )


@dataclass
class _Coordinator:
    """The coordinator of the current round, as its round parameters named it."""

    certificate: Certificate
    params: RoundParams
    digest: bytes


class Agent:
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
        clock: Callable[[], float] = time.time,
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
        self.guards = Guards(config.guards)
        self.revocations: RevocationList | None = identity.revocations
        self.coordinator: _Coordinator | None = None
        self.driver: RoundDriver | None = None
        self.transport: Transport | None = None
        self.ignored: collections.Counter[str] = collections.Counter()
        self.handler_errors = 0
        self.graphs = GraphGate(config.limits.max_graph_bytes, self.ignored)
        self._models: dict[str, tuple[GlobalModel, bytes]] = {}
        self._wanted_models: collections.Counter[str] = collections.Counter()
        self._models_changed = asyncio.Condition()
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
            _REENROLL.format(device=self.device),
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
        # A persistent session may still hold model subscriptions: the wildcard of
        # earlier versions, or one a lost link kept us from dropping.
        stale = [self.topics.model_latest_filter()]
        stale += [self.topics.model_latest(m) for m in self._models if not self._wanted_models[m]]
        await transport.unsubscribe(stale)
        wanted = [self.topics.model_latest(m) for m, n in self._wanted_models.items() if n]
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
        raw = await self.journal.get_kv("revocations")
        if raw is not None:
            with contextlib.suppress(RemoteProtocolError):
                self._accept_revocations(raw)
        latest = await self.journal.latest()
        if latest is None or latest.step.terminal:
            return
        params_raw = await self.journal.inbox(latest.round_id, "params")
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
            try:
                async with asyncio.timeout(interval):
                    await transport.publish(topic, self._heartbeat_bytes(state), qos=1)
            except TimeoutError:
                log.debug("heartbeat not acknowledged within %.0f s", interval)
            else:
                # The broker accepted a message of ours: the link, the certificate and
                # the ACL work, so the next failure may retry quickly again.
                self._on_healthy()
            await asyncio.sleep(interval)

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

    async def model(self, model_id: str, version: int, digest: bytes) -> GlobalModel:
        """The verified global model ``model_id`` with these version and digest (waits).

        It is the one we hold already, or — when the round starts from weights the
        device already has, typically version 0 of a shipped model — the local model's
        own weights, if their digest is the one the signed round parameters name, or
        else the one retained on ``model/<id>/latest`` (coordinator-signed), fetched
        now: the agent subscribes to that topic only while it waits for a model, so a
        device that is not training does not download every global model (see the
        wire format, section 6).
        """
        have = self._models.get(model_id)
        if have is not None and have[0].version == version and have[1] == digest:
            return have[0]
        local = getattr(self.learner, "local_weights", None)
        if local is not None and model_id not in self._models:
            weights = await asyncio.to_thread(local, model_id)
            if weights is not None and await asyncio.to_thread(weights_digest, weights) == digest:
                log.info(
                    "model %s v%d: the local weights match the round's digest", model_id, version
                )
                return GlobalModel(model_id, version, RoundId(0), bytes(32), weights)
        await self._want_model(model_id)
        try:
            async with self._models_changed:
                while True:
                    have = self._models.get(model_id)
                    if have is not None and have[0].version == version and have[1] == digest:
                        return have[0]
                    if have is not None and have[0].version > version:
                        raise RemoteProtocolError(
                            Reason.WRONG_ROUND,
                            f"model {model_id} is at version {have[0].version}, "
                            f"round wants {version}",
                        )
                    await self._models_changed.wait()
        finally:
            await self._unwant_model(model_id)

    async def _want_model(self, model_id: str) -> None:
        """Subscribe to ``model/<id>/latest`` (the broker sends the retained copy)."""
        self._wanted_models[model_id] += 1
        transport = self.transport
        if self._wanted_models[model_id] == 1 and transport is not None:
            log.info("fetching global model %s", model_id)
            with contextlib.suppress(TransportError):  # _serve subscribes on the next link
                await transport.subscribe(self.topics.model_latest(model_id), qos=1)

    async def _unwant_model(self, model_id: str) -> None:
        self._wanted_models[model_id] -= 1
        transport = self.transport
        if self._wanted_models[model_id] <= 0:
            del self._wanted_models[model_id]
            if transport is not None:
                with contextlib.suppress(TransportError):  # _serve drops it on the next link
                    await transport.unsubscribe(self.topics.model_latest(model_id))

    def global_model(self, model_id: str) -> GlobalModel | None:
        """The newest verified global model ``model_id`` received, if any."""
        have = self._models.get(model_id)
        return None if have is None else have[0]

    # -- message handling --------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Check and act on one received message; protocol violations are logged, counted."""
        try:
            parsed = self.topics.parse(message.topic)
            payload = message.payload
            if not payload:
                # A retained message being cleared (the coordinator tidies old rounds).
                log.debug("empty message on %s (retained message cleared)", message.topic)
                return
            if is_chunk(payload):
                whole = self._reassembler.feed(message.topic, payload, time.monotonic())
                if whole is None:
                    return
                payload = whole.payload
            await self._dispatch(message.topic, parsed, payload)
        except RemoteProtocolError as exc:
            self.ignored[str(exc.reason)] += 1
            log.warning("ignored message on %s: %s", message.topic, exc)
        except CryptoError as exc:
            self.ignored["crypto"] += 1
            log.warning("ignored message on %s: %s", message.topic, exc)

    async def _dispatch(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        match parsed.kind:
            case TopicKind.ROUND:
                await self._on_round(payload)
            case TopicKind.REVOCATIONS:
                if self._accept_revocations(payload):
                    await self.journal.set_kv("revocations", payload)
            case TopicKind.SUMS | TopicKind.SEEDS | TopicKind.RECEIPTS | TopicKind.MODEL_LATEST:
                if self.coordinator is None:
                    self._keep_early(topic, payload)
                    return
                await self._on_coordinator_message(topic, parsed, payload)
            case TopicKind.MODEL_GRAPH:
                if parsed.model_id is None:
                    return
                if len(payload) < 1 << 20:
                    verified = self.graphs.offer(parsed.model_id, payload)
                else:  # hashing a large graph off the event loop
                    verified = await asyncio.to_thread(self.graphs.offer, parsed.model_id, payload)
                if verified is not None:
                    self._give_graph(parsed.model_id, verified)
            case _:
                log.debug("message on %s is not for agents; ignored", topic)

    def _give_graph(self, model_id: str, graph: bytes) -> None:
        """Hand a graph the gate verified to the learner (if it takes graphs)."""
        add_graph = getattr(self.learner, "add_graph", None)
        if add_graph is not None:
            add_graph(model_id, graph)
            log.info("model graph for %r verified (%d bytes)", model_id, len(graph))

    def _state_graph_digest(self, model: GlobalModel) -> None:
        """A newly verified global model names its graph: tell the learner and the gate."""
        stated = None if model.graph_digest == NOT_STATED else model.graph_digest
        set_digest = getattr(self.learner, "set_graph_digest", None)
        if set_digest is not None:
            set_digest(model.model_id, stated)
        verified = self.graphs.state(model.model_id, model.graph_digest, version=model.version)
        if verified is not None:
            self._give_graph(model.model_id, verified)

    def _keep_early(self, topic: str, payload: bytes) -> None:
        self._early[topic] = payload
        self._early.move_to_end(topic)
        while len(self._early) > MAX_EARLY_MESSAGES:
            dropped, _ = self._early.popitem(last=False)
            log.info("dropped early message on %s (buffer full)", dropped)

    async def _replay_early(self) -> None:
        early, self._early = self._early, collections.OrderedDict()
        for topic, payload in early.items():
            await self.handle(Message(topic, payload, qos=1))

    def _accept_revocations(self, payload: bytes) -> bool:
        """Keep a CA-signed revocation list if it is newer than ours; True if it was."""
        revocations = RevocationList.from_bytes(payload)
        revocations.verify(ca_public_key=self.identity.ca_public_key, fleet=self.fleet)
        if self.revocations is not None and revocations.version <= self.revocations.version:
            return False
        self.revocations = revocations
        log.info(
            "revocation list version %d: %d serials", revocations.version, len(revocations.serials)
        )
        serial = self.identity.identity.certificate.serial
        if serial in revocations.serials and self.exit_code != EXIT_REVOKED:
            log.error(
                "this device's certificate (%s, serial %d) is revoked by revocation list "
                "version %d: stopping for good (exit status %d). %s",
                self.device,
                serial,
                revocations.version,
                EXIT_REVOKED,
                _REENROLL.format(device=self.device),
            )
            self.notifier.status(f"revoked (revocation list version {revocations.version})")
            self.exit_code = EXIT_REVOKED
            self.request_stop()
        return True

    async def _on_round(self, payload: bytes, *, from_journal: bool = False) -> None:
        signed = decode_message(payload, max_size=MAX_SMALL_MESSAGE)
        signed.expect(fleet=self.fleet, types=(MessageType.ROUND_PARAMS,))
        params = signed.body
        assert isinstance(params, RoundParams)
        rid = int(params.round_id)
        current = self.driver
        if (
            current is not None
            and rid == current.round_id
            and signed.digest == current.params_digest
        ):
            return  # the retained copy again
        if current is not None and rid <= current.round_id:
            raise RemoteProtocolError(
                Reason.WRONG_ROUND,
                f"round parameters for round {rid}, but round {current.round_id} is current",
                round_id=rid,
            )
        cert = verify_sender(
            signed,
            ca_public_key=self.identity.ca_public_key,
            fleet=self.fleet,
            now=self.clock(),
            revocations=self.revocations,
        )
        if not params.seed_is_chained:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"round {rid} seed is not the hash chain of the previous seed and model",
                round_id=rid,
            )
        if not from_journal:
            log.info(
                "round %d: parameters (p_sum %.3f, p_update %.3f, model %s v%d, M = %d)",
                rid,
                params.p_sum,
                params.p_update,
                params.model_id,
                params.model_version,
                params.vector_length,
            )
        self.coordinator = _Coordinator(cert, params, signed.digest)
        await self.journal.put_inbox(rid, "params", payload)
        if current is not None:
            await current.abandon(f"round {rid} started")
        ctx = RoundContext(
            config=self.config,
            identity=self.identity,
            journal=self.journal,
            topics=self.topics,
            learner=self.learner,
            guards=self.guards,
            publish=self.publish,
            model=self.model,
            clock=self.clock,
        )
        self.driver = RoundDriver(ctx, params, signed.digest)
        task = self.driver.start()
        task.add_done_callback(_log_crash)
        await self.journal.prune(keep_rounds=4)
        await self._replay_early()

    def _verify_coordinator(self, signed: SignedMessage, kind: MessageType) -> None:
        assert self.coordinator is not None
        signed.expect(fleet=self.fleet, types=(kind,))
        verify_sender(
            signed,
            ca_public_key=self.identity.ca_public_key,
            fleet=self.fleet,
            now=self.clock(),
            revocations=self.revocations,
            certificate=self.coordinator.certificate,
        )

    async def _on_coordinator_message(  # noqa: PLR0912, PLR0915 one match arm per coordinator topic kind
        self, topic: str, parsed: ParsedTopic, payload: bytes
    ) -> None:
        assert self.coordinator is not None
        driver = self.driver
        current = int(self.coordinator.params.round_id)
        limit = self.config.limits.max_message_bytes
        match parsed.kind:
            case TopicKind.SUMS | TopicKind.SEEDS:
                if parsed.round_id is None or parsed.round_id < current:
                    log.debug("%s is for an earlier round; ignored", topic)
                    return
                if parsed.round_id > current:
                    self._keep_early(topic, payload)
                    return
                if parsed.kind is TopicKind.SEEDS and parsed.device != self.device:
                    return
                signed = await _decode(payload, limit)
                if parsed.kind is TopicKind.SUMS:
                    self._verify_coordinator(signed, MessageType.SUM_DICT)
                    signed.expect(fleet=self.fleet, round_id=current)
                    assert isinstance(signed.body, SumDict)
                    sums = open_sum_dict(
                        signed.body,
                        fleet=self.fleet,
                        round_id=current,
                        ca_public_key=self.identity.ca_public_key,
                        now=self.clock(),
                        revocations=self.revocations,
                        groups=self.coordinator.params.groups,
                        round_seed=self.coordinator.params.seed,
                    )
                    log.info(
                        "round %d: sum dictionary with %d summers verified", current, len(sums)
                    )
                    if driver is not None:
                        driver.offer_sums(sums)
                else:
                    self._verify_coordinator(signed, MessageType.SEED_DICT)
                    signed.expect(fleet=self.fleet, round_id=current)
                    body = signed.body
                    assert isinstance(body, SeedDict)
                    if body.summer_pk != self.identity.identity.public_key:
                        raise RemoteProtocolError(
                            Reason.MALFORMED, "seed dictionary names another summer"
                        )
                    log.info(
                        "round %d: seed dictionary with %d seeds", current, len(body.sealed_seeds)
                    )
                    if driver is not None:
                        driver.offer_seeds(payload, body)
            case TopicKind.RECEIPTS:
                if parsed.device != self.device:
                    return
                signed = decode_message(payload, max_size=MAX_SMALL_MESSAGE)
                self._verify_coordinator(signed, MessageType.RECEIPT)
                receipt = signed.body
                assert isinstance(receipt, Receipt)
                await self._on_receipt(receipt)
            case TopicKind.MODEL_LATEST:
                signed = await _decode(payload, limit)
                self._verify_coordinator(signed, MessageType.GLOBAL_MODEL)
                model = signed.body
                assert isinstance(model, GlobalModel)
                if model.model_id != parsed.model_id:
                    raise RemoteProtocolError(
                        Reason.MALFORMED, f"model {model.model_id!r} on the topic of another"
                    )
                have = self._models.get(model.model_id)
                if have is not None and have[0].version > model.version:
                    return
                digest = await asyncio.to_thread(lambda: model.digest)
                self._state_graph_digest(model)
                async with self._models_changed:
                    self._models[model.model_id] = (model, digest)
                    self._models_changed.notify_all()
                log.info("global model %s version %d received", model.model_id, model.version)
            case _:
                pass

    async def _on_receipt(self, receipt: Receipt) -> None:
        entry = await self.journal.outbox_by_digest(receipt.message_digest)
        if entry is None:
            log.debug("receipt for a message we do not know; ignored")
            return
        driver = self.driver
        if driver is not None and driver.round_id == entry.round_id:
            driver.offer_receipt(entry.kind, receipt)
        elif entry.status is OutboxStatus.PENDING:
            # A round we left: journal the answer as the round's driver would have.
            outcome = classify_receipt(receipt, repeated=entry.attempts > 1)
            if outcome is Outcome.AMBIGUOUS:
                return
            status = OutboxStatus.REJECTED if outcome is Outcome.REJECTED else OutboxStatus.ACCEPTED
            await self.journal.mark_receipt(
                entry.round_id, entry.kind, status, str(receipt.reason or "")
            )


async def _decode(payload: bytes, max_size: int) -> SignedMessage:
    """decode_message, off the event loop for large payloads (hashing a model takes time)."""
    if len(payload) < 1 << 20:
        return decode_message(payload, max_size=max_size)
    return await asyncio.to_thread(decode_message, payload, max_size=max_size)


def _log_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("round task crashed: %r", exc, exc_info=exc)


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
