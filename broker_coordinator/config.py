"""The coordinator's configuration: one TOML file plus ``MASKFL__`` environment overrides.

This model is the source of truth for the keys of ``coordinator.toml`` (provisioning
writes files that match it). Loading order, later wins::

    defaults  <  the TOML file  <  environment (MASKFL__SECTION__KEY, nested with "__")

so ``MASKFL__PET__SUM__COUNT_MIN=2`` overrides ``[pet.sum] count_min`` and nothing else
(values are read as TOML values; :mod:`maskfl.protocol.settings`). Relative paths
are resolved against the directory of the TOML file (a provisioning bundle can be
moved as a whole). Every model is frozen and forbids unknown keys; cross-field rules
live in validators. :func:`load_config` turns every pydantic error into a
:class:`~maskfl.protocol.errors.ConfigError` whose message names the field and the fix,
so the CLI can print one line and exit 2.

Example (all sections; most keys have defaults)::

    [fleet]
    id = "demo"
    ca_public_key_file = "ca.pub"         # PEM, the fleet CA's Ed25519 public key
    revocations_file = "revocations.bin"  # optional; reloaded when its mtime changes

    [identity]
    key_file = "coordinator.key"          # PKCS#8 PEM, mode 0600
    certificate_file = "coordinator.cert" # enrollment certificate, role "coordinator"
    passphrase_env = ""                   # optional: env var holding the key passphrase

    [broker]
    host = "127.0.0.1"
    port = 8883
    tls = true
    ca_file = "broker-ca.pem"
    cert_file = "coordinator-tls.pem"     # client certificate (mTLS), with key_file
    key_file = "coordinator-tls.key"
    # username = "coordinator"; password_file = "broker.password"
    session_expiry_s = 86400              # persistent session (clean_start = false)

    [storage]
    dir = "state"                         # SQLite database and aggregate checkpoints

    [model]
    id = "digits-mlp"
    length = 1000                         # M, the flat weight vector length
    initial_weights = "initial.npy"       # float32[M]

    [masking]
    bound = 1.0                           # B: deltas are clipped to [-B, B]
    n_max = 1000                          # most updates one aggregate may hold
    word_bits = "auto"                    # 32, 64, or auto (32 unless tolerance needs 64)
    tolerance = 1e-5
    groups = "auto"                       # g mask groups: a coalition needs a summer in
                                          # each; auto = max(1, pet.sum.target // 3)

    [pet.sum]                             # a table keeps the defaults of the keys
    target = 3                            # it leaves out
    count_min = 1
    count_max = 100
    time_min_s = 2
    time_max_s = 60

    [privacy]
    min_updates = 3                       # never unmask fewer updates (at least 2)

    [optimizer]
    kind = "fedavg"                       # fedavg | fedavgm | fedadam

    [http]
    port = 9464                           # /metrics, /healthz, /readyz, /status
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from maskfl.protocol.errors import ConfigError
from maskfl.protocol.settings import (
    ENV_PREFIX,
    describe_errors,
    env_overrides,
    env_variable_for,
    merge,
)
from maskfl.protocol.sortition import MAX_GROUPS, default_groups
from maskfl.transport import BrokerSettings, LogFormat, ServiceSettings, TlsConfig
from maskfl.transport import Section as _Section

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

_DELIVERY_SLACK = 65536
"""What one delivery may carry beyond ``pet.chunk_size``: the coordinator's largest
incoming payload is ``chunk_size`` plus this (:attr:`CoordinatorConfig.max_delivery_bytes`)."""

__all__ = [
    "ENV_PREFIX",
    "AggregationConfig",
    "BrokerConfig",
    "CoordinatorConfig",
    "FleetConfig",
    "HttpConfig",
    "IdentityConfig",
    "LogConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerKind",
    "PetConfig",
    "PrivacyConfig",
    "StorageConfig",
    "Sum2PhaseConfig",
    "SumPhaseConfig",
    "UpdatePhaseConfig",
    "load_config",
]


class FleetConfig(_Section):
    """Who the fleet is and whom it trusts.

    ``max_devices``: the most devices counted alive at once (and the size of the
    certificate cache); memory is about 300 bytes per device. Heartbeats from
    devices beyond it are counted as ``fleet_full`` and logged, not evicting others.
    """

    id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    ca_public_key_file: Path
    revocations_file: Path | None = None
    revocations_poll_s: Annotated[float, Field(gt=0)] = 5.0
    max_devices: Annotated[int, Field(ge=1)] = 1_000_000


class IdentityConfig(_Section):
    """The coordinator's own enrollment: it signs round parameters, dictionaries, models."""

    key_file: Path
    certificate_file: Path
    passphrase_env: str = ""


class BrokerConfig(BrokerSettings):
    """The broker connection: a persistent MQTT 5 session with manual acknowledgement.

    The agent's ``[broker]`` keys (:class:`~maskfl.transport.BrokerSettings`) plus the
    session settings, ``tls_insecure`` and an inline ``password`` (or ``password_file``).
    """

    tls_insecure: bool = False
    password: str | None = None
    client_id: Annotated[str | None, Field(min_length=1, max_length=128)] = None
    """Only for a broker without identities (anonymous listener; default "coordinator"):
    otherwise the client id is the TLS certificate's common name or the username."""
    session_expiry_s: Annotated[int, Field(ge=1, le=2**32 - 1)] = 86400
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 65535

    @model_validator(mode="after")
    def _check_password(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        return self

    def read_password(self) -> str | None:
        return self.password if self.password is not None else super().read_password()

    def tls_config(self) -> TlsConfig | None:
        tls = super().tls_config()
        return None if tls is None else dataclasses.replace(tls, insecure=self.tls_insecure)


class StorageConfig(_Section):
    """Durable state: the SQLite database (WAL) and the aggregate checkpoint files.

    ``group_commit_max`` updates (or whatever arrived within ``group_commit_ms``) are
    added, checkpointed and committed together; their MQTT acks follow the commit.
    Every accepted update's masked words are kept for the round, to drop an update
    whose seed a summer cannot open. ``update_words = "memory"`` keeps them in RAM
    (the received message, no copy) while they take at most half of
    ``pet.message_memory_max_bytes`` and writes the rest to the update log;
    ``"file"`` writes all of them to the log (a second full write of the data:
    about 40 % of the ingest CPU at 4 MB updates). Words
    held only in memory are gone after a restart: if a summer then reports such
    an update as unopenable, that round fails instead of dropping it (the
    aggregate itself is always in the checkpoint). ``update_log_fsync`` also
    fsyncs the log (survives an OS crash, not only a process crash).
    """

    dir: Path = Path("state")
    group_commit_max: Annotated[int, Field(ge=1, le=10000)] = 128
    group_commit_ms: Annotated[float, Field(ge=0, le=10000)] = 2.0
    update_words: Literal["memory", "file"] = "memory"
    update_log_fsync: bool = False

    @model_validator(mode="before")
    @classmethod
    def _gone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "update_memory_max_bytes" in data:
            raise ValueError(
                "update_memory_max_bytes is gone: the words kept in memory now share "
                "pet.message_memory_max_bytes (at most half of it); remove the key"
            )
        return data


class ModelConfig(_Section):
    """The model being trained: its id, its flat length M, where its weights start.

    ``initial_weights`` is a float32[M] ``.npy`` (zeros when unset; the coordinator
    has no TFLite runtime to read them from a graph). ``graph_file``, the model's
    ``.tflite``, is published retained on ``model/<id>/graph`` and its SHA-256 is
    stated in every signed global model, so devices can check the unsigned graph.
    """

    id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    length: Annotated[int, Field(ge=1, le=100_000_000)]
    initial_weights: Path | None = None
    graph_file: Path | None = None


class RegistryConfig(_Section):
    """The model registry: every version's metadata in SQLite, its files in
    ``<storage.dir>/models`` (weights, signed message, optimizer state), kept for the
    newest ``keep_versions`` versions (older versions keep their metadata only)."""

    keep_versions: Annotated[int, Field(ge=1)] = 10


class MaskingConfig(_Section):
    """Fixed-point masking: deltas clipped to ``bound``, at most ``n_max`` per aggregate."""

    bound: Annotated[float, Field(gt=0)] = 1.0
    n_max: Annotated[int, Field(ge=1)] = 1000
    word_bits: Literal["auto", 32, 64] = "auto"
    tolerance: Annotated[float, Field(gt=0)] = 1e-5
    groups: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_GROUPS)] = "auto"


class _Window(_Section):
    """A message-driven phase: closes at count_max, or at time_min once count_min is in;
    fails at time_max below count_min. Each phase has its own defaults, so a table
    that sets one key (``[pet.sum] time_max_s = 15``) keeps the others."""

    count_min: Annotated[int, Field(ge=1)]
    count_max: Annotated[int, Field(ge=1)]
    time_min_s: Annotated[float, Field(ge=0)]
    time_max_s: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _windows(self) -> Self:
        if self.count_min > self.count_max:
            raise ValueError(
                f"count_min ({self.count_min}) exceeds count_max ({self.count_max}): "
                "lower count_min or raise count_max"
            )
        if self.time_min_s > self.time_max_s:
            raise ValueError(
                f"time_min_s ({self.time_min_s}) exceeds time_max_s ({self.time_max_s}): "
                "lower time_min_s or raise time_max_s"
            )
        return self


class SumPhaseConfig(_Window):
    """``[pet.sum]``. ``target``: the summers to aim at among the devices alive (see
    :func:`~maskfl.protocol.sortition.probabilities_for_targets`); ``prob``, when set,
    is p_sum itself and ``target`` is ignored."""

    target: Annotated[int, Field(ge=1)] = 3
    prob: Annotated[float, Field(gt=0, le=1)] | None = None
    count_min: Annotated[int, Field(ge=1)] = 1
    count_max: Annotated[int, Field(ge=1)] = 100
    time_min_s: Annotated[float, Field(ge=0)] = 2.0
    time_max_s: Annotated[float, Field(gt=0)] = 60.0


class UpdatePhaseConfig(_Window):
    """``[pet.update]``. ``target``: the updaters to aim at among the devices alive that
    are not summers; ``prob``, when set, is p_update itself. ``count_min`` may not be
    below ``privacy.min_updates``."""

    target: Annotated[int, Field(ge=1)] = 10
    prob: Annotated[float, Field(gt=0, le=1)] | None = None
    count_min: Annotated[int, Field(ge=1)] = 3
    count_max: Annotated[int, Field(ge=1)] = 1000
    time_min_s: Annotated[float, Field(ge=0)] = 5.0
    time_max_s: Annotated[float, Field(gt=0)] = 300.0


class Sum2PhaseConfig(_Window):
    """``[pet.sum2]``: no target or prob, its participants are the summers of the round."""

    count_min: Annotated[int, Field(ge=1)] = 1
    count_max: Annotated[int, Field(ge=1)] = 100
    time_min_s: Annotated[float, Field(ge=0)] = 5.0
    time_max_s: Annotated[float, Field(gt=0)] = 120.0

    @model_validator(mode="before")
    @classmethod
    def _no_draw(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"target", "prob"} & set(data)):
            raise ValueError(
                "takes no target or prob: the summers drawn in the sum phase answer sum2; "
                "remove the key"
            )
        return data


class PetConfig(_Section):
    """Round timing and sizes.

    ``chunk_size``: the largest MQTT payload; bigger messages travel as chunk
    frames. ``alive_window_s``: a device heard from (heartbeat or message) within it
    counts as alive for the sortition targets; the window counts only the time the
    coordinator listens to heartbeats (not in a round's update and sum2 phases, see
    :mod:`.liveness`), so a long update phase expires nobody. ``round_pause_s``: wait
    between rounds; ``failure_pause_s``: wait after a failed round. ``max_rounds``: stop after that
    many rounds (0: run forever). ``initial_seed``: hex of the seed before round 1
    (zeros by default). ``message_memory_max_bytes``: the one bound on received
    messages held in memory, all together: deliveries in the transport's queue,
    partial chunked messages, whole messages until their group commit, and
    updates' words kept for the round (``storage.update_words``, at most half);
    a partial message that does not fit waits in ``<storage.dir>/spool``, up to
    ``reassembly_spool_max_bytes`` (default: as much as the broker window leaves,
    about 16 GiB at the default chunk size; 0 turns the spool off), and one
    message read back from there may pass it (a message larger than the bound
    passes alone). ``reassembly_*``: the other bounds of partial chunked messages
    (their frames are held unacked; see ``broker.receive_maximum``); a message
    that finds no room is refused (its sender resends it), never one already
    admitted dropped.
    """

    sum: SumPhaseConfig = SumPhaseConfig()
    update: UpdatePhaseConfig = UpdatePhaseConfig()
    sum2: Sum2PhaseConfig = Sum2PhaseConfig()
    chunk_size: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 256 * 1024
    alive_window_s: Annotated[float, Field(gt=0)] = 300.0
    round_pause_s: Annotated[float, Field(ge=0)] = 0.0
    failure_pause_s: Annotated[float, Field(ge=0)] = 5.0
    max_rounds: Annotated[int, Field(ge=0)] = 0
    initial_seed: Annotated[str, Field(pattern=r"^([0-9a-fA-F]{64})?$")] = ""
    message_memory_max_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    reassembly_max_messages: Annotated[int, Field(ge=1)] = 4096
    reassembly_max_age_s: Annotated[float, Field(gt=0)] = 120.0
    reassembly_spool_max_bytes: Annotated[int | None, Field(ge=0)] = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reassembly_max_bytes" in data:
            raise ValueError(
                "reassembly_max_bytes is now message_memory_max_bytes, one bound for every "
                "received message held in memory (partial ones, those waiting for their "
                "commit, updates' words kept); rename the key"
            )
        return data

    @model_validator(mode="after")
    def _cross(self) -> Self:
        least = 8 * (self.chunk_size + _DELIVERY_SLACK)  # the transport's queue takes 4
        if self.message_memory_max_bytes < least:
            raise ValueError(
                f"pet.message_memory_max_bytes ({self.message_memory_max_bytes}) holds fewer "
                f"than 8 deliveries of pet.chunk_size ({self.chunk_size}) plus 64 KiB; raise "
                f"it to at least {least} or lower pet.chunk_size"
            )
        if self.sum2.count_min > self.sum.count_max:
            raise ValueError(
                f"pet.sum2.count_min ({self.sum2.count_min}) exceeds pet.sum.count_max "
                f"({self.sum.count_max}): sum2 only hears from accepted summers; lower it"
            )
        return self


#: No configuration lowers ``privacy.min_updates`` below this: an aggregate of one
#: update is that device's update, in the clear.
MIN_UPDATES_FLOOR = 2


DpMode = Literal["off", "distributed"]
"""``[privacy] dp``: no noise, or every updater adds its share of the noise (§7.9)."""


class PrivacyConfig(_Section):
    """The privacy floor: the coordinator never unmasks an aggregate of fewer than
    ``min_updates`` updates (after dropping updates whose seeds did not open); such
    a round fails and publishes nothing. At least 2 (:data:`MIN_UPDATES_FLOOR`)."""

    min_updates: int = 3
    dp: DpMode = "off"
    """``distributed``: every updater adds discrete Gaussian noise before masking
    (protocol/dp.py) and every model carries the (epsilon, delta) spent."""
    noise_multiplier: Annotated[float, Field(gt=0, le=1e4)] | None = None
    """Standard deviation of the aggregate noise over ``min_updates`` honest updaters,
    in units of ``clip_norm``; or set ``epsilon_target`` instead (neither: 1.0)."""
    epsilon_target: Annotated[float, Field(gt=0)] | None = None
    """Epsilon one round may spend (at ``delta``); the noise multiplier is derived."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    clip_norm: Annotated[float, Field(gt=0)] = 1.0
    """L2 norm every update is clipped to before encoding (the sensitivity)."""
    budget: Annotated[float, Field(gt=0)] | None = None
    """Cumulative epsilon at which the coordinator stops training (none: never)."""

    @model_validator(mode="after")
    def _dp_noise(self) -> Self:
        if self.noise_multiplier is not None and self.epsilon_target is not None:
            raise ValueError(
                "privacy.noise_multiplier and privacy.epsilon_target are both set: "
                "set one (the noise follows from either)"
            )
        return self

    @field_validator("min_updates")
    @classmethod
    def _floor(cls, value: int) -> int:
        if value < MIN_UPDATES_FLOOR:
            raise ValueError(
                f"must be at least {MIN_UPDATES_FLOOR}: an aggregate of fewer updates is one "
                "device's update in the clear; use 2 or more (default 3)"
            )
        return value


class OptimizerKind(StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"


class OptimizerConfig(_Section):
    """Server optimizer applied to the unmasked mean delta.

    fedavg: ``w += lr·Δ``; fedavgm: ``v = momentum·v + Δ; w += lr·v``;
    fedadam (Reddi et al. 2021): ``m = β1·m + (1−β1)Δ; v = β2·v + (1−β2)Δ²;
    w += lr·m / (√v + τ)``.
    """

    kind: OptimizerKind = OptimizerKind.FEDAVG
    lr: Annotated[float, Field(gt=0)] = 1.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Field(gt=0)] = 1e-3


class AggregationConfig(_Section):
    backend: Literal["auto", "numpy", "cupy"] = "auto"


class HttpConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: LogFormat = "auto"
    """``auto``: text on a terminal or under journald, JSON otherwise (maskfl.transport's
    logging convention, shared with the agent); ``run --log-format`` overrides it."""


class CoordinatorConfig(ServiceSettings):
    """The whole coordinator configuration (see the module docstring for the file)."""

    fleet: FleetConfig
    identity: IdentityConfig
    broker: BrokerConfig = BrokerConfig()
    storage: StorageConfig = StorageConfig()
    model: ModelConfig
    registry: RegistryConfig = RegistryConfig()
    masking: MaskingConfig = MaskingConfig()
    pet: PetConfig = PetConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    aggregation: AggregationConfig = AggregationConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _cross(self) -> Self:
        if self.pet.update.count_max > self.masking.n_max:
            raise ValueError(
                f"pet.update.count_max ({self.pet.update.count_max}) exceeds masking.n_max "
                f"({self.masking.n_max}): the aggregate could overflow; raise masking.n_max "
                "or lower pet.update.count_max"
            )
        if self.pet.update.count_min < self.privacy.min_updates:
            raise ValueError(
                f"pet.update.count_min ({self.pet.update.count_min}) is below "
                f"privacy.min_updates ({self.privacy.min_updates}): the update phase could "
                "close with fewer updates than the coordinator will unmask; raise it to "
                f"at least {self.privacy.min_updates}"
            )
        if self.masking.groups != "auto" and self.masking.groups > self.pet.sum.target:
            raise ValueError(
                f"masking.groups ({self.masking.groups}) exceeds pet.sum.target "
                f"({self.pet.sum.target}): most rounds would leave a group without a summer "
                f"and fail; raise pet.sum.target to at least {2 * self.masking.groups} or "
                'lower masking.groups (or set it to "auto")'
            )
        if self.reassembly_frames < 16:
            needed = self.storage.group_commit_max + 32
            raise ValueError(
                f"broker.receive_maximum ({self.broker.receive_maximum}) leaves "
                f"{max(self.reassembly_frames, 0)} unacked deliveries for chunk frames "
                f"after a commit batch (storage.group_commit_max = "
                f"{self.storage.group_commit_max}, plus 16): raise it to at least {needed} "
                "or lower storage.group_commit_max"
            )
        pet = self.pet
        if pet.reassembly_spool_max_bytes is not None:
            held = -(-(self.reassembly_bytes + pet.reassembly_spool_max_bytes) // pet.chunk_size)
            if held > self.reassembly_frames:
                raise ValueError(
                    f"pet.reassembly_spool_max_bytes ({pet.reassembly_spool_max_bytes}) with "
                    f"the memory bound makes {held} chunk frames that partial messages may "
                    f"hold unacked, more than broker.receive_maximum leaves "
                    f"({self.reassembly_frames}, after a commit batch): lower it to at most "
                    f"{max(0, self.reassembly_frames * pet.chunk_size - self.reassembly_bytes)} "
                    "or leave it unset (then it is what the window leaves)"
                )
        return self

    @property
    def mask_groups(self) -> int:
        """g, the round parameter ``groups``: ``masking.groups``, or
        :func:`~maskfl.protocol.sortition.default_groups` of the sum target for auto."""
        if self.masking.groups == "auto":
            return default_groups(self.pet.sum.target)
        return self.masking.groups

    @property
    def reassembly_frames(self) -> int:
        """Chunk frames partial messages may hold unacked: what ``broker.receive_maximum``
        leaves after a commit batch (``storage.group_commit_max``) and 16 spare."""
        return self.broker.receive_maximum - self.storage.group_commit_max - 16

    @property
    def max_delivery_bytes(self) -> int:
        """The largest payload the coordinator takes in one delivery."""
        return self.pet.chunk_size + _DELIVERY_SLACK

    @property
    def transport_queue_size(self) -> int:
        """Deliveries the coordinator's transport queues for its ingest (it stops reading
        the socket beyond): an eighth of ``pet.message_memory_max_bytes``, 4 to 256 of
        them (102 at the defaults: 32 MiB)."""
        return max(4, min(256, self.pet.message_memory_max_bytes // 8 // self.max_delivery_bytes))

    @property
    def message_bytes(self) -> int:
        """``pet.message_memory_max_bytes`` less the transport's queue: the bound on
        partial messages in memory, whole ones until their commit and updates' words
        kept, together (:mod:`.ingest`)."""
        queue = self.transport_queue_size * self.max_delivery_bytes
        return self.pet.message_memory_max_bytes - queue

    @property
    def words_memory_bytes(self) -> int:
        """The most updates' words kept in memory (``storage.update_words = "memory"``):
        half of :attr:`message_bytes`, so uploads always keep the other half."""
        return self.message_bytes // 2 if self.storage.update_words == "memory" else 0

    @property
    def reassembly_bytes(self) -> int:
        """The bytes partial chunked messages may hold in memory: :attr:`message_bytes`
        (less what whole messages and kept words hold, counted as they come), and no
        more than :attr:`reassembly_frames` frames of ``pet.chunk_size``.

        Every held frame is an unacknowledged delivery, and the broker sends no more
        than ``broker.receive_maximum`` of those: past that bound the coordinator would
        wait for frames the broker will not send (``pet.chunk_size = 8192`` with
        512 MiB would need 65,680 of them, above MQTT's 65,535).
        """
        return min(self.message_bytes, self.reassembly_frames * self.pet.chunk_size)

    def reassembly_spool_bytes(self) -> int:
        """``pet.reassembly_spool_max_bytes``, or what the broker window leaves when unset.

        Every frame of a partial message is held unacked, so memory plus spool may
        hold at most :attr:`reassembly_frames` frames.
        """
        pet = self.pet
        if pet.reassembly_spool_max_bytes is not None:
            return pet.reassembly_spool_max_bytes
        in_memory = -(-self.reassembly_bytes // pet.chunk_size)
        return max(0, self.reassembly_frames - in_memory) * pet.chunk_size


def _resolve(value: Any, base: Path) -> Any:
    """Return ``value`` with every relative Path made relative to ``base``."""
    if isinstance(value, Path):
        return value if value.is_absolute() else base / value
    if isinstance(value, BaseModel):
        updates = {name: _resolve(getattr(value, name), base) for name in type(value).model_fields}
        return value.model_copy(update=updates)
    return value


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> CoordinatorConfig:
    """Read, merge with the environment, validate and resolve paths.

    ``env`` replaces ``os.environ`` for the overrides (tests pass their own).
    Raises :class:`ConfigError` naming the field and the fix; nothing else.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist", field=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", field=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", field=str(path)) from exc
    overrides, origins = env_overrides(os.environ if env is None else env, CoordinatorConfig)
    try:
        config = CoordinatorConfig(**merge(raw, overrides))
    except ValidationError as exc:
        text, field = describe_errors(exc.errors(), CoordinatorConfig, origins)
        raise ConfigError(f"{path}: {text}", field=field) from exc
    resolved: CoordinatorConfig = _resolve(config, path.resolve().parent)
    return resolved


def check_files(config: CoordinatorConfig) -> None:
    """Fail early, naming the key, when a file the coordinator needs is missing."""
    required: list[tuple[str, Path | None]] = [
        ("fleet.ca_public_key_file", config.fleet.ca_public_key_file),
        ("identity.key_file", config.identity.key_file),
        ("identity.certificate_file", config.identity.certificate_file),
        ("model.initial_weights", config.model.initial_weights),
        ("model.graph_file", config.model.graph_file),
        ("broker.password_file", config.broker.password_file),
        ("broker.ca_file", config.broker.ca_file),
        ("broker.cert_file", config.broker.cert_file),
        ("broker.key_file", config.broker.key_file),
    ]
    for field, value in required:
        if value is not None and not value.is_file():
            name = env_variable_for(field, os.environ)
            origin = f" (set by environment variable {name})" if name else ""
            raise ConfigError(
                f"{field}: file {value} does not exist{origin}; fix the path (relative "
                "paths are resolved against the config file's directory)",
                field=field,
            )
    if config.identity.passphrase_env and config.identity.passphrase_env not in os.environ:
        raise ConfigError(
            f"identity.passphrase_env: environment variable {config.identity.passphrase_env} "
            "is not set; export it or clear passphrase_env",
            field="identity.passphrase_env",
        )
