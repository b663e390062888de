"""The signed binary messages of the PET round (docs/wire-format.md has every byte).

Every message is ``header ‖ signature ‖ body``::

    offset size field
      0     4   magic b"MFLM"
      4     1   format version (2)
      5     1   message type (MessageType; it fixes the phase the message belongs to)
      6     1   fleet length n (1..64)
      7     1   reserved, zero
      8     8   round id, u64
     16    32   sender Ed25519 public key
     48     8   body length, u64
     56    32   SHA-256 of the body
     88    64   fleet id, ASCII, zero padded after n bytes
    152    64   Ed25519 signature of b"maskfl/v1/message\\0" ‖ bytes [0, 152)
    216     …   body (all integers little-endian)

The signature covers the 152-byte header, and the header holds the body's
digest, so verifying costs one SHA-256 pass over the body and one Ed25519
verification of 170 bytes, however large the body is. The *message digest*
(what receipts and seed dictionaries name a message by) is the SHA-256 of the
152 header bytes: it identifies header and body, and does not depend on the
signature bytes.

The masked words of :class:`Update` and :class:`Sum2` and the weights of
:class:`GlobalModel` come last, at an offset of the whole message that is a
multiple of 8, so :func:`decode_message` returns them as zero-copy, aligned
``np.frombuffer`` views of the received bytes (read-only).

:func:`decode_message` checks the total size first, then every length field
against the bytes that remain, verifies the signature *before* parsing the
body, and raises nothing but :class:`RemoteProtocolError` (``oversize``,
``malformed``, ``wrong_length``, ``bad_signature``). What it does not know —
the expected fleet, round and phase, the sender's certificate — is checked by
:meth:`SignedMessage.expect` and :func:`verify_sender`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeAlias

import nacl.exceptions
import nacl.signing
import numpy as np
import numpy.typing as npt

from maskfl.protocol._codec import U64_MAX, Reader, Writer, check_id, is_valid_id
from maskfl.protocol.errors import (
    CertificateError,
    LocalProtocolError,
    MaskflError,
    Reason,
    RemoteProtocolError,
)
from maskfl.protocol.identity import (
    MAX_CERTIFICATE_SIZE,
    Certificate,
    RevocationList,
    verify_certificate,
)
from maskfl.protocol.ids import FleetId, Role, RoundId
from maskfl.protocol.masking import MaskConfig, Words, update_words
from maskfl.protocol.phases import Phase
from maskfl.protocol.sortition import MAX_GROUPS, group_of, next_round_seed
from maskfl.protocol.topics import TopicKind

__all__ = [
    "BODY_OFFSET",
    "DIGEST_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_DETAIL",
    "MAX_METRICS",
    "MAX_SUM_SIZE",
    "MESSAGE_DOMAIN",
    "MESSAGE_PHASES",
    "PARTICIPANT_BY_TOPIC",
    "PARTICIPANT_BY_TYPE",
    "PARTICIPANT_KINDS",
    "PARTICIPANT_MESSAGES",
    "SEALED_SEED_SIZE",
    "SIGNATURE_SIZE",
    "Body",
    "GlobalModel",
    "GlobalModelBuffer",
    "Header",
    "Heartbeat",
    "MessageType",
    "ParticipantKind",
    "Receipt",
    "RoundParams",
    "SeedDict",
    "SignedMessage",
    "Sum",
    "Sum2",
    "SumDict",
    "Update",
    "Weights",
    "decode_message",
    "encode_message",
    "max_masked_size",
    "open_sum_dict",
    "verify_sender",
    "weights_digest",
]

MAGIC: Final = b"MFLM"
FORMAT_VERSION: Final = 2
"""2: mask groups (round parameters, sum and seed dictionaries carry them); 1 had none."""
HEADER_SIZE: Final = 152
SIGNATURE_SIZE: Final = 64
BODY_OFFSET: Final = HEADER_SIZE + SIGNATURE_SIZE
MESSAGE_DOMAIN: Final = b"maskfl/v1/message\x00"
DIGEST_SIZE: Final = 32
KEY_SIZE: Final = 32
SEALED_SEED_SIZE: Final = 80
MAX_SUM_SIZE: Final = BODY_OFFSET + 2 + MAX_CERTIFICATE_SIZE + KEY_SIZE
"""The largest valid Sum message (502 bytes): the bound for sum-dictionary entries."""
MAX_DETAIL: Final = 1024
MAX_METRICS: Final = 256

_HEADER = struct.Struct("<4sBBBBQ32sQ32s64s")
assert _HEADER.size == HEADER_SIZE
assert BODY_OFFSET % 8 == 0

Weights: TypeAlias = npt.NDArray[np.float32]


class MessageType(IntEnum):
    """The type byte of the header. Each type belongs to one phase and one sender role."""

    ROUND_PARAMS = 1
    SUM = 2
    SUM_DICT = 3
    UPDATE = 4
    SEED_DICT = 5
    SUM2 = 6
    RECEIPT = 7
    GLOBAL_MODEL = 8
    HEARTBEAT = 9

    @property
    def phase(self) -> Phase | None:
        """The phase that accepts this participant message; None for coordinator messages."""
        kind = PARTICIPANT_BY_TYPE.get(self)
        return None if kind is None else kind.phase

    @property
    def topic_kind(self) -> TopicKind | None:
        """The topic kind a participant publishes this type on; None for coordinator messages."""
        kind = PARTICIPANT_BY_TYPE.get(self)
        return None if kind is None else kind.topic

    @property
    def sender_role(self) -> Role:
        """Who may send this type: devices send sum, update, sum2 and heartbeats."""
        if self in PARTICIPANT_BY_TYPE or self is MessageType.HEARTBEAT:
            return Role.DEVICE
        return Role.COORDINATOR


@dataclass(frozen=True, slots=True)
class ParticipantKind:
    """One kind of participant message: its header type, its topic, the phase that takes it."""

    message_type: MessageType
    topic: TopicKind
    phase: Phase


PARTICIPANT_MESSAGES: Final = (
    ParticipantKind(MessageType.SUM, TopicKind.SUM, Phase.SUM),
    ParticipantKind(MessageType.UPDATE, TopicKind.UPDATE, Phase.UPDATE),
    ParticipantKind(MessageType.SUM2, TopicKind.SUM2, Phase.SUM2),
)
"""The one table of participant message kinds, in round order; every other mapping
(type -> phase, topic -> type, the message phases, the agent's journal keys) is derived."""

PARTICIPANT_BY_TYPE: Final[Mapping[MessageType, ParticipantKind]] = MappingProxyType(
    {kind.message_type: kind for kind in PARTICIPANT_MESSAGES}
)
PARTICIPANT_BY_TOPIC: Final[Mapping[TopicKind, ParticipantKind]] = MappingProxyType(
    {kind.topic: kind for kind in PARTICIPANT_MESSAGES}
)
PARTICIPANT_KINDS: Final = frozenset(PARTICIPANT_BY_TOPIC)
"""The topic kinds on which participants publish (sum, update, sum2)."""
MESSAGE_PHASES: Final = frozenset(kind.phase for kind in PARTICIPANT_MESSAGES)
"""The phases that collect participant messages and so have a :class:`PhaseWindow`."""


# --- header -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The signed header of a message (what the Ed25519 signature covers)."""

    message_type: MessageType
    fleet: FleetId
    round_id: RoundId
    sender: bytes
    body_length: int
    body_digest: bytes

    def to_bytes(self) -> bytes:
        fleet = self.fleet.encode("ascii")
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            int(self.message_type),
            len(fleet),
            0,
            self.round_id,
            self.sender,
            self.body_length,
            self.body_digest,
            fleet.ljust(64, b"\x00"),
        )

    @classmethod
    def parse(cls, data: memoryview) -> Header:
        """Parse the first 152 bytes of ``data`` (which must hold at least that many)."""
        (
            magic,
            version,
            type_code,
            fleet_len,
            reserved,
            round_id,
            sender,
            body_len,
            body_digest,
            fleet,
        ) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise _malformed("not a maskfl message (bad magic)")
        if version != FORMAT_VERSION:
            raise _malformed(
                f"message format {version} is not supported: this participant speaks format "
                f"{FORMAT_VERSION} (maskfl {'newer' if version > FORMAT_VERSION else 'older'} "
                "than this one sent it; run the same maskfl release on devices and coordinator)"
            )
        try:
            message_type = MessageType(type_code)
        except ValueError as exc:
            raise _malformed(f"unknown message type {type_code}") from exc
        if reserved != 0 or not 1 <= fleet_len <= 64 or any(fleet[fleet_len:]):
            raise _malformed("bad fleet field or reserved byte in header")
        fleet_id = fleet[:fleet_len].decode("ascii", "replace")
        if not is_valid_id(fleet_id):
            raise _malformed("fleet id in header is not [A-Za-z0-9_-]{1,64}")
        return cls(
            message_type, FleetId(fleet_id), RoundId(round_id), sender, body_len, body_digest
        )


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED, message)


# --- shared body fields -----------------------------------------------------------------------


def _write_certificate(w: Writer, cert: Certificate) -> None:
    raw = cert.to_bytes()
    w.u16(len(raw))
    w.raw(raw)


def _read_certificate(r: Reader) -> Certificate:
    n = r.u16("certificate length")
    if n > MAX_CERTIFICATE_SIZE:
        raise _malformed(f"certificate length {n} above {MAX_CERTIFICATE_SIZE}")
    return Certificate.from_bytes(r.view(n, "certificate"))


def _write_words(w: Writer, words: npt.NDArray[Any], what: str) -> None:
    if words.ndim != 1 or words.dtype.kind != "u" or words.dtype.itemsize not in (4, 8):
        raise LocalProtocolError(f"{what} must be a 1-D uint32 or uint64 array")
    w.u8(words.dtype.itemsize * 8)
    w.u64(words.size)
    w.align(8, BODY_OFFSET)
    w.words(words, f"<u{words.dtype.itemsize}")


def _read_words(r: Reader, what: str) -> Words:
    bits = r.u8(f"{what} word bits")
    if bits not in (32, 64):
        raise _malformed(f"{what}: word size {bits} is not 32 or 64")
    count = r.u64(f"{what} count")
    r.align(8, BODY_OFFSET, f"{what} padding")
    words = r.words("<u4" if bits == 32 else "<u8", count, what)
    return words


def _sorted_unique(keys: Iterable[bytes], what: str) -> None:
    previous = b""
    for key in keys:
        if key <= previous:
            raise _malformed(f"{what} are not in strictly increasing order")
        previous = key


def _write_map(
    w: Writer, entries: Mapping[bytes, bytes], key_size: int, value_size: int, what: str
) -> None:
    w.u32(len(entries))
    for key in sorted(entries):
        w.fixed(key, key_size, f"{what} key")
        w.fixed(entries[key], value_size, f"{what} value")


def _read_map(r: Reader, key_size: int, value_size: int, what: str) -> dict[bytes, bytes]:
    count = r.u32(f"{what} count")
    if count > r.remaining // (key_size + value_size):
        raise _malformed(f"{what}: {count} entries do not fit in {r.remaining} bytes")
    keys = []
    entries: dict[bytes, bytes] = {}
    for _ in range(count):
        key = r.fixed(key_size, f"{what} key")
        entries[key] = r.fixed(value_size, f"{what} value")
        keys.append(key)
    _sorted_unique(keys, f"{what} keys")
    return entries


# --- bodies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundParams:
    """Coordinator → all, retained: everything a device needs to take part in a round.

    ``round_id`` repeats the header's (they must agree). ``vector_length`` is M,
    the number of model parameters: updates carry M + 4 words (the weight word, then
    three evaluation words, last; :func:`~maskfl.protocol.masking.update_words`).
    The ``*_time_max_s`` are the phases' longest durations, in seconds.
    ``model_digest`` is the :func:`weights_digest` of the global model devices
    train on (the result of the previous round), which chains the round seed.
    ``groups`` is g, the number of mask groups (:func:`~maskfl.protocol.sortition.group_of`):
    an updater seals one fresh seed per group, each only to that group's summers.
    ``noise_variance`` is 0 without differential privacy; with it, every updater
    clips its delta to L2 norm ``clip_norm`` and adds ``N_Z(0, noise_variance)``
    per model element to its encoded words before masking (docs/protocol.md §7.9).
    """

    TYPE: ClassVar[MessageType] = MessageType.ROUND_PARAMS

    round_id: RoundId
    seed: bytes
    previous_seed: bytes
    p_sum: float
    p_update: float
    sum_time_max_s: float
    update_time_max_s: float
    sum2_time_max_s: float
    model_id: str
    model_version: int
    model_digest: bytes
    mask: MaskConfig
    vector_length: int
    chunk_size: int
    certificate: Certificate
    groups: int = 1

    def group_of(self, public_key: bytes) -> int:
        """The mask group of the summer with this identity key in this round."""
        return group_of(self.seed, public_key, self.groups)

    clip_norm: float = 0.0
    noise_variance: int = 0

    @property
    def seed_is_chained(self) -> bool:
        """Whether ``seed == next_round_seed(previous_seed, model_digest, round_id)``.

        Anyone holding the history can so audit that the coordinator did not
        pick the seed (and with it who sums).
        """
        return self.seed == next_round_seed(self.previous_seed, self.model_digest, self.round_id)

    def check_words(self, words: Words, what: str = "the message") -> None:
        """Raise ``WRONG_LENGTH`` unless ``words`` are M + 4 words of this round's word size.

        For the words of an Update or Sum2 that passed :func:`decode_message` (the
        coordinator's admission calls it); ``what`` names them in the error.
        """
        bits = words.dtype.itemsize * 8
        expected = update_words(self.vector_length)
        if words.dtype != np.dtype(self.mask.dtype) or words.shape != (expected,):
            raise RemoteProtocolError(
                Reason.WRONG_LENGTH,
                f"{what} has {words.size} words of {bits} bits, expected {expected} of "
                f"{self.mask.word_bits}",
                round_id=self.round_id,
            )

    def _write(self, w: Writer) -> None:
        w.u64(self.round_id)
        w.fixed(self.seed, 32, "seed")
        w.fixed(self.previous_seed, 32, "previous seed")
        for name in ("p_sum", "p_update"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LocalProtocolError(f"{name} {value} is not a probability")
            w.f64(value)
        for name in ("sum_time_max_s", "update_time_max_s", "sum2_time_max_s"):
            value = getattr(self, name)
            if not 0.0 < value < float("inf"):
                raise LocalProtocolError(f"{name} {value} is not a positive duration")
            w.f64(value)
        w.ident(self.model_id, "model id")
        w.u64(self.model_version)
        w.fixed(self.model_digest, 32, "model digest")
        w.f64(self.mask.bound)
        w.u32(self.mask.n_max)
        w.u8(self.mask.word_bits)
        if not (0.0 <= self.mask.noise < float("inf") and 0.0 <= self.clip_norm < float("inf")):
            raise LocalProtocolError("mask noise and clip norm must be finite and >= 0")
        if self.noise_variance and not self.clip_norm > 0:
            raise LocalProtocolError("a round with DP noise needs a clip norm > 0")
        w.f64(self.mask.noise)
        w.f64(self.clip_norm)
        w.u64(self.noise_variance)
        w.u64(self.vector_length)
        w.u32(self.chunk_size)
        if not 1 <= self.groups <= MAX_GROUPS:
            raise LocalProtocolError(f"groups {self.groups} is not in [1, {MAX_GROUPS}]")
        w.u8(self.groups)
        _write_certificate(w, self.certificate)

    @classmethod
    def _read(cls, r: Reader, header: Header) -> RoundParams:
        round_id = r.u64("round id")
        if round_id != header.round_id:
            raise _malformed("round parameters disagree with the header's round id")
        seed = r.fixed(32, "seed")
        previous_seed = r.fixed(32, "previous seed")
        p_sum = r.f64("p_sum")
        p_update = r.f64("p_update")
        if not (0.0 <= p_sum <= 1.0 and 0.0 <= p_update <= 1.0):
            raise _malformed("sum or update probability outside [0, 1]")
        times = [r.f64(name) for name in ("sum time", "update time", "sum2 time")]
        if any(t <= 0.0 for t in times):
            raise _malformed("phase durations must be positive")
        model_id = r.ident("model id")
        model_version = r.u64("model version")
        model_digest = r.fixed(32, "model digest")
        bound = r.f64("mask bound")
        n_max = r.u32("mask n_max")
        word_bits = r.u8("mask word bits")
        noise = r.f64("mask noise")
        try:
            mask = MaskConfig(bound, n_max, word_bits, noise)  # type: ignore[arg-type]
        except MaskflError as exc:
            raise _malformed(f"mask config: {exc}") from exc
        clip_norm = r.f64("clip norm")
        noise_variance = r.u64("noise variance")
        if not 0.0 <= clip_norm < float("inf") or (noise_variance and not clip_norm > 0):
            raise _malformed("clip norm must be finite, >= 0, and > 0 when there is noise")
        vector_length = r.u64("vector length")
        chunk_size = r.u32("chunk size")
        groups = r.u8("mask groups")
        if groups < 1:
            raise _malformed("a round has at least one mask group")
        certificate = _read_certificate(r)
        return cls(
            RoundId(round_id),
            seed,
            previous_seed,
            p_sum,
            p_update,
            times[0],
            times[1],
            times[2],
            model_id,
            model_version,
            model_digest,
            mask,
            vector_length,
            chunk_size,
            certificate,
            groups,
            clip_norm,
            noise_variance,
        )


@dataclass(frozen=True, slots=True)
class Sum:
    """Summer → coordinator: the summer's fresh X25519 public key for this round."""

    TYPE: ClassVar[MessageType] = MessageType.SUM

    certificate: Certificate
    ephemeral_pk: bytes

    def _write(self, w: Writer) -> None:
        _write_certificate(w, self.certificate)
        w.fixed(self.ephemeral_pk, KEY_SIZE, "ephemeral public key")

    @classmethod
    def _read(cls, r: Reader, header: Header) -> Sum:
        return cls(_read_certificate(r), r.fixed(KEY_SIZE, "ephemeral public key"))


@dataclass(frozen=True, slots=True)
class SumDict:
    """Coordinator → updaters, retained: every accepted summer's own signed Sum message.

    The entries are the raw messages as the summers signed them, so an updater
    verifies each (:func:`open_sum_dict`) and the coordinator can neither insert
    a summer nor swap a key. ``groups[i]`` is the mask group of entry i (all 0
    when not given), which every updater checks against the ticket hash.
    """

    TYPE: ClassVar[MessageType] = MessageType.SUM_DICT

    entries: tuple[bytes, ...]
    groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.groups:
            object.__setattr__(self, "groups", (0,) * len(self.entries))
        if len(self.groups) != len(self.entries):
            raise LocalProtocolError("a sum dictionary has one group per entry")

    def _write(self, w: Writer) -> None:
        w.u32(len(self.entries))
        for group, raw in zip(self.groups, self.entries, strict=True):
            if len(raw) > MAX_SUM_SIZE:
                raise LocalProtocolError(f"sum dictionary entry above {MAX_SUM_SIZE} bytes")
            w.u8(group)
            w.u16(len(raw))
            w.raw(bytes(raw))

    @classmethod
    def _read(cls, r: Reader, header: Header) -> SumDict:
        count = r.u32("summer count")
        if count > r.remaining // 3:
            raise _malformed(f"{count} summers do not fit in {r.remaining} bytes")
        entries = []
        groups = []
        for _ in range(count):
            groups.append(r.u8("sum entry group"))
            n = r.u16("sum entry length")
            if n > MAX_SUM_SIZE:
                raise _malformed(f"sum entry of {n} bytes, at most {MAX_SUM_SIZE}")
            entries.append(r.fixed(n, "sum entry"))
        return cls(tuple(entries), tuple(groups))


@dataclass(frozen=True, slots=True, eq=False)
class Update:
    """Updater → coordinator: the masked update and its seeds, each sealed to its group's summers.

    ``sealed_seeds`` maps a summer's Ed25519 identity key (the sender of its Sum
    message) to the 80-byte sealed box, under the summer's ephemeral key, of the
    updater's seed for that summer's mask group. ``words`` are the M + 1 masked
    words (the weight last); after :func:`decode_message` they are a read-only
    view into the received bytes.
    """

    TYPE: ClassVar[MessageType] = MessageType.UPDATE

    certificate: Certificate
    sealed_seeds: Mapping[bytes, bytes]
    words: Words

    def _write(self, w: Writer) -> None:
        _write_certificate(w, self.certificate)
        _write_map(w, self.sealed_seeds, KEY_SIZE, SEALED_SEED_SIZE, "sealed seeds")
        _write_words(w, self.words, "update words")

    @classmethod
    def _read(cls, r: Reader, header: Header) -> Update:
        certificate = _read_certificate(r)
        seeds = _read_map(r, KEY_SIZE, SEALED_SEED_SIZE, "sealed seeds")
        return cls(certificate, seeds, _read_words(r, "update words"))


@dataclass(frozen=True, slots=True)
class SeedDict:
    """Coordinator → one summer, retained: the seeds sealed to it, by update digest.

    ``group`` is the summer's mask group: the seeds are the updaters' seeds of
    that group, and the summer's sum2 is that group's aggregate mask.
    """

    TYPE: ClassVar[MessageType] = MessageType.SEED_DICT

    summer_pk: bytes
    sealed_seeds: Mapping[bytes, bytes]
    group: int = 0

    def _write(self, w: Writer) -> None:
        w.fixed(self.summer_pk, KEY_SIZE, "summer public key")
        w.u8(self.group)
        _write_map(w, self.sealed_seeds, DIGEST_SIZE, SEALED_SEED_SIZE, "seed dictionary")

    @classmethod
    def _read(cls, r: Reader, header: Header) -> SeedDict:
        summer_pk = r.fixed(KEY_SIZE, "summer public key")
        group = r.u8("seed dictionary group")
        seeds = _read_map(r, DIGEST_SIZE, SEALED_SEED_SIZE, "seed dictionary")
        return cls(summer_pk, seeds, group)


@dataclass(frozen=True, slots=True, eq=False)
class Sum2:
    """Summer → coordinator: the sum of the masks it could open, and the ones it could not.

    ``failed`` lists (sorted) the digests of updates whose sealed seed did not
    open; the coordinator drops those updates from the aggregate.
    """

    TYPE: ClassVar[MessageType] = MessageType.SUM2

    certificate: Certificate
    words: Words
    failed: tuple[bytes, ...] = ()

    def _write(self, w: Writer) -> None:
        _write_certificate(w, self.certificate)
        failed = sorted(set(self.failed))
        w.u32(len(failed))
        for digest in failed:
            w.fixed(digest, DIGEST_SIZE, "failed update digest")
        _write_words(w, self.words, "aggregate mask")

    @classmethod
    def _read(cls, r: Reader, header: Header) -> Sum2:
        certificate = _read_certificate(r)
        count = r.u32("failed count")
        if count > r.remaining // DIGEST_SIZE:
            raise _malformed(f"{count} failed digests do not fit in {r.remaining} bytes")
        failed = tuple(r.fixed(DIGEST_SIZE, "failed digest") for _ in range(count))
        _sorted_unique(failed, "failed digests")
        return cls(certificate, _read_words(r, "aggregate mask"), failed)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Coordinator → one device: what became of one of its messages.

    ``message_digest`` is the message digest (:attr:`SignedMessage.digest`), or
    the SHA-256 of the raw payload when it could not be decoded, in which case
    ``message_type`` is None. A rejection carries its :class:`Reason`;
    ``detail`` is cut to 1024 bytes of UTF-8 when encoded.
    """

    TYPE: ClassVar[MessageType] = MessageType.RECEIPT

    message_digest: bytes
    message_type: MessageType | None
    accepted: bool
    reason: Reason | None = None
    detail: str = ""

    def _write(self, w: Writer) -> None:
        if self.accepted == (self.reason is not None):
            raise LocalProtocolError("a receipt has a reason exactly when it is a rejection")
        w.fixed(self.message_digest, DIGEST_SIZE, "receipt digest")
        w.u8(0 if self.message_type is None else int(self.message_type))
        w.u8(1 if self.accepted else 0)
        w.text("" if self.reason is None else str(self.reason), "reason", max_len=64)
        detail = self.detail.encode("utf-8")[:MAX_DETAIL].decode("utf-8", "ignore")
        w.text(detail, "receipt detail", max_len=MAX_DETAIL, prefix=2)

    @classmethod
    def _read(cls, r: Reader, header: Header) -> Receipt:
        digest = r.fixed(DIGEST_SIZE, "receipt digest")
        type_code = r.u8("receipt message type")
        try:
            message_type = None if type_code == 0 else MessageType(type_code)
        except ValueError as exc:
            raise _malformed(f"receipt names unknown message type {type_code}") from exc
        accepted = r.bool("receipt accepted")
        reason_text = r.text("receipt reason", max_len=64)
        try:
            reason = Reason(reason_text) if reason_text else None
        except ValueError as exc:
            raise _malformed(f"unknown reason {reason_text!r}") from exc
        if accepted == (reason is not None):
            raise _malformed("a receipt has a reason exactly when it is a rejection")
        detail = r.text("receipt detail", max_len=MAX_DETAIL, prefix=2)
        return cls(digest, message_type, accepted, reason, detail)


@dataclass(frozen=True, slots=True, eq=False)
class GlobalModel:
    """Coordinator → all, retained: a version of the global model.

    ``weights`` is the flat float32 parameter vector; ``previous_digest`` the
    :func:`weights_digest` of the version before it (chaining the registry);
    ``graph_digest`` the SHA-256 of the .tflite file published unsigned on
    ``model/<id>/graph`` (zero when not stated), so a device can check it;
    ``metrics`` a few named numbers (``error_bound``, ``updates`` ...).
    """

    TYPE: ClassVar[MessageType] = MessageType.GLOBAL_MODEL

    model_id: str
    version: int
    round_id: RoundId
    previous_digest: bytes
    weights: Weights
    metrics: tuple[tuple[str, float], ...] = ()
    graph_digest: bytes = bytes(32)

    @property
    def digest(self) -> bytes:
        """:func:`weights_digest` of these weights (what the round seed chain hashes)."""
        return weights_digest(self.weights)

    def _write(self, w: Writer) -> None:
        weights = self.weights
        if weights.ndim != 1 or weights.dtype != np.float32:
            raise LocalProtocolError("global model weights must be a 1-D float32 array")
        self._write_head(w, weights.size)
        w.raw(memoryview(np.ascontiguousarray(weights, dtype="<f4").data).cast("B"))

    def _write_head(self, w: Writer, size: int) -> None:
        """Everything before the weights (of ``size`` floats), padding included."""
        w.ident(self.model_id, "model id")
        w.u64(self.version)
        w.u64(self.round_id)
        w.fixed(self.previous_digest, DIGEST_SIZE, "previous digest")
        w.fixed(self.graph_digest, DIGEST_SIZE, "graph digest")
        if len(self.metrics) > MAX_METRICS:
            raise LocalProtocolError(f"more than {MAX_METRICS} metrics")
        names = [name for name, _ in self.metrics]
        if len(set(names)) != len(names):
            raise LocalProtocolError("metric names repeat")
        w.u16(len(self.metrics))
        for name, value in self.metrics:
            w.text(name, "metric name", max_len=64)
            w.f64(float(value))
        w.u64(size)
        w.align(8, BODY_OFFSET)

    @classmethod
    def _read(cls, r: Reader, header: Header) -> GlobalModel:
        model_id = r.ident("model id")
        version = r.u64("model version")
        round_id = r.u64("model round id")
        if round_id != header.round_id:
            raise _malformed("global model disagrees with the header's round id")
        previous = r.fixed(DIGEST_SIZE, "previous digest")
        graph = r.fixed(DIGEST_SIZE, "graph digest")
        count = r.u16("metric count")
        if count > MAX_METRICS:
            raise _malformed(f"{count} metrics, at most {MAX_METRICS}")
        metrics = []
        for _ in range(count):
            name = r.text("metric name", max_len=64)
            metrics.append((name, r.f64("metric value", finite=False)))
        if len({name for name, _ in metrics}) != len(metrics):
            raise _malformed("metric names repeat")
        n = r.u64("weight count")
        r.align(8, BODY_OFFSET, "weights padding")
        weights = r.words("<f4", n, "weights")
        return cls(model_id, version, RoundId(round_id), previous, weights, tuple(metrics), graph)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Device → coordinator on ``status/<device>``: alive, what it is doing, since when."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT

    certificate: Certificate
    state: str
    uptime_s: float
    model_version: int = 0

    def _write(self, w: Writer) -> None:
        _write_certificate(w, self.certificate)
        w.text(self.state, "heartbeat state", max_len=64)
        if not 0.0 <= self.uptime_s < float("inf"):
            raise LocalProtocolError(f"uptime {self.uptime_s} is not a finite duration")
        w.f64(self.uptime_s)
        w.u64(self.model_version)

    @classmethod
    def _read(cls, r: Reader, header: Header) -> Heartbeat:
        certificate = _read_certificate(r)
        state = r.text("heartbeat state", max_len=64)
        uptime = r.f64("uptime")
        if uptime < 0.0:
            raise _malformed("negative uptime")
        return cls(certificate, state, uptime, r.u64("model version"))


Body: TypeAlias = (
    RoundParams | Sum | SumDict | Update | SeedDict | Sum2 | Receipt | GlobalModel | Heartbeat
)

_BODIES: Final[dict[MessageType, Any]] = {
    cls.TYPE: cls
    for cls in (RoundParams, Sum, SumDict, Update, SeedDict, Sum2, Receipt, GlobalModel, Heartbeat)
}


def max_masked_size(n_words: int, word_bits: int, *, seeds: int = 0, failed: int = 0) -> int:
    """The largest valid Update with ``seeds`` sealed seeds and the largest valid Sum2
    naming ``failed`` updates, whichever is larger, both with ``n_words`` words.

    Both are 490 bytes at most (header, signature, certificate ≤ 254, entry count 4,
    word bits 1, word count 8, padding ≤ 7) plus 112 per seed or 32 per failed
    update plus the words. With a round's most summers and updates it is the
    coordinator's per-message limit (protocol.md §9), what it passes as ``max_size``
    to :func:`decode_message`; a sender compares it with the chunk size.
    """
    fixed = BODY_OFFSET + 2 + MAX_CERTIFICATE_SIZE + 4 + 1 + 8 + 7
    entries = max(seeds * (KEY_SIZE + SEALED_SEED_SIZE), failed * DIGEST_SIZE)
    return fixed + entries + n_words * (word_bits // 8)


def weights_digest(weights: Weights) -> bytes:
    """SHA-256 of the little-endian float32 bytes of a weight vector."""
    data = np.ascontiguousarray(weights, dtype="<f4")
    return hashlib.sha256(memoryview(data.data).cast("B")).digest()


# --- encode / decode --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SignedMessage:
    """A decoded message whose signature has been verified against ``header.sender``.

    ``digest`` is the SHA-256 of the header (the message's name in receipts and
    seed dictionaries); ``raw`` the received bytes, which array fields of the
    body view without copying.
    """

    header: Header
    body: Body
    digest: bytes
    raw: bytes = field(repr=False)

    @property
    def certificate(self) -> Certificate | None:
        """The sender's certificate when the body carries one."""
        cert = getattr(self.body, "certificate", None)
        return cert if isinstance(cert, Certificate) else None

    def expect(
        self,
        *,
        fleet: str,
        round_id: int | None = None,
        types: Iterable[MessageType] | None = None,
    ) -> None:
        """Raise ``WRONG_FLEET``, ``WRONG_ROUND`` or ``WRONG_PHASE`` unless it is expected here.

        The header binds fleet, round and type under the signature, so a
        message replayed from another fleet, round or phase fails here.
        """
        h = self.header
        if h.fleet != fleet:
            raise RemoteProtocolError(
                Reason.WRONG_FLEET, f"message for fleet {h.fleet!r}, expected {fleet!r}"
            )
        if round_id is not None and h.round_id != round_id:
            raise RemoteProtocolError(
                Reason.WRONG_ROUND,
                f"message for round {h.round_id}, expected {round_id}",
                round_id=h.round_id,
            )
        if types is not None and h.message_type not in set(types):
            raise RemoteProtocolError(
                Reason.WRONG_PHASE,
                f"{h.message_type.name} message not accepted now",
                round_id=h.round_id,
            )


def encode_message(
    body: Body, *, fleet: str, round_id: int, signing_key: nacl.signing.SigningKey
) -> bytes:
    """Sign and serialize ``body``; raises LocalProtocolError for an invalid body.

    A body that carries a certificate must carry the signer's own.
    """
    sender = bytes(signing_key.verify_key)
    cert = getattr(body, "certificate", None)
    if isinstance(cert, Certificate) and cert.public_key != sender:
        raise LocalProtocolError("the body's certificate is not the signing key's")
    w = _body_writer(body._write, body)
    parts = w.parts()
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
    return b"".join(
        [
            *_signed_header(
                body,
                fleet=fleet,
                round_id=round_id,
                signing_key=signing_key,
                size=w.size,
                body_hash=hasher,
            ),
            *parts,
        ]
    )


def _body_writer(write: Callable[[Writer], None], body: Body) -> Writer:
    w = Writer()
    try:
        write(w)
    except (OverflowError, struct.error, TypeError, AttributeError) as exc:
        raise LocalProtocolError(f"cannot encode {type(body).__name__}: {exc}") from exc
    return w


def _signed_header(
    body: Body,
    *,
    fleet: str,
    round_id: int,
    signing_key: nacl.signing.SigningKey,
    size: int,
    body_hash: Any,
) -> tuple[bytes, bytes]:
    """The header of ``body`` (``size`` bytes, hashed into ``body_hash``) and its signature."""
    check_id(fleet, "fleet")
    if not 0 <= round_id <= U64_MAX:
        raise LocalProtocolError(f"round id {round_id} is not a u64")
    sender = bytes(signing_key.verify_key)
    header = Header(
        body.TYPE, FleetId(fleet), RoundId(round_id), sender, size, body_hash.digest()
    ).to_bytes()
    return header, signing_key.sign(MESSAGE_DOMAIN + header).signature


class GlobalModelBuffer:
    """A signed GLOBAL_MODEL built in one buffer around its weights: fill
    :attr:`weights` in place, then :meth:`sign`. The bytes are those of
    :func:`encode_message` for the same body, without a 4·M-byte weights array
    beside them and a join of both into a third (at M = 2.5e7 each is 100 MB of
    fresh memory, see docs/operations.md).

    ``head`` is the body's every field but ``weights`` (ignored); ``size`` the
    number of weights.
    """

    def __init__(self, head: GlobalModel, size: int) -> None:
        self._head = head
        self._fields = _body_writer(lambda w: head._write_head(w, size), head)
        offset = BODY_OFFSET + self._fields.size
        self.buffer = bytearray(offset + 4 * size)
        """The message: header and body fields are written by :meth:`sign`."""
        self.weights: Weights = np.frombuffer(self.buffer, "<f4", size, offset)
        """The weights, little-endian float32, a view of :attr:`buffer`'s last 4·size bytes."""

    def sign(self, *, fleet: str, round_id: int, signing_key: nacl.signing.SigningKey) -> bytearray:
        """Write the body's fields, the header and the signature around the weights (now
        read-only); returns :attr:`buffer`, the complete message."""
        self.weights.flags.writeable = False
        buffer, pos = self.buffer, BODY_OFFSET
        for part in self._fields.parts():
            n = len(part) if isinstance(part, bytes) else part.nbytes
            buffer[pos : pos + n] = part
            pos += n
        with memoryview(buffer) as view:
            body_hash = hashlib.sha256(view[BODY_OFFSET:])
        header, signature = _signed_header(
            self._head,
            fleet=fleet,
            round_id=round_id,
            signing_key=signing_key,
            size=len(buffer) - BODY_OFFSET,
            body_hash=body_hash,
        )
        buffer[:HEADER_SIZE] = header
        buffer[HEADER_SIZE:BODY_OFFSET] = signature
        return buffer


def decode_message(data: bytes | bytearray | memoryview, *, max_size: int) -> SignedMessage:
    """Check sizes, verify the signature, then parse; only RemoteProtocolError escapes.

    ``data`` that is not ``bytes`` is copied once (the result's arrays view it).
    """
    size = memoryview(data).nbytes
    if size > max_size:
        raise RemoteProtocolError(Reason.OVERSIZE, f"message of {size} bytes, at most {max_size}")
    raw = data if isinstance(data, bytes) else memoryview(data).tobytes()
    if size < BODY_OFFSET:
        raise _malformed(f"message of {size} bytes is shorter than its header")
    view = memoryview(raw)
    header = Header.parse(view)
    if header.body_length != size - BODY_OFFSET:
        raise RemoteProtocolError(
            Reason.WRONG_LENGTH,
            f"header announces a {header.body_length}-byte body, {size - BODY_OFFSET} received",
        )
    header_bytes = raw[:HEADER_SIZE]
    signature = raw[HEADER_SIZE:BODY_OFFSET]
    try:
        nacl.signing.VerifyKey(header.sender).verify(MESSAGE_DOMAIN + header_bytes, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise RemoteProtocolError(
            Reason.BAD_SIGNATURE, "header signature does not verify with the sender's key"
        ) from exc
    if hashlib.sha256(view[BODY_OFFSET:]).digest() != header.body_digest:
        raise RemoteProtocolError(Reason.BAD_SIGNATURE, "body does not match the signed digest")
    reader = Reader(view, BODY_OFFSET)
    body: Body = _BODIES[header.message_type]._read(reader, header)
    reader.end(f"{header.message_type.name} body")
    return SignedMessage(header, body, hashlib.sha256(header_bytes).digest(), raw)


def verify_sender(
    message: SignedMessage,
    *,
    ca_public_key: bytes,
    fleet: str,
    now: float,
    revocations: RevocationList | None,
    certificate: Certificate | None = None,
) -> Certificate:
    """Check that an enrolled node of the right role signed ``message``; return its certificate.

    Uses the certificate in the body, or ``certificate`` for bodies without one
    (the coordinator's, from the round parameters). Raises CertificateError:
    the reasons of :func:`verify_certificate`, and ``unenrolled`` when the
    certificate's key is not the key that signed the message.
    """
    cert = message.certificate or certificate
    if cert is None:
        raise LocalProtocolError(
            f"{message.header.message_type.name} carries no certificate; pass the sender's"
        )
    verify_certificate(
        cert,
        ca_public_key=ca_public_key,
        fleet=fleet,
        now=now,
        revocations=revocations,
        role=message.header.message_type.sender_role,
    )
    if cert.public_key != message.header.sender:
        raise CertificateError(
            Reason.UNENROLLED,
            f"message signed by a key that is not enrolled as {cert.subject!r}",
            participant=cert.subject,
        )
    return cert


def open_sum_dict(
    sum_dict: SumDict,
    *,
    fleet: str,
    round_id: int,
    ca_public_key: bytes,
    now: float,
    revocations: RevocationList | None,
    groups: int = 1,
    round_seed: bytes | None = None,
) -> tuple[Sum, ...]:
    """Verify every entry of a sum dictionary as its summer signed it; return the Sum bodies.

    Any bad entry rejects the whole dictionary (the coordinator that sent it is
    broken or malicious): its reason is the entry's (``bad_signature`` for a
    swapped ephemeral key, ``unenrolled`` for a swapped certificate, ...), a
    summer listed twice is ``duplicate``, and an entry whose group is not
    :func:`~maskfl.protocol.sortition.group_of` its key (the round's ``groups``
    and ``round_seed``) is ``malformed``, as is a dictionary with a group that
    has no summer: sealing a seed to nobody would leave the round unmaskable.
    """
    if groups > 1 and round_seed is None:
        raise LocalProtocolError("checking the groups of a sum dictionary needs the round seed")
    seen: set[bytes] = set()
    sums = []
    filled: set[int] = set()
    for group, raw in zip(sum_dict.groups, sum_dict.entries, strict=True):
        message = decode_message(raw, max_size=MAX_SUM_SIZE)
        message.expect(fleet=fleet, round_id=round_id, types=(MessageType.SUM,))
        verify_sender(
            message, ca_public_key=ca_public_key, fleet=fleet, now=now, revocations=revocations
        )
        if message.header.sender in seen:
            raise RemoteProtocolError(Reason.DUPLICATE, "a summer appears twice")
        seen.add(message.header.sender)
        expected = 0 if groups == 1 else group_of(round_seed or b"", message.header.sender, groups)
        if group != expected:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"sum dictionary puts a summer in group {group}; its ticket says {expected}",
            )
        filled.add(group)
        body = message.body
        assert isinstance(body, Sum)
        sums.append(body)
    if sums and len(filled) != groups:
        missing = sorted(set(range(groups)) - filled)
        raise RemoteProtocolError(
            Reason.MALFORMED, f"sum dictionary has no summer in group(s) {missing} of {groups}"
        )
    return tuple(sums)
