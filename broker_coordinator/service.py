"""The coordinator process: wiring, start-up checks, supervision, shutdown.

Start-up validates everything a user can get wrong (files, keys, the
coordinator's own certificate against the fleet CA, the initial weights'
length) and raises :class:`ConfigError` naming the key, before touching the
network. Then it opens the store, loads the latest model from the registry
(or registers the initial weights as version 0), connects with a persistent
MQTT 5 session (retrying with backoff while the broker is unreachable),
re-publishes the retained state, and runs four tasks: ingest, the group
committer, the round runner, housekeeping (revocation list reload, stale
partial messages, gauges). A task that dies of an unexpected error is logged,
counted and restarted; the round resumes from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from maskfl.aggregator_gpu import Backend, select_backend
from maskfl.broker_coordinator.committer import Committer
from maskfl.broker_coordinator.config import CoordinatorConfig, check_files
from maskfl.broker_coordinator.context import Contribution, ModelState, OpenRound, Services
from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.broker_coordinator.fleetview import Timeline, device_table, model_history, round_history
from maskfl.broker_coordinator.http import OpsServer
from maskfl.broker_coordinator.ingest import Ingest
from maskfl.broker_coordinator.liveness import StatusSubscription
from maskfl.broker_coordinator.metrics import Metrics
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.broker_coordinator.outbox import Outbox
from maskfl.broker_coordinator.privacy import Accountant, DpPlan, plan, privacy_status
from maskfl.broker_coordinator.runner import Runner
from maskfl.broker_coordinator.store import CheckpointFiles, ModelRecord, Store, UpdateLog
from maskfl.protocol.errors import ConfigError, MaskflError, Reason, TransportError
from maskfl.protocol.identity import (
    Certificate,
    IdentityCertificateError,
    IdentityCryptoError,
    IdentityPart,
    check_identity,
)
from maskfl.protocol.ids import Role, RoundId
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.messages import MESSAGE_PHASES, GlobalModel, weights_digest
from maskfl.protocol.topics import Topics
from maskfl.transport import (
    SYSTEM_CLOCK,
    Backoff,
    Clock,
    LinkEvent,
    LinkReport,
    LinkState,
    MqttConfig,
    MqttTransport,
    TlsConfig,
    Transport,
    TransportFactory,
    broker_identity,
    diagnose,
)

log = logging.getLogger("maskfl.coordinator")

DB_NAME = "coordinator.db"
#: The client id on a broker that knows no identity (an anonymous development listener).
COORDINATOR_CLIENT_ID = "coordinator"
MAX_GRAPH_BYTES = 256 * 1024 * 1024
_TICK_S = 1.0
_RECEIPTS_AT_STOP_S = 5.0
"""How long a clean stop waits for the broker to confirm the receipts still pending."""
_SAMPLE_S = 5.0
"""How often the status page's timeline (devices alive, rejections) takes a sample."""
_PAGE_CACHE_S = 2.0
"""The status page's database reads are reused for at least this long (any number of
viewers), and for ten times as long as they took (a large fleet's page costs at most a
tenth of a core)."""
PAGE_DEVICES = 500
"""Device rows on the status page: the most recently heard from (the CLI shows all)."""
_RESTART_PAUSE_S = 2.0


def mask_and_dp(config: CoordinatorConfig) -> tuple[MaskConfig, DpPlan | None]:
    """The round's mask config and, with ``privacy.dp = "distributed"``, its DP plan:
    the aggregate noise bound widens the encoding (``word_bits = "auto"`` picks 64
    bits when 32 would be too coarse with it)."""
    m = config.masking

    def make(noise: float) -> MaskConfig:
        try:
            if m.word_bits == "auto":
                return MaskConfig.for_tolerance(m.bound, m.n_max, m.tolerance, noise)
            return MaskConfig(m.bound, m.n_max, m.word_bits, noise)
        except ConfigError as exc:
            raise ConfigError(f"masking.{exc.field or 'n_max'}: {exc}", field="masking") from exc

    p = config.privacy
    if p.dp == "off":
        return make(0.0), None
    return plan(
        noise_multiplier=p.noise_multiplier,
        epsilon_target=p.epsilon_target,
        delta=p.delta,
        clip_norm=p.clip_norm,
        budget=p.budget,
        n_min=p.min_updates,
        elements=config.model.length,
        make_mask=make,
    )


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}", field=field) from exc


def load_identity(config: CoordinatorConfig) -> tuple[bytes, SigningKey, Certificate]:
    """The CA key, our signing key and our certificate, checked against each other."""
    check_files(config)
    fields = {
        IdentityPart.KEY: "identity.key_file",
        IdentityPart.CA_PUBLIC_KEY: "fleet.ca_public_key_file",
        IdentityPart.CERTIFICATE: "identity.certificate_file",
    }
    passphrase = None
    if config.identity.passphrase_env:
        passphrase = os.environ[config.identity.passphrase_env].encode()
    try:
        checked = check_identity(
            key_pem=_read(config.identity.key_file, "identity.key_file"),
            passphrase=passphrase,
            certificate=_read(config.identity.certificate_file, "identity.certificate_file"),
            ca_public_key_pem=_read(config.fleet.ca_public_key_file, "fleet.ca_public_key_file"),
            fleet=config.fleet.id,
            role=Role.COORDINATOR,
            now=time.time(),
        )
    except IdentityCryptoError as exc:
        field = fields[exc.part]
        raise ConfigError(f"{field}: {exc}", field=field) from exc
    except IdentityCertificateError as exc:
        field = fields[exc.part]
        raise ConfigError(
            f"{field}: {exc}; issue a coordinator certificate of fleet {config.fleet.id!r} "
            "with maskfl-provision",
            field=field,
        ) from exc
    identity = checked.identity
    return checked.ca_public_key, identity.signing_key, identity.certificate


def initial_weights(config: CoordinatorConfig) -> npt.NDArray[np.float32]:
    path = config.model.initial_weights
    length = config.model.length
    if path is None:
        log.warning("model.initial_weights not set: starting from zeros")
        return np.zeros(length, dtype=np.float32)
    try:
        weights = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.initial_weights: cannot read {path} as .npy: {exc}",
            field="model.initial_weights",
        ) from exc
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if weights.size != length:
        raise ConfigError(
            f"model.initial_weights has {weights.size} values but model.length is {length}: "
            "fix one of them",
            field="model.length",
        )
    return weights


def model_graph(config: CoordinatorConfig) -> bytes | None:
    """The model's .tflite bytes (published as they are; devices check the digest)."""
    path = config.model.graph_file
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"model.graph_file: cannot read {path}: {exc}", field="model.graph_file"
        ) from exc
    if not data or len(data) > MAX_GRAPH_BYTES:
        raise ConfigError(
            f"model.graph_file: {path} has {len(data)} bytes; a graph must be 1 byte to "
            f"{MAX_GRAPH_BYTES} bytes",
            field="model.graph_file",
        )
    return data


def mqtt_config(config: CoordinatorConfig) -> MqttConfig:
    b = config.broker
    return dataclasses.replace(
        b.mqtt_config(coordinator_client_id(config, b.tls_config()), clean_start=False),
        manual_ack=True,
        receive_maximum=b.receive_maximum,
        max_inflight=100,
        max_queued_publishes=100_000,
        incoming_queue_size=config.transport_queue_size,  # part of the message memory
        max_incoming_payload=config.max_delivery_bytes,
    )


def coordinator_client_id(config: CoordinatorConfig, tls: TlsConfig | None) -> str:
    """The client id: the name the broker knows the coordinator by (its certificate's
    common name, else its username), which a provisioned broker uses as the client id
    whatever is sent (``use_username_as_clientid``); ``broker.client_id`` only for an
    anonymous broker, and refused when it contradicts that name."""
    b = config.broker
    known_as = broker_identity(tls, b.username)
    if known_as is None:
        return b.client_id or COORDINATOR_CLIENT_ID
    if b.client_id is not None and b.client_id != known_as:
        raise ConfigError(
            f"broker.client_id = {b.client_id!r}: the broker knows the coordinator as "
            f"{known_as!r} (its TLS certificate or username) and uses that as its client id; "
            "delete the line",
            field="broker.client_id",
        )
    return known_as


class Coordinator:
    """One coordinator process. ``await Coordinator(config).run(stop)``.

    Its I/O is injected, as the agent's is: ``transport_factory`` makes the broker link
    from the ``[broker]`` settings (default :class:`MqttTransport`; a test passes a
    :class:`~maskfl.transport.MemoryBroker`'s clients) and ``clock`` is the wall clock
    the round reads and waits on (phase windows, pauses, the group commit, liveness,
    records; default :data:`~maskfl.transport.SYSTEM_CLOCK`).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        transport_factory: TransportFactory | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self._factory: TransportFactory = transport_factory or MqttTransport
        self.clock = clock
        self.metrics = Metrics()
        self.services: Services | None = None
        self.runner: Runner | None = None
        self.ingest: Ingest | None = None
        self.transport: Transport | None = None
        self.http: OpsServer | None = None
        self._store_open = False
        self.started = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.timeline = Timeline()
        self._page_cache: tuple[float, dict[str, Any]] | None = None

    # -- ops ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self._store_open:
            return False, "database not open"
        if self.transport is None or not self.transport.is_connected:
            return False, "broker link down"
        if self.runner is None:
            return False, "not started"
        return True, "ready"

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready()[0]}
        runner, s = self.runner, self.services
        if runner is not None and s is not None:
            state = runner.state
            out.update(
                phase=str(runner.phase),
                round_id=None if state is None else state.round_id,
                summers=0 if state is None else len(state.summers),
                groups=None if state is None else state.params.groups,
                summer_groups=None if state is None else _summer_groups(state),
                updates=0 if state is None else len(state.updates),
                sum2=0 if state is None else len(state.sum2),
                model_id=s.model.model_id,
                model_version=s.model.version,
                model_evaluation=self.metrics.evaluation,
                devices_alive=s.alive_count(),
                liveness_listening=s.liveness.listening,
                rounds_completed=runner.rounds_completed,
                rounds_failed=runner.rounds_failed,
                last_failure=None
                if runner.last_failure is None
                else {"round_id": runner.last_failure[0], "reason": runner.last_failure[1]},
                last_round_ingest=runner.last_ingest,
                reassembly=self.ingest.chunks.status() if self.ingest else {},
                message_memory=self.ingest.memory_status() if self.ingest else {},
                rejected=self.metrics.rejected_total(),
                backend=s.backend.description,
                word_bits=s.mask.word_bits,
                resolution=s.mask.resolution,
                privacy=self._privacy(s),
            )
        if self.transport is not None:
            st = self.transport.stats
            out["mqtt"] = {
                "connected": self.transport.is_connected,
                "received": st.received,
                "redelivered": st.redelivered,
                "dropped_oversize": st.dropped_oversize,
                "connects": st.connects,
            }
        return out

    def progress(self) -> dict[str, Any]:
        """The current phase against its closing rule: messages in, targets, deadline."""
        runner = self.runner
        out: dict[str, Any] = {"phase": None if runner is None else str(runner.phase)}
        state = None if runner is None else runner.state
        if runner is None or state is None:
            return out
        out["round_id"] = state.round_id
        out["round_started_at"] = state.record.started_at
        out["phase_opened_at"] = state.record.phase_opened_at
        window = state.window
        if runner.phase in MESSAGE_PHASES and window is not None:
            w = window.limits
            out.update(
                messages=window.count,
                count_min=w.count_min,
                count_max=w.count_max,
                time_min_s=w.time_min_s,
                time_max_s=w.time_max_s,
                deadline=window.opened_at + w.time_max_s,
            )
        return out

    async def dashboard(self) -> dict[str, Any]:
        """Everything the status page shows, as JSON (``GET /api/dashboard``)."""
        s = self.services
        now = self.clock()
        out: dict[str, Any] = {
            "now": now,
            "fleet": self.config.fleet.id,
            "status": self.status(),
            "progress": self.progress(),
            "timeline": self.timeline.as_json(),
        }
        if s is None or not self._store_open:
            return {**out, "rounds": [], "models": [], "devices": []}
        cached = self._page_cache
        if cached is None or now > cached[0]:
            model_id = s.model.model_id
            started = time.perf_counter()
            stored = {
                "rounds": await round_history(s.store, model_id, now=now),
                "models": await model_history(s.store, model_id),
                "devices": await device_table(
                    s.store,
                    revocations=s.enrollment.revocations,
                    alive=s.liveness.last_heard,
                    alive_since=s.liveness.horizon(now),
                    limit=PAGE_DEVICES,
                ),
                "devices_total": await s.store.device_count(),
            }
            took = time.perf_counter() - started
            self._page_cache = cached = (now + max(_PAGE_CACHE_S, 10 * took), stored)
        return {**out, **cached[1]}

    # -- lifecycle ---------------------------------------------------------------

    async def _connect(self, stop: asyncio.Event) -> Transport:
        """The first connect, retried with the transport's shared back-off; one log line
        per change of the likely cause (the transport repairs later losses itself)."""
        cfg = mqtt_config(self.config)
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        report = LinkReport(log, f"broker {cfg.address}")
        while True:
            transport = self._factory(cfg)
            transport.add_listener(self._on_link)
            try:
                await transport.connect()
                report.up()
                return transport
            except ConfigError:
                raise
            except TransportError as exc:
                delay = backoff.next_delay()
                report.failed(diagnose(exc), delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            if stop.is_set():
                raise asyncio.CancelledError

    def _on_link(self, event: LinkEvent) -> None:
        # The transport logs losses and their likely cause once per change.
        self.metrics.mqtt_connected.set(1 if event.state is LinkState.CONNECTED else 0)
        if event.state is LinkState.CONNECTED:
            log.debug("broker link up (session present: %s)", event.session_present)
            if not event.session_present and self.runner is not None:
                # The broker lost its state (restart without persistence): our
                # retained messages may be gone too. Publish them again.
                task = asyncio.get_running_loop().create_task(self._republish())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _republish(self) -> None:
        s, runner = self.services, self.runner
        if s is None or runner is None:
            return
        try:
            await self._publish_fleet_state(s)
            await runner.republish()
        except MaskflError as exc:
            log.warning("republishing retained state failed: %s", exc)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        config = self.config
        ca, key, cert = load_identity(config)
        mask, dp, backend = _aggregation(config)
        weights0 = initial_weights(config)
        graph = model_graph(config)
        state_dir = config.storage.dir
        state_dir.mkdir(parents=True, exist_ok=True)
        enrollment = _enrollment(config, ca)
        await self._start_http()
        try:
            async with Store.open(
                state_dir / DB_NAME, keep_versions=config.registry.keep_versions
            ) as store:
                self._store_open = True
                try:
                    await store.collect_model_files()
                    optimizer = ServerOptimizer(config.optimizer)
                    model = await self._load_model(store, weights0, optimizer)
                    # Only services.model may hold the model (it moves on each round): a
                    # local here (the initial weights, the first ModelState) or the latest
                    # registry record (its metrics come from the row, not the files) would
                    # hold a model's worth for the process's life.
                    del weights0
                    model_metrics = await _latest_metrics(store, model)
                    self.metrics.model_version.set(model.version)
                    self.transport = transport = await self._connect(stop)
                    services = Services(
                        config=config,
                        store=store,
                        checkpoints=CheckpointFiles(state_dir / "checkpoints"),
                        update_log=UpdateLog(state_dir / "updates"),
                        backend=backend,
                        signing_key=key,
                        certificate=cert,
                        topics=Topics(config.fleet.id),
                        enrollment=enrollment,
                        metrics=self.metrics,
                        mask=mask,
                        optimizer=optimizer,
                        outbox=Outbox(transport, self.metrics, config.pet.chunk_size),
                        model=model,
                        graph=graph,
                        graph_digest=hashlib.sha256(graph).digest() if graph else bytes(32),
                        clock=self.clock,
                        dp=dp,
                        accountant=self._accountant(dp, model_metrics),
                    )
                    self.services = services
                    del model
                    try:
                        await self._serve(services, transport, stop)
                    finally:
                        await services.outbox.close()
                        await transport.disconnect()
                finally:
                    self._store_open = False
        finally:
            if self.http is not None:
                await self.http.stop()

    async def _start_http(self) -> None:
        """The ops server, when enabled. Before the database and the broker: /healthz
        answers as soon as the process runs (a container health check must not fail
        because the broker is down), /readyz answers 503 with the reason until the
        broker link is up."""
        http = self.config.http
        if http.enabled:
            self.http = OpsServer(
                self.metrics, ready=self.ready, status=self.status, dashboard=self.dashboard
            )
            await self.http.start(http.host, http.port)

    @staticmethod
    def _privacy(s: Services) -> dict[str, Any]:
        p = s.config.privacy
        if s.accountant is None or s.dp is None:
            return privacy_status(p.dp, p.delta, p.budget, {})
        acc = s.accountant
        metrics = {
            "dp_rho_total": acc.rho,
            "dp_rho_round": s.dp.rho,
            "dp_rounds": float(acc.rounds),
        }
        out = privacy_status(p.dp, p.delta, p.budget, metrics)
        out["noise_multiplier"] = s.dp.noise_multiplier
        out["clip_norm"] = s.dp.clip_norm
        return out

    @staticmethod
    def _accountant(dp: DpPlan | None, metrics: Mapping[str, float]) -> Accountant | None:
        """The accountant, resumed from the latest model's metrics (the cumulative rho
        and round count every DP model carries), so a restart forgets no round."""
        if dp is None:
            return None
        acc = Accountant(
            delta=dp.delta,
            rho=float(metrics.get("dp_rho_total", 0.0)),
            rounds=int(metrics.get("dp_rounds", 0)),
        )
        if acc.rounds:
            log.info(
                "privacy spent so far: epsilon %.4g at delta %g over %d rounds",
                acc.epsilon(),
                acc.delta,
                acc.rounds,
            )
        return acc

    async def _load_model(
        self, store: Store, weights0: npt.NDArray[np.float32], optimizer: ServerOptimizer
    ) -> ModelState:
        model_id = self.config.model.id
        latest = await store.latest_model(model_id)
        if latest is None:
            digest = weights_digest(weights0)
            async with store.transaction() as tx:
                await tx.add_model(
                    ModelRecord(
                        model_id=model_id,
                        version=0,
                        round_id=None,
                        digest=digest,
                        weights=np.ascontiguousarray(weights0, "<f4").data.cast("B"),
                        metrics={},
                        message=None,
                        optimizer_state=None,
                        created_at=self.clock(),
                    )
                )
            log.info("registered the initial weights of %s as version 0", model_id)
            return ModelState(model_id, 0, weights0, digest)
        # A view of the registry's bytes (the signed message: no second copy of the model).
        weights = np.frombuffer(latest.weights, dtype="<f4")
        if weights.size != self.config.model.length:
            raise ConfigError(
                f"model.length is {self.config.model.length} but the registry's {model_id} "
                f"v{latest.version} has {weights.size} weights: use another model.id or "
                "storage.dir",
                field="model.length",
            )
        optimizer.load_state(latest.optimizer_state, weights.size)
        m = latest.metrics
        if "evaluated_version" in m:
            self.metrics.set_evaluation(
                int(m["evaluated_version"]), m["accuracy"], m["loss"], int(m["examples"])
            )
        return ModelState(model_id, latest.version, weights, latest.digest)

    @classmethod
    async def _publish_fleet_state(cls, s: Services) -> None:
        """What is retained for the fleet beside the round: the revocation list, the
        model's graph and its latest version (at start and after the broker lost it)."""
        if s.enrollment.revocations_raw is not None:
            await s.outbox.state(s.topics.revocations, s.enrollment.revocations_raw)
        if s.graph is not None:
            await s.outbox.state(s.topics.model_graph(s.model.model_id), s.graph)
        await cls._publish_model(s)

    @staticmethod
    async def _publish_model(s: Services) -> None:
        """The latest model, retained, as the registry has it signed. In its own frame:
        the registry record (a model's worth) must not stay referenced by ``_serve``,
        which runs for the life of the service."""
        if s.model.version > 0:
            latest = await s.store.latest_model(s.model.model_id)
            if latest is not None and latest.message is not None:
                await s.outbox.state(s.topics.model_latest(s.model.model_id), latest.message)
        else:
            # The initial weights have no round, so nothing signed them yet; agents train
            # only on a verified model, so publish version 0 signed (round id 0), from the
            # weights in memory (reading the registry's copy would be a second model's worth).
            v0 = GlobalModel(
                model_id=s.model.model_id,
                version=0,
                round_id=RoundId(0),
                previous_digest=bytes(32),
                weights=s.model.weights,
                graph_digest=s.graph_digest,
            )
            await s.outbox.state(s.topics.model_latest(s.model.model_id), s.sign(v0, 0))

    async def _serve(self, s: Services, transport: Transport, stop: asyncio.Event) -> None:
        # Heartbeats bypass the ingest queue (liveness), at QoS 0: no PUBACK each, and
        # none pile up in our broker session while we are away. The runner subscribes to
        # them in the phases that read them (runner.NO_HEARTBEATS_IN).
        transport.tap(s.topics.status_prefix, s.liveness.on_status)
        status = StatusSubscription(transport, s.topics.status_filter(), s.liveness, s.metrics)
        await transport.subscribe(list(s.topics.participant_filters()), qos=1)
        await self._publish_fleet_state(s)

        def settle(
            item: Contribution, reason: Reason | None, detail: str, receipt: bytes | None
        ) -> None:
            ingest.settle(item, reason, detail, receipt)

        committer = Committer(s, settle, transport.ack)
        runner = Runner(s, committer, status)
        ingest = Ingest(s, runner, transport)
        self.runner, self.ingest = runner, ingest
        committer.start()
        await runner.resume()
        await status.settled()  # subscribed (or not) as the resumed phase wants
        # Accepted messages' receipts that the last run stored but never got to the broker.
        s.outbox.resend_stored(await s.store.stored_receipts())
        tasks = {
            "ingest": self._supervise("ingest", ingest.run, stop),
            "runner": self._supervise("runner", runner.run, stop),
            "housekeeping": self._supervise(
                "housekeeping", lambda: self._housekeeping(s, ingest), stop
            ),
        }
        running = [asyncio.create_task(coro, name=name) for name, coro in tasks.items()]
        self.started.set()
        try:
            await stop.wait()
        finally:
            for task in running:
                task.cancel()
            status.close()
            await asyncio.gather(*running, return_exceptions=True)
            # Not asyncio.wait_for: on Python 3.11 it drops a cancel that comes in the
            # same loop iteration as the drain's end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await committer.drain()
            await committer.stop()
            await s.outbox.wait_sent(_RECEIPTS_AT_STOP_S)
            await self._receipts_delivered(s)
            await ingest.rejections.flush(s.store)

    @staticmethod
    async def _receipts_delivered(s: Services) -> None:
        """Forget the stored receipts the broker has (those that no group commit
        took along)."""
        delivered = s.outbox.take_sent()
        s.metrics.receipts_pending.set(s.outbox.pending)
        if delivered:
            async with s.store.transaction() as tx:
                await tx.receipts_delivered(delivered)

    async def _supervise(
        self, name: str, body: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        """Run ``body``; if it ends or dies, log, count and start it again (until stop)."""
        while not stop.is_set():
            try:
                await body()
                if name == "runner":
                    log.info("the round runner finished (max_rounds); stopping")
                    stop.set()
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # the one supervisor loop that keeps the service up
                log.exception("task %s died; restarting in %.0f s", name, _RESTART_PAUSE_S)
                self.metrics.rounds.labels(outcome="crashed").inc()
            await asyncio.sleep(_RESTART_PAUSE_S)

    async def _housekeeping(self, s: Services, ingest: Ingest) -> None:
        poll = s.config.fleet.revocations_poll_s
        next_poll = next_sample = 0.0
        loop = asyncio.get_running_loop()
        while True:
            ingest.tick()
            await ingest.rejections.flush(s.store)
            await self._receipts_delivered(s)
            if loop.time() >= next_sample:
                next_sample = loop.time() + _SAMPLE_S
                self.timeline.add(s.clock(), s.alive_count(), self.metrics.rejected_total())
            if loop.time() >= next_poll:
                next_poll = loop.time() + poll
                if s.enrollment.reload_if_changed() and s.enrollment.revocations_raw is not None:
                    await s.outbox.state(s.topics.revocations, s.enrollment.revocations_raw)
            await asyncio.sleep(_TICK_S)


def _enrollment(config: CoordinatorConfig, ca: bytes) -> Enrollment:
    """The fleet's enrollment check, its revocation list read."""
    enrollment = Enrollment(
        fleet=config.fleet.id,
        ca_public_key=ca,
        revocations_file=config.fleet.revocations_file,
        cache_size=config.fleet.max_devices,
    )
    enrollment.reload_if_changed()
    return enrollment


async def _latest_metrics(store: Store, model: ModelState) -> dict[str, float]:
    """The latest version's metrics, from its row (not its files: a reference to them
    would hold a model's worth for the process's life)."""
    versions = await store.models(model.model_id)
    return dict(versions[-1].metrics) if versions else {}


def _aggregation(config: CoordinatorConfig) -> tuple[MaskConfig, DpPlan | None, Backend]:
    """The masking, the differential-privacy plan and the aggregation backend, logged."""
    mask, dp = mask_and_dp(config)
    backend = select_backend(config.aggregation.backend)
    log.info(
        "masking: %d-bit words, bound %g, n_max %d, resolution %.3g; aggregation: %s",
        mask.word_bits,
        mask.bound,
        mask.n_max,
        mask.resolution,
        backend.description,
    )
    log.info("differential privacy: %s", "off" if dp is None else dp.describe())
    return mask, dp, backend


def state_db(config: CoordinatorConfig) -> Path:
    return config.storage.dir / DB_NAME


def _summer_groups(state: OpenRound) -> list[dict[str, Any]]:
    """The round's summers so far with their mask group (public: anyone can compute
    ``group_of`` from the round seed and the summer's key), sorted by group then device."""
    rows = [
        {"device": r.device_id, "group": state.params.group_of(r.public_key)}
        for r in state.summers.values()
    ]
    return sorted(rows, key=lambda row: (row["group"], row["device"]))
