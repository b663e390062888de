"""Every received message: checked before anything acts on it, then handed on.

:meth:`Inbound.handle` checks topic, size, signature and certificate. A message that
breaks the protocol is a :class:`RemoteProtocolError`: one log line (``ignored
message on <topic>: <reason>: <why>``), a counter, and the agent goes on.

Round parameters start a :class:`~maskfl.agent.rounds.RoundDriver`; they name the
coordinator's certificate (checked against the fleet CA), and every other coordinator
message — sum and seed dictionaries, receipts, global models — is checked against it.
Messages that arrive before the parameters they belong to (retained messages come in
any order) wait in a small bounded buffer. The one unsigned input, the model graph on
``model/<id>/graph``, goes through a :class:`~maskfl.agent.graphs.GraphGate`: the
learner sees it only once its SHA-256 equals the ``graph_digest`` of a verified
global model. A CA-signed revocation list that names this device stops the agent for
good (:data:`EXIT_REVOKED`).

:class:`Inbound` is the message half of :class:`~maskfl.agent.daemon.Agent`, which
owns the state it reads (declared here) and the link.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maskfl.agent.config import AgentConfig
from maskfl.agent.delivery import classify_receipt, receipt_status
from maskfl.agent.global_models import GlobalModels
from maskfl.agent.graphs import NOT_STATED, GraphGate
from maskfl.agent.guards import Guards
from maskfl.agent.identity import DeviceIdentity
from maskfl.agent.learning import Learner
from maskfl.agent.rounds import RoundContext, RoundDriver
from maskfl.agent.sdnotify import Notifier
from maskfl.agent.state import InboxKey, Journal, ReceiptStatus, SettingKey
from maskfl.protocol.chunking import is_chunk
from maskfl.protocol.errors import CryptoError, Reason, RemoteProtocolError
from maskfl.protocol.identity import Certificate, RevocationList
from maskfl.protocol.messages import (
    GlobalModel,
    MessageType,
    Receipt,
    RoundParams,
    SeedDict,
    SignedMessage,
    SumDict,
    decode_message,
    open_sum_dict,
    verify_sender,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.topics import ParsedTopic, TopicKind, Topics
from maskfl.transport import Clock, Message, decode_off_loop, off_loop

__all__ = ["EXIT_REVOKED", "Inbound", "RoundCoordinator"]

log = logging.getLogger("maskfl.agent")

#: Round parameters, receipts and seed-less small messages are far below this.
MAX_SMALL_MESSAGE = 64 * 1024
#: Messages waiting for the round parameters they belong to.
MAX_EARLY_MESSAGES = 32
#: Exit status once a verified revocation list names this device's certificate: the
#: systemd unit has ``RestartPreventExitStatus=2``, so a revoked device stays stopped
#: instead of reconnecting forever (re-enroll it, then start it again).
EXIT_REVOKED = 2

#: What to do about a revoked certificate. A rotate revokes the old credentials too,
#: and ``add-device --force`` after a rotate would revoke the new ones as well.
REENROLL = (
    "If {device} was rotated (maskfl-provision rotate), install its new bundle "
    "(devices/{device}.tar.gz from the operator) and start the agent again; do not run "
    "add-device --force, which would revoke that bundle too. If it was revoked, it stays "
    "out until re-enrolled with `maskfl-provision add-device {device} --force` and that "
    "bundle is installed."
)

_ROUND_INPUTS = frozenset({TopicKind.SUMS, TopicKind.SEEDS})
_COORDINATOR_KINDS = _ROUND_INPUTS | {TopicKind.RECEIPTS, TopicKind.MODEL_LATEST}


@dataclass
class RoundCoordinator:
    """The coordinator of the current round, as its round parameters named it."""

    certificate: Certificate
    params: RoundParams
    digest: bytes


class Inbound:
    """Checks and acts on received messages (mixed into the daemon's Agent)."""

    config: AgentConfig
    identity: DeviceIdentity
    journal: Journal
    notifier: Notifier
    learner: Learner
    clock: Clock
    device: str
    fleet: str
    topics: Topics
    guards: Guards
    revocations: RevocationList | None
    coordinator: RoundCoordinator | None
    driver: RoundDriver | None
    ignored: collections.Counter[str]
    graphs: GraphGate
    models: GlobalModels
    exit_code: int
    _early: collections.OrderedDict[str, bytes]
    _reassembler: Reassembler[None]
    publish: Callable[[str, bytes, int], Awaitable[None]]

    def request_stop(self) -> None:
        raise NotImplementedError  # the Agent's

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
                whole = self._reassembler.feed(message.topic, payload, self.clock())
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
                    await self.journal.set_setting(SettingKey.REVOCATIONS, payload)
            case kind if kind in _COORDINATOR_KINDS:
                if self.coordinator is None:
                    self._keep_early(topic, payload)
                elif kind in _ROUND_INPUTS:
                    await self._on_round_input(topic, parsed, payload)
                elif kind is TopicKind.RECEIPTS:
                    await self._on_receipt_message(parsed, payload)
                else:
                    await self._on_model(parsed, payload)
            case TopicKind.MODEL_GRAPH:
                if parsed.model_id is not None:
                    await self._on_graph(parsed.model_id, payload)
            case _:
                log.debug("message on %s is not for agents; ignored", topic)

    # -- round parameters ----------------------------------------------------------

    async def _on_round(self, payload: bytes, *, from_journal: bool = False) -> None:
        signed = decode_message(payload, max_size=MAX_SMALL_MESSAGE)
        signed.expect(fleet=self.fleet, types=(MessageType.ROUND_PARAMS,))
        params = signed.body
        assert isinstance(params, RoundParams)
        current = self.driver
        if (
            current is not None
            and int(params.round_id) == current.round_id
            and signed.digest == current.params_digest
        ):
            return  # the retained copy again
        cert = self._check_round(signed, params, current)
        rid = int(params.round_id)
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
        self.coordinator = RoundCoordinator(cert, params, signed.digest)
        await self.journal.put_inbox(rid, InboxKey.PARAMS, payload)
        if current is not None:
            await current.abandon(f"round {rid} started")
        self._start_driver(params, signed.digest)
        await self.journal.prune(keep_rounds=4)
        await self._replay_early()

    def _check_round(
        self, signed: SignedMessage, params: RoundParams, current: RoundDriver | None
    ) -> Certificate:
        """New round parameters are for a later round, signed by a coordinator the
        fleet CA certified, and chain their seed; returns the coordinator's certificate."""
        rid = int(params.round_id)
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
        return cert

    def _start_driver(self, params: RoundParams, params_digest: bytes) -> None:
        ctx = RoundContext(
            config=self.config,
            identity=self.identity,
            journal=self.journal,
            topics=self.topics,
            learner=self.learner,
            guards=self.guards,
            publish=self.publish,
            model=self.models.wait,
            clock=self.clock,
        )
        self.driver = RoundDriver(ctx, params, params_digest)
        self.driver.start()

    # -- coordinator messages ------------------------------------------------------

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

    async def _on_round_input(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        """A sum dictionary, or this device's seed dictionary, of the current round."""
        assert self.coordinator is not None
        current = int(self.coordinator.params.round_id)
        if parsed.round_id is None or parsed.round_id < current:
            log.debug("%s is for an earlier round; ignored", topic)
            return
        if parsed.round_id > current:
            self._keep_early(topic, payload)
            return
        if parsed.kind is TopicKind.SEEDS and parsed.device != self.device:
            return
        signed = await decode_off_loop(payload, max_size=self.config.limits.max_message_bytes)
        if parsed.kind is TopicKind.SUMS:
            self._on_sums(signed, current)
        else:
            self._on_seeds(signed, payload, current)

    def _on_sums(self, signed: SignedMessage, current: int) -> None:
        assert self.coordinator is not None
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
        log.info("round %d: sum dictionary with %d summers verified", current, len(sums))
        if self.driver is not None:
            self.driver.offer_sums(sums)

    def _on_seeds(self, signed: SignedMessage, payload: bytes, current: int) -> None:
        self._verify_coordinator(signed, MessageType.SEED_DICT)
        signed.expect(fleet=self.fleet, round_id=current)
        body = signed.body
        assert isinstance(body, SeedDict)
        if body.summer_pk != self.identity.identity.public_key:
            raise RemoteProtocolError(Reason.MALFORMED, "seed dictionary names another summer")
        log.info("round %d: seed dictionary with %d seeds", current, len(body.sealed_seeds))
        if self.driver is not None:
            self.driver.offer_seeds(payload, body)

    async def _on_receipt_message(self, parsed: ParsedTopic, payload: bytes) -> None:
        if parsed.device != self.device:
            return
        signed = decode_message(payload, max_size=MAX_SMALL_MESSAGE)
        self._verify_coordinator(signed, MessageType.RECEIPT)
        receipt = signed.body
        assert isinstance(receipt, Receipt)
        entry = await self.journal.sent_by_digest(receipt.message_digest)
        if entry is None:
            log.debug("receipt for a message we do not know; ignored")
            return
        driver = self.driver
        if driver is not None and driver.round_id == entry.round_id:
            driver.offer_receipt(entry.kind, receipt)
        elif entry.status is ReceiptStatus.PENDING:
            # A round we left: journal the answer as the round's driver would have.
            status = receipt_status(classify_receipt(receipt, repeated=entry.attempts > 1))
            if status is not None:
                reason = str(receipt.reason or "")
                await self.journal.mark_receipt(entry.round_id, entry.kind, status, reason)

    async def _on_model(self, parsed: ParsedTopic, payload: bytes) -> None:
        signed = await decode_off_loop(payload, max_size=self.config.limits.max_message_bytes)
        self._verify_coordinator(signed, MessageType.GLOBAL_MODEL)
        model = signed.body
        assert isinstance(model, GlobalModel)
        if model.model_id != parsed.model_id:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"model {model.model_id!r} on the topic of another"
            )
        if await self.models.offer(model):
            self._state_graph_digest(model)
            log.info("global model %s version %d received", model.model_id, model.version)

    # -- model graphs --------------------------------------------------------------

    async def _on_graph(self, model_id: str, payload: bytes) -> None:
        verified = await off_loop(len(payload), self.graphs.offer, model_id, payload)
        if verified is not None:
            self._give_graph(model_id, verified)

    def _give_graph(self, model_id: str, graph: bytes) -> None:
        """Hand a graph the gate verified to the learner."""
        self.learner.add_graph(model_id, graph)
        log.info("model graph for %r verified (%d bytes)", model_id, len(graph))

    def _state_graph_digest(self, model: GlobalModel) -> None:
        """A newly verified global model names its graph: tell the learner and the gate."""
        stated = None if model.graph_digest == NOT_STATED else model.graph_digest
        self.learner.set_graph_digest(model.model_id, stated)
        verified = self.graphs.state(model.model_id, model.graph_digest, version=model.version)
        if verified is not None:
            self._give_graph(model.model_id, verified)

    # -- early messages, revocations -------------------------------------------------

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
                REENROLL.format(device=self.device),
            )
            self.notifier.status(f"revoked (revocation list version {revocations.version})")
            self.exit_code = EXIT_REVOKED
            self.request_stop()
        return True
