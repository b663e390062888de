"""Every parser of network bytes, fed random and mutated input.

The contract: a parser returns a value or raises RemoteProtocolError, never
IndexError, struct.error, ValueError, UnicodeDecodeError or MemoryError, and
never hangs. Mutations of a signed message mostly die at the signature, so the
body parsers are also fuzzed through *re-signed* mutations: an enrolled but
malicious sender can sign any body it likes.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from maskfl.protocol.chunking import ChunkFrame, split_payload
from maskfl.protocol.errors import RemoteProtocolError
from maskfl.protocol.identity import Certificate, RevocationList
from maskfl.protocol.messages import (
    BODY_OFFSET,
    FORMAT_VERSION,
    HEADER_SIZE,
    MESSAGE_DOMAIN,
    Header,
    MessageType,
    decode_message,
)
from maskfl.protocol.reassembly import Reassembler
from maskfl.protocol.topics import parse_topic
from tests.protocol.wire_samples import DEVICE, FLEET, ROUND, bodies, revocations, sign

MAX = 1 << 20
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES = {name: (sign(body, ident), ident) for name, (body, ident) in bodies().items()}
NAMES = sorted(SAMPLES)


def resign(message_type: MessageType, body: bytes, key: SigningKey = DEVICE.signing_key) -> bytes:
    """A correctly signed message around an arbitrary body."""
    header = Header(
        message_type,
        FLEET,  # type: ignore[arg-type]
        ROUND,
        bytes(key.verify_key),
        len(body),
        hashlib.sha256(body).digest(),
    ).to_bytes()
    return header + key.sign(MESSAGE_DOMAIN + header).signature + body


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """Bit flips, byte overwrites, truncation, extension, splices and length-field edits."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "splice", "length"]))
        if kind == "flip" and data:
            bit = draw(st.integers(0, len(data) * 8 - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "splice" and data:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(data) >= 8:
            # overwrite an aligned-or-not 1/2/4/8-byte field with a boundary value
            width, fmt = draw(st.sampled_from([(1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q")]))
            at = draw(st.integers(0, len(data) - width))
            value = draw(
                st.sampled_from([0, 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1), len(data)])
            )
            struct.pack_into(fmt, data, at, value % 2 ** (8 * width))
    return bytes(data)


def decode_or_reject(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(data, max_size=MAX)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_decode_random_bytes(data: bytes) -> None:
    decode_or_reject(data)


@FUZZ
@given(data=st.binary(max_size=600))
def test_decode_random_bytes_behind_a_valid_magic(data: bytes) -> None:
    decode_or_reject(b"MFLM\x02" + data)


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_decode_mutated_messages(name: str, data: st.DataObject) -> None:
    raw, _ = SAMPLES[name]
    decode_or_reject(data.draw(mutated(raw)))


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_decode_resigned_mutated_bodies(name: str, data: st.DataObject) -> None:
    raw, ident = SAMPLES[name]
    message_type = MessageType(raw[5])
    body = data.draw(mutated(raw[BODY_OFFSET:]))
    decode_or_reject(resign(message_type, body, ident.signing_key))


@FUZZ
@given(message_type=st.sampled_from(MessageType), body=st.binary(max_size=700))
def test_decode_resigned_random_bodies(message_type: MessageType, body: bytes) -> None:
    decode_or_reject(resign(message_type, body))


def test_huge_length_fields_do_not_allocate() -> None:
    """Counts of 2^32 or 2^64 elements in a tiny body are refused before any allocation."""
    cert = DEVICE.certificate.to_bytes()
    prefix = struct.pack("<H", len(cert)) + cert
    cases = [
        (MessageType.UPDATE, prefix + struct.pack("<I", 2**32 - 1)),
        (MessageType.UPDATE, prefix + struct.pack("<IBQ", 0, 64, 2**64 - 1)),
        (MessageType.UPDATE, prefix + struct.pack("<IBQ", 0, 32, 2**61)),
        (MessageType.SUM2, prefix + struct.pack("<I", 2**32 - 1)),
        (MessageType.SUM_DICT, struct.pack("<I", 2**32 - 1)),
        (MessageType.SEED_DICT, bytes(32) + struct.pack("<I", 2**32 - 1)),
        (MessageType.GLOBAL_MODEL, b"\x01m" + bytes(48) + struct.pack("<HQ", 0, 2**63)),
    ]
    for message_type, body in cases:
        with pytest.raises(RemoteProtocolError):
            decode_message(resign(message_type, body), max_size=MAX)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), mutated(DEVICE.certificate.to_bytes())))
def test_certificate_parser(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        Certificate.from_bytes(data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), mutated(revocations(1, 5, 9).to_bytes())))
def test_revocation_list_parser(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        RevocationList.from_bytes(data)


FRAMES = split_payload(bytes(range(256)) * 2, 100)


@FUZZ
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(FRAMES),
            st.sampled_from(FRAMES).flatmap(mutated),
        ),
        max_size=20,
    )
)
def test_chunk_parser_and_reassembler(frames: list[bytes]) -> None:
    r: Reassembler[None] = Reassembler(max_messages=2, max_bytes=2000, max_age_s=5.0)
    for i, frame in enumerate(frames):
        with contextlib.suppress(RemoteProtocolError):
            ChunkFrame.parse(frame)
        try:
            out = r.feed(i % 2, frame, float(i))
        except RemoteProtocolError:
            continue
        if out is not None:
            assert out.payload == bytes(range(256)) * 2  # the id is a hash: nothing else completes
        assert r.reserved_bytes <= 2000


@FUZZ
@given(
    topic=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
        mutated(b"maskfl/v1/demo/round/7/update/device-0001").map(lambda b: b.decode("latin-1")),
    )
)
def test_topic_parser(topic: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_topic(topic)


def test_header_offsets_are_what_the_docs_say() -> None:
    raw, ident = SAMPLES["update"]
    assert raw[:4] == b"MFLM"
    assert raw[4] == FORMAT_VERSION == 2
    assert raw[5] == MessageType.UPDATE
    assert raw[6] == len(FLEET)
    assert struct.unpack_from("<Q", raw, 8)[0] == ROUND
    assert raw[16:48] == ident.public_key
    assert struct.unpack_from("<Q", raw, 48)[0] == len(raw) - BODY_OFFSET
    assert raw[56:88] == hashlib.sha256(raw[BODY_OFFSET:]).digest()
    assert raw[88:HEADER_SIZE].rstrip(b"\x00") == FLEET.encode()
