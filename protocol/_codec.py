"""Bounds-checked little-endian encoding shared by the wire formats.

Every parser of untrusted bytes reads through :class:`Reader`, which checks each
length against the bytes that remain *before* it slices or allocates, and turns
every shortfall into ``RemoteProtocolError(MALFORMED)``. Nothing else (no
``IndexError``, ``struct.error``, ``UnicodeDecodeError``) can leave it.
:class:`Writer` is the mirror image used by the encoders.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Fleet, device, subject and model ids: what fits an MQTT topic level and a file name."""

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

U64_MAX: Final = 2**64 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1


def is_valid_id(value: str) -> bool:
    """True when ``value`` matches ``[A-Za-z0-9_-]{1,64}``."""
    return ID_PATTERN.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """Return ``value`` or raise LocalProtocolError: for ids we are about to *send*."""
    if not isinstance(value, str) or not is_valid_id(value):
        raise LocalProtocolError(f"{what} {value!r} is not [A-Za-z0-9_-]{{1,64}}")
    return value


def malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED, message)


class Reader:
    """Reads fields from ``buf[offset:]``; raises MALFORMED on any shortfall.

    ``buf`` is a read-only memoryview; :meth:`fixed` returns ``bytes`` copies of
    small fields, :meth:`words` returns a zero-copy numpy view.
    """

    __slots__ = ("_buf", "_end", "pos")

    def __init__(self, buf: memoryview, offset: int = 0, end: int | None = None) -> None:
        self._buf = buf
        self.pos = offset
        self._end = len(buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def _take(self, n: int, what: str) -> int:
        if n < 0 or n > self._end - self.pos:
            raise malformed(f"{what}: needs {n} bytes, {self._end - self.pos} left")
        start = self.pos
        self.pos += n
        return start

    def u8(self, what: str) -> int:
        value: int = _U8.unpack_from(self._buf, self._take(1, what))[0]
        return value

    def u16(self, what: str) -> int:
        value: int = _U16.unpack_from(self._buf, self._take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self._buf, self._take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self._buf, self._take(8, what))[0]
        return value

    def i64(self, what: str) -> int:
        value: int = _I64.unpack_from(self._buf, self._take(8, what))[0]
        return value

    def f64(self, what: str, *, finite: bool = True) -> float:
        value: float = _F64.unpack_from(self._buf, self._take(8, what))[0]
        if finite and not math.isfinite(value):
            raise malformed(f"{what}: {value} is not finite")
        return value

    def fixed(self, n: int, what: str) -> bytes:
        start = self._take(n, what)
        return bytes(self._buf[start : start + n])

    def view(self, n: int, what: str) -> memoryview:
        start = self._take(n, what)
        return self._buf[start : start + n]

    def bool(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise malformed(f"{what}: {value} is not 0 or 1")
        return value == 1

    def zeros(self, n: int, what: str) -> None:
        start = self._take(n, what)
        if any(self._buf[start : start + n]):
            raise malformed(f"{what}: reserved bytes are not zero")

    def text(self, what: str, *, max_len: int, prefix: int = 1) -> str:
        """A UTF-8 string behind a u8 (``prefix=1``) or u16 (``prefix=2``) byte count."""
        n = self.u8(what) if prefix == 1 else self.u16(what)
        if n > max_len:
            raise malformed(f"{what}: {n} bytes, at most {max_len}")
        raw = self.view(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise malformed(f"{what}: not UTF-8") from exc

    def ident(self, what: str) -> str:
        """An id (``[A-Za-z0-9_-]{1,64}``) behind a u8 byte count."""
        value = self.text(what, max_len=64)
        if not is_valid_id(value):
            raise malformed(f"{what}: {value!r} is not [A-Za-z0-9_-]{{1,64}}")
        return value

    def align(self, alignment: int, absolute_offset: int, what: str) -> None:
        """Skip the zero padding up to the next multiple of ``alignment``.

        ``absolute_offset`` is where this reader's buffer starts inside the whole
        message, so the alignment is that of the message, not of the body.
        """
        pad = -(absolute_offset + self.pos) % alignment
        self.zeros(pad, what)

    def words(self, dtype: npt.DTypeLike, count: int, what: str) -> npt.NDArray[Any]:
        """``count`` little-endian elements as a read-only zero-copy view."""
        dt = np.dtype(dtype)
        if count < 0 or count > self.remaining // dt.itemsize:
            raise malformed(f"{what}: {count} elements do not fit in {self.remaining} bytes")
        start = self._take(count * dt.itemsize, what)
        return np.frombuffer(self._buf, dtype=dt, count=count, offset=start)

    def end(self, what: str) -> None:
        if self.pos != self._end:
            raise malformed(f"{what}: {self._end - self.pos} trailing bytes")


class Writer:
    """Accumulates little-endian fields; large arrays are appended by reference."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def raw(self, data: bytes | memoryview) -> None:
        self._parts.append(data)
        self._size += len(data) if isinstance(data, bytes) else data.nbytes

    def u8(self, value: int) -> None:
        self.raw(_U8.pack(value))

    def u16(self, value: int) -> None:
        self.raw(_U16.pack(value))

    def u32(self, value: int) -> None:
        self.raw(_U32.pack(value))

    def u64(self, value: int) -> None:
        self.raw(_U64.pack(value))

    def i64(self, value: int) -> None:
        self.raw(_I64.pack(value))

    def f64(self, value: float) -> None:
        self.raw(_F64.pack(value))

    def fixed(self, data: bytes, n: int, what: str) -> None:
        if len(data) != n:
            raise LocalProtocolError(f"{what} must be {n} bytes, got {len(data)}")
        self.raw(bytes(data))

    def text(self, value: str, what: str, *, max_len: int, prefix: int = 1) -> None:
        raw = value.encode("utf-8")
        if len(raw) > max_len:
            raise LocalProtocolError(f"{what} is {len(raw)} bytes, at most {max_len}")
        if prefix == 1:
            self.u8(len(raw))
        else:
            self.u16(len(raw))
        self.raw(raw)

    def ident(self, value: str, what: str) -> None:
        self.text(check_id(value, what), what, max_len=64)

    def align(self, alignment: int, absolute_offset: int) -> None:
        pad = -(absolute_offset + self._size) % alignment
        if pad:
            self.raw(bytes(pad))

    def words(self, array: npt.NDArray[np.unsignedinteger], dtype: npt.DTypeLike) -> None:
        """Append ``array`` as little-endian ``dtype``; no copy when it already is one."""
        contiguous = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
        self.raw(memoryview(contiguous.data).cast("B"))

    def parts(self) -> list[bytes | memoryview]:
        return self._parts

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
