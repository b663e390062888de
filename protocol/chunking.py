"""Splitting large payloads into chunk frames (:mod:`.reassembly` puts them back together).

MQTT brokers (managed ones above all) cap the packet size, so a payload longer
than the chunk size travels as several *chunk frames*, each at most
``chunk_size`` bytes. A frame is a 44-byte header and a slice of the payload::

    offset size field
     0      4   magic b"MFLC"
     4      1   format version (1)
     5      3   reserved, zero
     8     16   message id = SHA-256(whole payload)[:16]
    24      8   total payload length, u64
    32      4   part size (payload bytes in every frame but the last), u32
    36      4   index, u32, 0-based
    40      4   count, u32 = ceil(total / part size)
    44      …   the payload bytes [index·part size, min(total, (index+1)·part size))

Frames are not signed: the reassembled payload is a signed message that the
receiver verifies anyway, and the message id (a hash of the payload) makes a
corrupted or mixed-up frame fail reassembly instead of producing a wrong message.

A frame is parsed and checked on its own by :class:`ChunkFrame`; joining frames
into messages, bounded, is :class:`maskfl.protocol.reassembly.Reassembler`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

__all__ = [
    "CHUNK_HEADER_SIZE",
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "ChunkFrame",
    "is_chunk",
    "iter_frames",
    "message_id",
    "split_payload",
]

CHUNK_MAGIC: Final = b"MFLC"
CHUNK_VERSION: Final = 1
CHUNK_HEADER_SIZE: Final = 44
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
MIN_CHUNK_SIZE: Final = CHUNK_HEADER_SIZE + 20
"""The smallest frame size that still carries payload (tests use small sizes)."""

_HEADER = struct.Struct("<4sB3s16sQIII")
assert _HEADER.size == CHUNK_HEADER_SIZE


def message_id(payload: bytes | memoryview) -> bytes:
    """The 16-byte id of a payload: the first half of its SHA-256."""
    return hashlib.sha256(payload).digest()[:16]


def is_chunk(data: bytes | memoryview) -> bool:
    """True when ``data`` starts like a chunk frame (and so is not a whole message)."""
    return bytes(data[:4]) == CHUNK_MAGIC


def split_payload(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """``[payload]`` when it fits in ``chunk_size`` bytes, else frames of at most that size."""
    return list(iter_frames(payload, chunk_size))


def iter_frames(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """The frames of :func:`split_payload` one at a time, so a sender of a large payload
    holds one frame more than the payload, not a second copy of it (checks first)."""
    if chunk_size < MIN_CHUNK_SIZE or chunk_size > 2**32 - 1 + CHUNK_HEADER_SIZE:
        raise LocalProtocolError(
            f"chunk size {chunk_size} is outside [{MIN_CHUNK_SIZE}, 2^32 + {CHUNK_HEADER_SIZE})"
        )
    total = len(payload)
    if total <= chunk_size:
        return iter([payload])
    part = chunk_size - CHUNK_HEADER_SIZE
    count = -(-total // part)
    if count > 2**32 - 1:
        raise LocalProtocolError(f"{total} bytes need more than 2^32 frames of {part}")
    return _frames(payload, total, part, count)


def _frames(payload: bytes, total: int, part: int, count: int) -> Iterator[bytes]:
    ident = message_id(payload)
    view = memoryview(payload)
    for index in range(count):
        header = _HEADER.pack(
            CHUNK_MAGIC, CHUNK_VERSION, bytes(3), ident, total, part, index, count
        )
        yield header + view[index * part : (index + 1) * part]


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """A parsed chunk frame header; ``data`` views the frame's payload bytes."""

    message_id: bytes
    total: int
    part_size: int
    index: int
    count: int
    data: memoryview

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> ChunkFrame:
        """Parse and check one frame's own consistency (MALFORMED otherwise)."""
        view = memoryview(frame).cast("B")
        if len(view) < CHUNK_HEADER_SIZE:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk frame of {len(view)} bytes")
        magic, version, reserved, ident, total, part, index, count = _HEADER.unpack_from(view)
        if magic != CHUNK_MAGIC:
            raise RemoteProtocolError(Reason.MALFORMED, "not a chunk frame")
        if version != CHUNK_VERSION:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk format {version} is not supported")
        if reserved != bytes(3):
            raise RemoteProtocolError(Reason.MALFORMED, "chunk reserved bytes are not zero")
        if part == 0 or total == 0:
            raise RemoteProtocolError(Reason.MALFORMED, "chunk part size or total is zero")
        if count != -(-total // part):
            raise RemoteProtocolError(
                Reason.MALFORMED, f"chunk count {count} does not match {total} / {part}"
            )
        if index >= count:
            raise RemoteProtocolError(Reason.MALFORMED, f"chunk index {index} of {count}")
        expected = min(part, total - index * part)
        data = view[CHUNK_HEADER_SIZE:]
        if len(data) != expected:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"chunk {index} of {count} carries {len(data)} bytes, expected {expected}",
            )
        return cls(ident, total, part, index, count, data)
