"""What the phases share: the services of the process and the state of the current round.

:class:`Services` is built once per process (store, files, signing identity,
aggregation backend, outbox, metrics, clock). :class:`OpenRound` is the one
round in progress (from idle's start to its outcome); it is rebuilt from the
database on restart, so nothing in it is the only copy of anything that was
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from maskfl.aggregator_gpu import Accumulator, Backend
from maskfl.broker_coordinator.config import CoordinatorConfig
from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.broker_coordinator.liveness import Liveness
from maskfl.broker_coordinator.metrics import Metrics
from maskfl.broker_coordinator.optimizers import ServerOptimizer
from maskfl.broker_coordinator.privacy import Accountant, DpPlan
from maskfl.broker_coordinator.store import (
    CheckpointFiles,
    RoundRecord,
    Store,
    Sum2Record,
    SummerRecord,
    UpdateLog,
    UpdateRecord,
)
from maskfl.protocol.identity import Certificate
from maskfl.protocol.masking import MaskConfig, update_words
from maskfl.protocol.messages import (
    Body,
    GlobalModelBuffer,
    RoundParams,
    SignedMessage,
    encode_message,
    max_masked_size,
)
from maskfl.protocol.phases import Window
from maskfl.protocol.topics import TopicKind, Topics
from maskfl.transport import SYSTEM_CLOCK

if TYPE_CHECKING:
    from maskfl.broker_coordinator.outbox import Outbox
    from maskfl.transport import Clock, Message

log = logging.getLogger("maskfl.coordinator")


@dataclass(slots=True)
class Incoming:
    """A decoded, signature-checked participant message and the MQTT deliveries carrying it.

    ``deliveries`` are acked only once the message's effect is durable (or it
    was rejected); for a chunked message they are all its frames. ``topic`` and
    ``topic_round`` are what the topic it came on says (the header must agree).
    """

    message: SignedMessage
    device: str
    deliveries: list[Message]
    size: int
    received_at: float
    topic: TopicKind
    topic_round: int


@dataclass(slots=True)
class Contribution:
    """An admitted message waiting for the group commit.

    ``record`` is what the phase writes (a SummerRecord, an UpdateRecord with
    its words and seeds, a Sum2Record); the phase that admitted it commits it.
    """

    incoming: Incoming
    record: SummerRecord | UpdateRecord | Sum2Record
    words: npt.NDArray[np.unsignedinteger] | None = None
    seeds: tuple[tuple[bytes, bytes], ...] = ()
    public_key: bytes = b""
    serial: int = 0


@dataclass
class ModelState:
    """The current global model (the one the round trains from)."""

    model_id: str
    version: int
    weights: npt.NDArray[np.float32]
    digest: bytes


@dataclass
class OpenRound:
    """The round in progress, from idle's start to its outcome; rebuilt from the store
    on restart. ``window`` is the open message phase's; ``closing`` is set while that
    phase closes (or the round fails), when nothing more is admitted."""

    record: RoundRecord
    params: RoundParams
    summers: dict[str, SummerRecord] = field(default_factory=dict)
    summer_devices: dict[bytes, str] = field(default_factory=dict)
    updates: dict[str, UpdateRecord] = field(default_factory=dict)
    update_digests: set[bytes] = field(default_factory=set)
    sum2: dict[str, Sum2Record] = field(default_factory=dict)
    accepted_digests: set[bytes] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    acc: Accumulator | None = None
    words: dict[bytes, npt.NDArray[np.unsignedinteger]] = field(default_factory=dict)
    words_bytes: int = 0
    first_update_at: float | None = None
    last_update_commit_at: float | None = None
    window: Window | None = None
    closing: bool = False

    @property
    def round_id(self) -> int:
        return self.record.round_id


@dataclass
class Services:
    """Everything long-lived a phase may use."""

    config: CoordinatorConfig
    store: Store
    checkpoints: CheckpointFiles
    update_log: UpdateLog
    backend: Backend
    signing_key: SigningKey
    certificate: Certificate
    topics: Topics
    enrollment: Enrollment
    metrics: Metrics
    mask: MaskConfig
    optimizer: ServerOptimizer
    outbox: Outbox
    model: ModelState
    graph: bytes | None = None
    graph_digest: bytes = bytes(32)
    dp: DpPlan | None = None
    """The differential-privacy plan; None with ``privacy.dp = "off"``."""
    accountant: Accountant | None = None
    clock: Clock = SYSTEM_CLOCK
    """Read for every deadline and record, and waited on (the pauses, the group commit,
    the runner's window): a test's fake clock moves them all."""
    liveness: Liveness = field(init=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on every commit: the runner looks at its window again."""

    @property
    def fleet(self) -> str:
        return self.config.fleet.id

    def sign(self, body: Body, round_id: int) -> bytes:
        return encode_message(
            body, fleet=self.fleet, round_id=round_id, signing_key=self.signing_key
        )

    def sign_model(self, model: GlobalModelBuffer, round_id: int) -> bytearray:
        """:meth:`sign` for a model built in its message's buffer (the same bytes)."""
        return model.sign(fleet=self.fleet, round_id=round_id, signing_key=self.signing_key)

    def __post_init__(self) -> None:
        self.liveness = Liveness(
            self.topics.status_prefix,
            window_s=self.config.pet.alive_window_s,
            max_devices=self.config.fleet.max_devices,
            clock=self.clock,
        )

    def alive_count(self) -> int:
        return self.liveness.count(self.clock())

    @property
    def vector_words(self) -> int:
        """M + 4: the model's parameters, the weight word and the evaluation words."""
        return update_words(self.config.model.length)

    def max_message_size(self) -> int:
        """The per-message limit (protocol.md §9): the largest valid update, with a
        sealed seed for every summer the round may accept, or sum2, naming every update
        it may accept as failed (a SUM is smaller than either)."""
        pet = self.config.pet
        return max_masked_size(
            self.vector_words,
            self.mask.word_bits,
            seeds=pet.sum.count_max,
            failed=pet.update.count_max,
        )
