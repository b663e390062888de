"""The hex vectors in docs/wire-format.md and vectors/wire.json, byte for byte.

If a change to the encoders makes these fail, the wire format changed: bump the
format version, regenerate with ``python -m tests.protocol.wire_samples`` (and
``--json``), and say so in the docs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from maskfl.protocol.identity import Certificate, RevocationList
from maskfl.protocol.messages import Update, decode_message, verify_sender
from maskfl.protocol.reassembly import Reassembler
from tests.protocol.wire_samples import (
    CA_PUBLIC,
    COORDINATOR,
    DEVICE,
    FLEET,
    NOW,
    annotated_update,
    vectors,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "wire-format.md"
JSON = Path(__file__).parent / "vectors" / "wire.json"
EXPECTED = vectors()


def doc_vectors() -> dict[str, bytes]:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"#### `(\w+)` \((\d+) bytes\)\n\n```\n([0-9a-f\n]*)```", text)
    out = {}
    for name, size, hexed in blocks:
        raw = bytes.fromhex(hexed.replace("\n", ""))
        assert len(raw) == int(size), name
        out[name] = raw
    return out


def test_doc_has_every_vector() -> None:
    assert list(doc_vectors()) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_doc_vector(name: str) -> None:
    assert doc_vectors()[name].hex() == EXPECTED[name].hex()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_json_vector(name: str) -> None:
    stored = json.loads(JSON.read_text(encoding="utf-8"))
    assert list(stored) == list(EXPECTED)
    assert stored[name] == EXPECTED[name].hex()


def test_annotated_update_in_doc() -> None:
    text = DOC.read_text(encoding="utf-8")
    block = text.split("field by field (offset, bytes, field):\n\n```\n", 1)[1].split("```", 1)[0]
    hexed = "".join(line.strip() for line in block.splitlines() if line.startswith("      "))
    assert hexed == EXPECTED["message_update"].hex()
    offsets = [int(line.split()[0]) for line in block.splitlines() if not line.startswith(" " * 6)]
    assert offsets == [offset for offset, _, _ in annotated_update()]


def test_vectors_decode_and_verify() -> None:
    for name, raw in EXPECTED.items():
        if name.startswith("message_"):
            message = decode_message(raw, max_size=4096)
            verify_sender(
                message,
                ca_public_key=CA_PUBLIC,
                fleet=FLEET,
                now=NOW,
                revocations=None,
                certificate=COORDINATOR.certificate,
            )
    assert Certificate.from_bytes(EXPECTED["certificate"]) == DEVICE.certificate
    crl = RevocationList.from_bytes(EXPECTED["revocation_list"])
    crl.verify(ca_public_key=CA_PUBLIC, fleet=FLEET)
    assert crl.serials == (5, 9)
    update = decode_message(EXPECTED["message_update"], max_size=4096).body
    assert isinstance(update, Update)
    np.testing.assert_array_equal(update.words, [1, 2, 0xFFFFFFFF, 0x80000000, 500])
    r: Reassembler[None] = Reassembler(4, 1000, 1.0)
    frames = [EXPECTED[f"chunk_{i}"] for i in range(3)]
    outs = [r.feed("t", f, 0.0) for f in frames]
    assert outs[:2] == [None, None] and outs[2] is not None and outs[2].payload == bytes(range(100))
