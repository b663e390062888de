"""Signed binary messages: round trips, zero-copy words, and every rejection."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nacl.signing import SigningKey

from maskfl.protocol.errors import (
    CertificateError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
)
from maskfl.protocol.identity import Identity
from maskfl.protocol.ids import Role, RoundId
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.messages import (
    BODY_OFFSET,
    HEADER_SIZE,
    MAX_SUM_SIZE,
    Body,
    GlobalModel,
    GlobalModelBuffer,
    Heartbeat,
    MessageType,
    Receipt,
    RoundParams,
    SeedDict,
    Sum,
    Sum2,
    SumDict,
    Update,
    decode_message,
    encode_message,
    max_masked_size,
    open_sum_dict,
    verify_sender,
    weights_digest,
)
from maskfl.protocol.phases import Phase
from maskfl.protocol.sortition import next_round_seed
from tests.protocol.wire_samples import (
    CA_PUBLIC,
    COORDINATOR,
    DEVICE,
    EPHEMERAL_PK,
    FLEET,
    NOW,
    ROUND,
    SUMMER,
    bodies,
    identity,
    revocations,
    round_params,
    sign,
    sum_message,
)

MAX = 1 << 24
b32 = st.binary(min_size=32, max_size=32)
ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
u64 = st.integers(0, 2**64 - 1)
rounds = u64


def same(a: Any, b: Any) -> bool:
    """Field-wise equality that understands numpy arrays and mappings."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, dict):
        return dict(a) == dict(b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):  # NaN metrics survive the trip as NaN
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


def round_trip(body: Body, ident: Identity, round_id: int = ROUND) -> bytes:
    raw = encode_message(body, fleet=FLEET, round_id=round_id, signing_key=ident.signing_key)
    message = decode_message(raw, max_size=MAX)
    assert same(message.body, body), (message.body, body)
    assert message.header.message_type == body.TYPE
    assert message.header.round_id == round_id
    assert message.header.fleet == FLEET
    assert message.header.sender == ident.public_key
    assert message.header.body_length == len(raw) - BODY_OFFSET
    assert message.digest == hashlib.sha256(raw[:HEADER_SIZE]).digest()
    assert message.raw is raw
    return raw


# --- round trips ------------------------------------------------------------------------------


def test_every_sample_round_trips() -> None:
    for body, ident in bodies().values():
        round_trip(body, ident)


@settings(max_examples=40, deadline=None)
@given(
    round_id=rounds,
    seeds=st.tuples(b32, b32, b32),
    probabilities=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    times=st.tuples(*[st.floats(1e-3, 1e6)] * 3),
    model_id=ids,
    model_version=u64,
    mask=st.builds(
        MaskConfig,
        st.floats(1e-3, 100),
        st.integers(1, 10_000),
        st.sampled_from([32, 64]),
    ),
    vector_length=u64,
    chunk_size=st.integers(0, 2**32 - 1),
)
def test_round_params_round_trip(
    *,
    round_id: int,
    seeds: tuple[bytes, bytes, bytes],
    probabilities: tuple[float, float],
    times: tuple[float, float, float],
    model_id: str,
    model_version: int,
    mask: MaskConfig,
    vector_length: int,
    chunk_size: int,
) -> None:
    body = RoundParams(
        round_id,  # type: ignore[arg-type]
        seeds[0],
        seeds[1],
        *probabilities,
        *times,
        model_id,
        model_version,
        seeds[2],
        mask,
        vector_length,
        chunk_size,
        COORDINATOR.certificate,
    )
    round_trip(body, COORDINATOR, round_id)


@settings(max_examples=30, deadline=None)
@given(ephemeral=b32, round_id=rounds)
def test_sum_round_trip(ephemeral: bytes, round_id: int) -> None:
    round_trip(Sum(SUMMER.certificate, ephemeral), SUMMER, round_id)


@settings(max_examples=30, deadline=None)
@given(entries=st.lists(st.binary(max_size=MAX_SUM_SIZE), max_size=5))
def test_sum_dict_round_trip(entries: list[bytes]) -> None:
    round_trip(SumDict(tuple(entries)), COORDINATOR)


words_strategy = st.one_of(
    hnp.arrays(np.uint32, st.integers(0, 300)),
    hnp.arrays(np.uint64, st.integers(0, 300)),
)


@settings(max_examples=60, deadline=None)
@given(
    seeds=st.dictionaries(b32, st.binary(min_size=80, max_size=80), max_size=6),
    words=words_strategy,
    round_id=rounds,
)
def test_update_round_trip_and_words_are_aligned_views(
    seeds: dict[bytes, bytes], words: np.ndarray[Any, Any], round_id: int
) -> None:
    raw = round_trip(Update(DEVICE.certificate, seeds, words), DEVICE, round_id)
    decoded = decode_message(raw, max_size=MAX).body
    assert isinstance(decoded, Update)
    offset = len(raw) - decoded.words.nbytes
    assert offset % 8 == 0
    assert decoded.words.flags.aligned
    assert not decoded.words.flags.writeable
    if decoded.words.size:
        assert np.shares_memory(decoded.words, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(
        np.frombuffer(memoryview(raw), words.dtype, words.size, offset), words
    )


@settings(max_examples=30, deadline=None)
@given(
    summer=b32,
    entries=st.dictionaries(b32, st.binary(min_size=80, max_size=80), max_size=6),
)
def test_seed_dict_round_trip(summer: bytes, entries: dict[bytes, bytes]) -> None:
    round_trip(SeedDict(summer, entries), COORDINATOR)


@settings(max_examples=40, deadline=None)
@given(words=words_strategy, failed=st.lists(b32, unique=True, max_size=5))
def test_sum2_round_trip(words: np.ndarray[Any, Any], failed: list[bytes]) -> None:
    round_trip(Sum2(SUMMER.certificate, words, tuple(sorted(failed))), SUMMER)


@settings(max_examples=40, deadline=None)
@given(
    digest=b32,
    message_type=st.one_of(st.none(), st.sampled_from(MessageType)),
    reason=st.one_of(st.none(), st.sampled_from(Reason)),
    detail=st.text(max_size=200),
)
def test_receipt_round_trip(
    digest: bytes, message_type: MessageType | None, reason: Reason | None, detail: str
) -> None:
    body = Receipt(digest, message_type, reason is None, reason, detail)
    round_trip(body, COORDINATOR)


@settings(max_examples=40, deadline=None)
@given(
    model_id=ids,
    version=u64,
    previous=b32,
    weights=hnp.arrays(np.float32, st.integers(0, 200)),
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=16), st.floats(allow_nan=True), max_size=5
    ),
)
def test_global_model_round_trip(
    model_id: str,
    version: int,
    previous: bytes,
    weights: np.ndarray[Any, Any],
    metrics: dict[str, float],
) -> None:
    body = GlobalModel(model_id, version, ROUND, previous, weights, tuple(metrics.items()))
    raw = round_trip(body, COORDINATOR)
    decoded = decode_message(raw, max_size=MAX).body
    assert isinstance(decoded, GlobalModel)
    assert decoded.weights.flags.aligned
    assert decoded.digest == weights_digest(weights)


@settings(max_examples=60, deadline=None)
@given(
    model_id=ids,
    numbers=st.tuples(u64, rounds),
    digests=st.tuples(b32, b32),
    weights=hnp.arrays(np.float32, st.integers(0, 200)),
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=16), st.floats(allow_nan=True), max_size=5
    ),
)
def test_a_global_model_built_in_its_buffer_is_the_encoded_message(
    model_id: str,
    numbers: tuple[int, int],
    digests: tuple[bytes, bytes],
    weights: np.ndarray[Any, Any],
    metrics: dict[str, float],
) -> None:
    """GlobalModelBuffer (the coordinator's unmask) and encode_message give the same bytes
    (the ids and metrics vary the padding before the weights)."""
    (version, round_id), (previous, graph) = numbers, digests
    fields = (model_id, version, RoundId(round_id), previous)
    body = GlobalModel(*fields, weights, tuple(metrics.items()), graph)
    want = encode_message(body, fleet=FLEET, round_id=round_id, signing_key=COORDINATOR.signing_key)
    head = GlobalModel(*fields, np.ones(3, np.float32), tuple(metrics.items()), graph)
    model = GlobalModelBuffer(head, weights.size)  # the head's own weights are ignored
    model.weights[:] = weights
    got = model.sign(fleet=FLEET, round_id=round_id, signing_key=COORDINATOR.signing_key)
    assert got is model.buffer and bytes(got) == want
    assert model.weights.ctypes.data == np.frombuffer(got, np.uint8).ctypes.data + (
        len(got) - weights.nbytes
    )  # a view of the message, not a copy
    assert not model.weights.flags.writeable
    assert weights_digest(model.weights) == weights_digest(weights)


def test_a_global_model_buffer_checks_what_encode_message_checks() -> None:
    head = GlobalModel("m", 1, ROUND, bytes(32), np.zeros(0, np.float32))
    key = COORDINATOR.signing_key
    with pytest.raises(LocalProtocolError):
        GlobalModelBuffer(dataclasses.replace(head, model_id="bad id"), 4)
    with pytest.raises(LocalProtocolError):
        GlobalModelBuffer(dataclasses.replace(head, metrics=(("a", 1), ("a", 2))), 4)
    with pytest.raises(LocalProtocolError):
        GlobalModelBuffer(head, 4).sign(fleet="no/slash", round_id=1, signing_key=key)
    with pytest.raises(LocalProtocolError):
        GlobalModelBuffer(head, 4).sign(fleet=FLEET, round_id=-1, signing_key=key)


@settings(max_examples=30, deadline=None)
@given(state=st.text(max_size=20), uptime=st.floats(0, 1e9), version=u64)
def test_heartbeat_round_trip(state: str, uptime: float, version: int) -> None:
    round_trip(Heartbeat(DEVICE.certificate, state, uptime, version), DEVICE)


def test_message_types_name_phase_and_role() -> None:
    assert MessageType.SUM.phase == Phase.SUM
    assert MessageType.UPDATE.phase == Phase.UPDATE
    assert MessageType.SUM2.phase == Phase.SUM2
    assert MessageType.ROUND_PARAMS.phase is None
    assert MessageType.UPDATE.sender_role == Role.DEVICE
    assert MessageType.SEED_DICT.sender_role == Role.COORDINATOR


# --- decode rejections -------------------------------------------------------------------------


def reject(raw: bytes, reason: Reason, max_size: int = MAX) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(raw, max_size=max_size)
    assert info.value.reason == reason, str(info.value)


def update_raw() -> bytes:
    body, ident = bodies()["update"]
    return sign(body, ident)


def test_oversize_is_checked_first() -> None:
    raw = update_raw()
    reject(raw, Reason.OVERSIZE, max_size=len(raw) - 1)
    decode_message(raw, max_size=len(raw))
    reject(b"\xff" * 10_000, Reason.OVERSIZE, max_size=9_999)


def test_truncated_or_extended_body_is_wrong_length() -> None:
    raw = update_raw()
    reject(raw[:-1], Reason.WRONG_LENGTH)
    reject(raw + b"\x00", Reason.WRONG_LENGTH)
    reject(raw[:100], Reason.MALFORMED)


def test_body_length_field_edit_is_rejected() -> None:
    raw = bytearray(update_raw())
    struct.pack_into("<Q", raw, 48, 2**63)
    reject(bytes(raw), Reason.WRONG_LENGTH)


def test_tampered_header_body_or_signature_is_bad_signature() -> None:
    raw = update_raw()
    for position in (9, 20, 60, HEADER_SIZE + 5, BODY_OFFSET + 3, len(raw) - 1):
        mutated = bytearray(raw)
        mutated[position] ^= 0x01
        reject(bytes(mutated), Reason.BAD_SIGNATURE)


def test_header_fields_are_validated() -> None:
    raw = update_raw()
    for position, value in (
        (0, ord("X")),
        (4, 1),
        (4, 3),
        (5, 0),
        (5, 99),
        (6, 0),
        (6, 65),
        (7, 1),
    ):
        mutated = bytearray(raw)
        mutated[position] = value
        reject(bytes(mutated), Reason.MALFORMED)
    mutated = bytearray(raw)
    mutated[88 + len(FLEET)] = ord("x")  # a byte after the fleet id must be zero
    reject(bytes(mutated), Reason.MALFORMED)


def test_resigned_garbage_body_is_malformed() -> None:
    """A sender can sign anything: a bad body behind a good signature is still rejected."""
    raw = bytearray(update_raw())
    body = bytearray(raw[BODY_OFFSET:])
    body[0:2] = b"\xff\xff"  # certificate length beyond the body
    digest = hashlib.sha256(body).digest()
    header = bytearray(raw[:HEADER_SIZE])
    header[56:88] = digest
    signature = DEVICE.signing_key.sign(b"maskfl/v1/message\x00" + bytes(header)).signature
    reject(bytes(header) + signature + bytes(body), Reason.MALFORMED)


def test_bytearray_and_memoryview_input() -> None:
    raw = update_raw()
    for data in (bytearray(raw), memoryview(raw)):
        message = decode_message(data, max_size=MAX)
        assert message.raw == raw


# --- sender, round and phase checks -------------------------------------------------------------


def test_replay_from_an_earlier_round_is_wrong_round() -> None:
    body, ident = bodies()["update"]
    old = decode_message(sign(body, ident, round_id=ROUND - 1), max_size=MAX)
    # the signature is fine: the header binds the round, so only the round check rejects it
    old.expect(fleet=FLEET)
    with pytest.raises(RemoteProtocolError) as info:
        old.expect(fleet=FLEET, round_id=ROUND, types=[MessageType.UPDATE])
    assert info.value.reason == Reason.WRONG_ROUND
    # and the round id cannot be edited without breaking the signature
    edited = bytearray(old.raw)
    struct.pack_into("<Q", edited, 8, ROUND)
    reject(bytes(edited), Reason.BAD_SIGNATURE)


def test_wrong_fleet_and_wrong_phase() -> None:
    message = decode_message(update_raw(), max_size=MAX)
    with pytest.raises(RemoteProtocolError) as info:
        message.expect(fleet="other")
    assert info.value.reason == Reason.WRONG_FLEET
    with pytest.raises(RemoteProtocolError) as info:
        message.expect(fleet=FLEET, round_id=ROUND, types=[MessageType.SUM])
    assert info.value.reason == Reason.WRONG_PHASE
    message.expect(fleet=FLEET, round_id=ROUND, types=[MessageType.UPDATE])


def sender_reason(raw: bytes, **kwargs: Any) -> Reason:
    message = decode_message(raw, max_size=MAX)
    args: dict[str, Any] = {
        "ca_public_key": CA_PUBLIC,
        "fleet": FLEET,
        "now": NOW,
        "revocations": None,
    }
    args.update(kwargs)
    with pytest.raises(CertificateError) as info:
        verify_sender(message, **args)
    return info.value.reason


def test_verify_sender_accepts_enrolled_senders() -> None:
    for name, (body, ident) in bodies().items():
        message = decode_message(sign(body, ident), max_size=MAX)
        given_cert = None if message.certificate else COORDINATOR.certificate
        cert = verify_sender(
            message,
            ca_public_key=CA_PUBLIC,
            fleet=FLEET,
            now=NOW,
            revocations=revocations(),
            certificate=given_cert,
        )
        assert cert.public_key == ident.public_key, name


def test_free_keypair_with_a_stolen_certificate_is_unenrolled() -> None:
    thief = SigningKey(bytes([0x99]) * 32)
    # encode_message refuses to attach someone else's certificate, so build the bytes by hand:
    honest = bytearray(update_raw())
    header = bytearray(honest[:HEADER_SIZE])
    header[16:48] = bytes(thief.verify_key)
    signature = thief.sign(b"maskfl/v1/message\x00" + bytes(header)).signature
    forged = bytes(header) + signature + bytes(honest[BODY_OFFSET:])
    assert sender_reason(forged) == Reason.UNENROLLED


def test_sender_certificate_reasons() -> None:
    raw = update_raw()
    serial = DEVICE.certificate.serial
    assert sender_reason(raw, revocations=revocations(serial)) == Reason.REVOKED
    assert sender_reason(raw, now=10**12) == Reason.EXPIRED
    assert sender_reason(raw, fleet="other") == Reason.WRONG_FLEET
    rogue = SigningKey(bytes([0x12]) * 32)
    assert sender_reason(raw, ca_public_key=bytes(rogue.verify_key)) == Reason.BAD_SIGNATURE
    # a coordinator certificate cannot send an update
    coordinator_update = sign(
        Update(COORDINATOR.certificate, {}, np.zeros(3, np.uint32)), COORDINATOR
    )
    assert sender_reason(coordinator_update) == Reason.WRONG_ROLE
    # a device cannot sign round parameters
    device_params = sign(round_params(DEVICE.certificate), DEVICE)
    assert sender_reason(device_params) == Reason.WRONG_ROLE
    # a seed dictionary signed by a device key, checked against the coordinator certificate
    seed_dict = sign(SeedDict(SUMMER.public_key, {}), DEVICE)
    assert sender_reason(seed_dict, certificate=COORDINATOR.certificate) == Reason.UNENROLLED


def test_verify_sender_needs_a_certificate() -> None:
    message = decode_message(sign(SeedDict(SUMMER.public_key, {}), COORDINATOR), max_size=MAX)
    with pytest.raises(LocalProtocolError):
        verify_sender(message, ca_public_key=CA_PUBLIC, fleet=FLEET, now=NOW, revocations=None)


# --- sum dictionary ----------------------------------------------------------------------------


def open_dict(entries: tuple[bytes, ...], **kwargs: Any) -> tuple[Sum, ...]:
    raw = sign(SumDict(entries), COORDINATOR)
    body = decode_message(raw, max_size=MAX).body
    assert isinstance(body, SumDict)
    args: dict[str, Any] = {
        "fleet": FLEET,
        "round_id": ROUND,
        "ca_public_key": CA_PUBLIC,
        "now": NOW,
        "revocations": None,
    }
    args.update(kwargs)
    return open_sum_dict(body, **args)


def dict_reason(entries: tuple[bytes, ...], **kwargs: Any) -> Reason:
    with pytest.raises(RemoteProtocolError) as info:
        open_dict(entries, **kwargs)
    return info.value.reason


def test_open_sum_dict() -> None:
    other = identity(bytes([0x52]) * 32, "device-0003", 4)
    second = sign(Sum(other.certificate, bytes([0xE1]) * 32), other)
    sums = open_dict((sum_message(), second))
    assert [s.ephemeral_pk for s in sums] == [EPHEMERAL_PK, bytes([0xE1]) * 32]
    assert [s.certificate.subject for s in sums] == ["device-0002", "device-0003"]
    assert open_dict(()) == ()


def test_swapped_ephemeral_key_in_sum_dict_is_bad_signature() -> None:
    entry = bytearray(sum_message())
    entry[-32:] = bytes([0x66]) * 32  # the coordinator puts in a key it controls
    assert dict_reason((bytes(entry),)) == Reason.BAD_SIGNATURE


def test_sum_entry_resigned_by_the_coordinator_is_rejected() -> None:
    # the coordinator signs a Sum itself with the summer's certificate attached
    entry = bytearray(sum_message())
    header = bytearray(entry[:HEADER_SIZE])
    header[16:48] = COORDINATOR.public_key
    signature = COORDINATOR.signing_key.sign(b"maskfl/v1/message\x00" + bytes(header)).signature
    resigned = bytes(header) + signature + bytes(entry[BODY_OFFSET:])
    assert dict_reason((resigned,)) == Reason.UNENROLLED
    # ... or with its own certificate
    own = sign(Sum(COORDINATOR.certificate, EPHEMERAL_PK), COORDINATOR)
    assert dict_reason((own,)) == Reason.WRONG_ROLE


def test_sum_dict_duplicates_other_rounds_and_revoked_summers() -> None:
    assert dict_reason((sum_message(), sum_message())) == Reason.DUPLICATE
    old = sign(Sum(SUMMER.certificate, EPHEMERAL_PK), SUMMER, round_id=ROUND - 1)
    assert dict_reason((old,)) == Reason.WRONG_ROUND
    update = update_raw()
    assert dict_reason((update[:MAX_SUM_SIZE],)) != Reason.DUPLICATE
    revoked = revocations(SUMMER.certificate.serial)
    assert dict_reason((sum_message(),), revocations=revoked) == Reason.REVOKED
    assert dict_reason((b"",)) == Reason.MALFORMED


def test_sum_dict_entry_of_another_type_is_wrong_phase() -> None:
    heartbeat = sign(Heartbeat(SUMMER.certificate, "idle", 1.0), SUMMER)
    assert dict_reason((heartbeat,)) == Reason.WRONG_PHASE


# --- encoding errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        Sum(DEVICE.certificate, bytes(31)),
        Update(DEVICE.certificate, {bytes(32): bytes(79)}, np.zeros(2, np.uint32)),
        Update(DEVICE.certificate, {}, np.zeros(2, np.int32)),
        Update(DEVICE.certificate, {}, np.zeros((2, 2), np.uint32)),
        Update(DEVICE.certificate, {}, np.zeros(2, np.uint16)),
        Receipt(bytes(32), MessageType.SUM, True, Reason.MALFORMED),
        Receipt(bytes(32), MessageType.SUM, False, None),
        Heartbeat(DEVICE.certificate, "idle", float("nan")),
        Heartbeat(DEVICE.certificate, "x" * 65, 1.0),
        GlobalModel("m", 1, ROUND, bytes(32), np.zeros(2, np.float64)),
        GlobalModel("m", 1, ROUND, bytes(32), np.zeros(2, np.float32), (("a", 1), ("a", 2))),
        GlobalModel("bad id", 1, ROUND, bytes(32), np.zeros(2, np.float32)),
        SumDict((b"x" * (MAX_SUM_SIZE + 1),)),
    ],
)
def test_encoding_invalid_bodies_is_a_local_error(body: Body) -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(body, fleet=FLEET, round_id=ROUND, signing_key=DEVICE.signing_key)


def test_encoding_checks_fleet_round_and_certificate() -> None:
    body = Sum(DEVICE.certificate, EPHEMERAL_PK)
    key = DEVICE.signing_key
    with pytest.raises(LocalProtocolError):
        encode_message(body, fleet="no/slash", round_id=1, signing_key=key)
    with pytest.raises(LocalProtocolError):
        encode_message(body, fleet=FLEET, round_id=-1, signing_key=key)
    with pytest.raises(LocalProtocolError):
        encode_message(body, fleet=FLEET, round_id=1, signing_key=SUMMER.signing_key)
    params = dataclasses.replace(round_params(), p_sum=1.5)
    with pytest.raises(LocalProtocolError):
        encode_message(params, fleet=FLEET, round_id=ROUND, signing_key=COORDINATOR.signing_key)


def test_round_params_and_global_model_round_must_match_header() -> None:
    raw = sign(round_params(), COORDINATOR, round_id=ROUND + 1)
    reject(raw, Reason.MALFORMED)


def test_big_endian_and_strided_words_are_encoded_little_endian() -> None:
    words = np.arange(10, dtype=">u4")[::2]
    raw = sign(Update(DEVICE.certificate, {}, words), DEVICE)
    decoded = decode_message(raw, max_size=MAX).body
    assert isinstance(decoded, Update)
    np.testing.assert_array_equal(decoded.words, [0, 2, 4, 6, 8])
    assert raw[-20:] == np.array([0, 2, 4, 6, 8], "<u4").tobytes()


def test_round_seed_chain_is_auditable() -> None:
    params = round_params()
    assert not params.seed_is_chained
    seed = next_round_seed(params.previous_seed, params.model_digest, params.round_id)
    assert dataclasses.replace(params, seed=seed).seed_is_chained


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("summers", [0, 1, 7])
def test_max_masked_size_bounds_real_messages(dtype: type, summers: int) -> None:
    seeds = {bytes([i]) * 32: bytes(80) for i in range(summers)}
    words = np.zeros(11, dtype)
    raw = sign(Update(DEVICE.certificate, seeds, words), DEVICE)
    bound = max_masked_size(11, words.itemsize * 8, seeds=summers)
    assert len(raw) <= bound < len(raw) + 256
    decode_message(raw, max_size=bound)
    failed = max_masked_size(11, words.itemsize * 8, failed=summers)
    sum2 = sign(Sum2(SUMMER.certificate, words, tuple(seeds)), SUMMER)
    assert len(sum2) <= failed < len(sum2) + 256
    assert max_masked_size(11, words.itemsize * 8, seeds=summers, failed=summers) == bound


def test_long_receipt_details_are_cut_not_refused() -> None:
    detail = "é" * 1000  # 2000 bytes of UTF-8
    raw = sign(Receipt(bytes(32), MessageType.SUM, False, Reason.MALFORMED, detail), COORDINATOR)
    body = decode_message(raw, max_size=MAX).body
    assert isinstance(body, Receipt)
    assert body.detail == "é" * 512


def test_check_words_against_round_params() -> None:
    params = round_params()  # M = 4, 32-bit words: M + 1 + 3 evaluation words
    params.check_words(np.zeros(8, np.uint32))
    for words in (np.zeros(5, np.uint32), np.zeros(9, np.uint32), np.zeros(8, np.uint64)):
        with pytest.raises(RemoteProtocolError) as info:
            params.check_words(words)
        assert info.value.reason == Reason.WRONG_LENGTH
