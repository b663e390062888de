"""Fixed keys, certificates and one message of every type, for tests and wire vectors.

Everything here is deterministic: Ed25519 keys come from fixed 32-byte seeds
and Ed25519 signatures are deterministic, so :func:`vectors` returns the same
bytes on every machine. docs/wire-format.md and tests/protocol/vectors/wire.json
hold those bytes; ``python -m tests.protocol.wire_samples`` prints them.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from nacl.signing import SigningKey

from maskfl.protocol.chunking import split_payload
from maskfl.protocol.errors import Reason
from maskfl.protocol.identity import (
    Certificate,
    Identity,
    RevocationList,
    issue_certificate,
    issue_revocation_list,
)
from maskfl.protocol.ids import Role, RoundId
from maskfl.protocol.masking import MaskConfig
from maskfl.protocol.messages import (
    Body,
    GlobalModel,
    Heartbeat,
    MessageType,
    Receipt,
    RoundParams,
    SeedDict,
    Sum,
    Sum2,
    SumDict,
    Update,
    encode_message,
)
from maskfl.protocol.sortition import group_of

FLEET = "demo"
ROUND = RoundId(7)
NOT_BEFORE = 1_767_225_600  # 2026-01-01T00:00:00Z
NOT_AFTER = 1_798_761_600  # 2027-01-01T00:00:00Z
NOW = 1_780_000_000

CA_SEED = bytes([0xCA]) * 32
COORDINATOR_SEED = bytes([0xC0]) * 32
DEVICE_SEED = bytes([0xD1]) * 32
SUMMER_SEED = bytes([0x51]) * 32

CA_KEY = SigningKey(CA_SEED)
CA_PUBLIC = bytes(CA_KEY.verify_key)


def identity(
    seed: bytes,
    subject: str,
    serial: int,
    role: Role = Role.DEVICE,
    *,
    fleet: str = FLEET,
    not_before: int = NOT_BEFORE,
    not_after: int = NOT_AFTER,
    ca_key: SigningKey = CA_KEY,
) -> Identity:
    key = SigningKey(seed)
    cert = issue_certificate(
        ca_key,
        fleet=fleet,
        serial=serial,
        subject=subject,
        role=role,
        public_key=bytes(key.verify_key),
        not_before=not_before,
        not_after=not_after,
    )
    return Identity(key, cert)


COORDINATOR = identity(COORDINATOR_SEED, "coordinator", 1, Role.COORDINATOR)
DEVICE = identity(DEVICE_SEED, "device-0001", 2)
SUMMER = identity(SUMMER_SEED, "device-0002", 3)

MASK = MaskConfig(1.0, 1000, 32)
M = 4


def revocations(*serials: int, version: int = 1) -> RevocationList:
    return issue_revocation_list(
        CA_KEY, fleet=FLEET, version=version, issued_at=NOW - 10, serials=serials
    )


def sign(body: Body, ident: Identity, round_id: int = ROUND) -> bytes:
    return encode_message(body, fleet=FLEET, round_id=round_id, signing_key=ident.signing_key)


def round_params(cert: Certificate = COORDINATOR.certificate) -> RoundParams:
    return RoundParams(
        round_id=ROUND,
        seed=bytes(range(32)),
        previous_seed=bytes(range(32, 64)),
        p_sum=0.125,
        p_update=0.5,
        sum_time_max_s=30.0,
        update_time_max_s=300.0,
        sum2_time_max_s=60.0,
        model_id="digits-mlp",
        model_version=3,
        model_digest=bytes([0xAB]) * 32,
        mask=MASK,
        vector_length=M,
        chunk_size=262_144,
        certificate=cert,
        groups=2,
    )


EPHEMERAL_PK = bytes([0xE0]) * 32
SEALED = bytes([0x5E]) * 80
UPDATE_DIGEST = bytes([0xDD]) * 32


SUMMER_GROUP = group_of(bytes(range(32)), SUMMER.public_key, 2)
"""The summer's mask group in the sample round (seed 00 01 .. 1f, g = 2)."""


def sum_message() -> bytes:
    return sign(Sum(SUMMER.certificate, EPHEMERAL_PK), SUMMER)


def bodies() -> dict[str, tuple[Body, Identity]]:
    """One body of every type with the identity that sends it."""
    words = np.array([1, 2, 0xFFFFFFFF, 0x80000000, 500], dtype=np.uint32)
    return {
        "round_params": (round_params(), COORDINATOR),
        "sum": (Sum(SUMMER.certificate, EPHEMERAL_PK), SUMMER),
        "sum_dict": (SumDict((sum_message(),), (SUMMER_GROUP,)), COORDINATOR),
        "update": (
            Update(DEVICE.certificate, {SUMMER.public_key: SEALED}, words),
            DEVICE,
        ),
        "seed_dict": (
            SeedDict(SUMMER.public_key, {UPDATE_DIGEST: SEALED}, SUMMER_GROUP),
            COORDINATOR,
        ),
        "sum2": (
            Sum2(
                SUMMER.certificate,
                np.array([9, 8, 7, 6, 5], dtype=np.uint64),
                (bytes([0xF0]) * 32,),
            ),
            SUMMER,
        ),
        "receipt_rejected": (
            Receipt(UPDATE_DIGEST, MessageType.UPDATE, False, Reason.WRONG_ROUND, "round 6"),
            COORDINATOR,
        ),
        "global_model": (
            GlobalModel(
                "digits-mlp",
                4,
                ROUND,
                bytes([0xAB]) * 32,
                np.array([0.5, -1.25, 3.0], dtype=np.float32),
                (("error_bound", 2.5e-06), ("updates", 12.0)),
                bytes([0x6A]) * 32,
            ),
            COORDINATOR,
        ),
        "heartbeat": (Heartbeat(DEVICE.certificate, "idle", 3600.5, 4), DEVICE),
    }


def vectors() -> dict[str, bytes]:
    """The test vectors, by name, in the order docs/wire-format.md shows them."""
    out = {
        "certificate": DEVICE.certificate.to_bytes(),
        "revocation_list": revocations(5, 9).to_bytes(),
    }
    for name, (body, ident) in bodies().items():
        out[f"message_{name}"] = sign(body, ident)
    frames = split_payload(bytes(range(100)), 84)
    for i, frame in enumerate(frames):
        out[f"chunk_{i}"] = frame
    return out


def annotated_update() -> list[tuple[int, bytes, str]]:
    """The UPDATE vector cut into its fields: (offset, bytes, field name)."""
    raw = vectors()["message_update"]
    cert = len(DEVICE.certificate.to_bytes())
    fields = [
        (4, "magic"),
        (1, "format version"),
        (1, "message type (4 = UPDATE)"),
        (1, "fleet length"),
        (1, "reserved"),
        (8, "round id"),
        (32, "sender public key"),
        (8, "body length"),
        (32, "SHA-256 of the body"),
        (64, "fleet, zero padded"),
        (64, "Ed25519 signature of the domain tag and bytes [0, 152)"),
        (2, "certificate length"),
        (cert, "certificate"),
        (4, "sealed seed count"),
        (32, "summer public key"),
        (80, "sealed seed"),
        (1, "word bits"),
        (8, "word count"),
    ]
    out = []
    offset = 0
    for size, name in fields:
        out.append((offset, raw[offset : offset + size], name))
        offset += size
    pad = -offset % 8
    out.append((offset, raw[offset : offset + pad], "padding to a multiple of 8"))
    offset += pad
    out.append((offset, raw[offset:], "words, u32 little-endian"))
    return out


def _main() -> None:
    data = {name: raw.hex() for name, raw in vectors().items()}
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(data, indent=2))
        return
    print("The UPDATE vector, field by field (offset, bytes, field):\n\n```")
    for offset, chunk, name in annotated_update():
        print(f"{offset:4d}  {name}")
        hexed = chunk.hex()
        for i in range(0, len(hexed), 64):
            print(f"      {hexed[i : i + 64]}")
    print("```\n")
    for name, hexed in data.items():
        print(f"#### `{name}` ({len(hexed) // 2} bytes)\n\n```")
        for i in range(0, len(hexed), 64):
            print(hexed[i : i + 64])
        print("```\n")


if __name__ == "__main__":
    _main()
