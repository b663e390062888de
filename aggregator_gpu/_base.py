"""What every backend shares: the interface, input coercion, snapshots and decoding.

The coordinator holds exactly one :class:`Accumulator` per round. Masked update
vectors (``uint32``/``uint64`` words, the weight as the last word) are added to it
as they are accepted; partial aggregates from other ingest workers can be merged;
the coordinator checkpoints it with :meth:`Accumulator.snapshot`; after sum2 it
subtracts the winning aggregate mask once and decodes. Addition is modulo ``2^w``
and therefore associative and commutative, which is why every backend, whatever
order it adds in, produces the same words bit for bit.
"""

from __future__ import annotations

import abc
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from maskfl.protocol.errors import AggregationError
from maskfl.protocol.masking import MaskConfig, decode_aggregate

Words: TypeAlias = npt.NDArray[np.unsignedinteger]
"""A 1-D array of ``uint32`` or ``uint64`` words (host memory)."""

WordsLike: TypeAlias = "bytes | bytearray | memoryview | npt.NDArray[np.unsignedinteger]"
"""One vector of words: raw little-endian bytes (read in place) or an array."""

WORD_BITS = (32, 64)


class BackendName(StrEnum):
    """Which implementation adds the vectors; ``auto`` picks CuPy when a GPU works."""

    AUTO = "auto"
    NUMPY = "numpy"
    CUPY = "cupy"


class BackendUnavailableError(AggregationError):
    """The requested backend cannot run here (CuPy missing, no device, kernel failed)."""


class MaskVoteTieError(AggregationError):
    """Two or more different sum2 masks share the top vote count; none can be trusted.

    ``tally`` maps each mask digest to its votes, highest first.
    """

    def __init__(self, message: str, *, tally: dict[bytes, int]) -> None:
        super().__init__(message)
        self.tally = tally


def word_dtype(word_bits: int) -> np.dtype[np.unsignedinteger]:
    """The little-endian numpy dtype of a word, checking the width."""
    match word_bits:
        case 32:
            return np.dtype("<u4")
        case 64:
            return np.dtype("<u8")
        case _:
            raise AggregationError(f"word size must be 32 or 64 bits, not {word_bits}")


def check_length(length: int) -> int:
    """A vector length must be a positive int (it is M + 1: the weight rides along)."""
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
        raise AggregationError(f"vector length must be a positive integer, not {length!r}")
    return int(length)


def as_words(data: WordsLike, length: int, dtype: np.dtype[np.unsignedinteger]) -> Words:
    """View ``data`` as ``length`` words of ``dtype`` without copying.

    Bytes-like input (``bytes``, ``bytearray``, ``memoryview``, e.g. a slice of a
    received message) is read in place with :func:`numpy.frombuffer`, as
    little-endian words. Arrays must already have exactly the right dtype and
    shape: silently casting an ``int64`` or ``float`` array would corrupt the sum.
    Misaligned buffers are accepted (numpy handles them, at about half speed);
    the wire format aligns the words, so they do not occur in practice.

    Raises :class:`AggregationError` naming what is wrong; nothing is modified.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != dtype:
            raise AggregationError(
                f"expected {dtype.name} words, got an array of {data.dtype.name}"
            )
        if data.ndim != 1 or data.shape[0] != length:
            raise AggregationError(f"expected {length} words, got an array of shape {data.shape}")
        return data
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise AggregationError(
            f"expected bytes, memoryview or a numpy array, got {type(data).__name__}"
        ) from exc
    expected = length * dtype.itemsize
    if view.nbytes != expected:
        raise AggregationError(
            f"expected {expected} bytes ({length} words of {dtype.itemsize * 8} bits), "
            f"got {view.nbytes}"
        )
    if not view.c_contiguous:
        raise AggregationError("a bytes-like vector must be contiguous")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return np.frombuffer(view, dtype=dtype, count=length)


def iter_rows(batch: Iterable[WordsLike] | Words) -> Iterable[WordsLike]:
    """The vectors of a batch: the rows of a 2-D array, or the items of an iterable."""
    if isinstance(batch, np.ndarray):
        if batch.ndim != 2:
            raise AggregationError(
                f"a batch array must be 2-D (vectors x words), got shape {batch.shape}"
            )
        return iter(batch)
    return batch


_SNAPSHOT_MAGIC = b"MFLA"
_SNAPSHOT_VERSION = 1
# magic, version, word bits, flags, reserved, vector count, length (words)
_SNAPSHOT_HEADER = struct.Struct("<4sBBBBQQ")
_FLAG_UNMASKED = 0x01
_DIGEST_SIZE = 32


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A host copy of an accumulator: its words, how many vectors they hold, its state.

    ``to_bytes()`` gives a self-checking file image (header, the words, then a
    SHA-256 over both) for the coordinator's atomic checkpoint; ``from_bytes()``
    refuses anything truncated, corrupted or of another version.
    """

    words: Words
    count: int
    unmasked: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.words, np.ndarray) or self.words.ndim != 1 or not self.words.size:
            raise AggregationError("snapshot words must be a non-empty 1-D array")
        word_dtype(self.words.dtype.itemsize * 8)
        if self.words.dtype.kind != "u":
            raise AggregationError(f"snapshot words must be unsigned, not {self.words.dtype}")
        if self.count < 0:
            raise AggregationError(f"snapshot count must be >= 0, not {self.count}")

    @property
    def length(self) -> int:
        return int(self.words.shape[0])

    @property
    def word_bits(self) -> int:
        return int(self.words.dtype.itemsize * 8)

    def to_bytes(self) -> bytes:
        """Header, words (little-endian, 8-byte aligned after the header), SHA-256."""
        return b"".join(self.parts())

    def parts(self) -> list[bytes | memoryview]:
        """:meth:`to_bytes` as its three parts, the words a view (no copy of them)."""
        header = _SNAPSHOT_HEADER.pack(
            _SNAPSHOT_MAGIC,
            _SNAPSHOT_VERSION,
            self.word_bits,
            _FLAG_UNMASKED if self.unmasked else 0,
            0,
            self.count,
            self.length,
        )
        body = np.ascontiguousarray(self.words, dtype=word_dtype(self.word_bits))
        words = body.data.cast("B")
        digest = hashlib.sha256(header)
        digest.update(words)
        return [header, words, digest.digest()]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Snapshot:
        """Parse and verify a snapshot image; the words are copied out of ``data``."""
        view = memoryview(data).cast("B")
        if view.nbytes < _SNAPSHOT_HEADER.size + _DIGEST_SIZE:
            raise AggregationError(f"snapshot too short: {view.nbytes} bytes")
        magic, version, word_bits, flags, _, count, length = _SNAPSHOT_HEADER.unpack_from(view)
        if magic != _SNAPSHOT_MAGIC:
            raise AggregationError("not an aggregate snapshot (bad magic)")
        if version != _SNAPSHOT_VERSION:
            raise AggregationError(f"snapshot version {version} is not supported")
        dtype = word_dtype(word_bits)
        if flags & ~_FLAG_UNMASKED:
            raise AggregationError(f"unknown snapshot flags {flags:#x}")
        expected = _SNAPSHOT_HEADER.size + length * dtype.itemsize + _DIGEST_SIZE
        if length < 1 or view.nbytes != expected:
            raise AggregationError(
                f"snapshot size {view.nbytes} does not match its header ({expected} bytes)"
            )
        if hashlib.sha256(view[:-_DIGEST_SIZE]).digest() != bytes(view[-_DIGEST_SIZE:]):
            raise AggregationError("snapshot digest mismatch: the file is corrupted")
        words = np.frombuffer(view, dtype=dtype, count=length, offset=_SNAPSHOT_HEADER.size)
        return cls(words=words.copy(), count=count, unmasked=bool(flags & _FLAG_UNMASKED))


class Accumulator(Protocol):
    """The running sum of masked vectors of one round, on some device.

    Words wrap modulo ``2^word_bits``. Every method either completes or raises
    :class:`AggregationError` leaving the sum and the count as they were (a
    rejected vector is never half-added).
    """

    @property
    def backend(self) -> BackendName: ...

    @property
    def length(self) -> int:
        """Words per vector (M + 1: the weight is the last word)."""
        ...

    @property
    def word_bits(self) -> int: ...

    @property
    def count(self) -> int:
        """How many vectors the sum holds (merged snapshots count theirs)."""
        ...

    @property
    def unmasked(self) -> bool:
        """True once the aggregate mask has been subtracted; no more adds then."""
        ...

    def add(self, vector: WordsLike) -> None:
        """Add one masked vector (bytes read in place, or an array of the word dtype)."""
        ...

    def add_batch(self, vectors: Iterable[WordsLike] | Words) -> int:
        """Add several vectors (an iterable, or a 2-D array of rows); returns how many.

        All vectors are validated before the first is added, so a bad one leaves
        the sum untouched.
        """
        ...

    def retract(self, vector: WordsLike) -> None:
        """Take back one vector that was added (e.g. an update whose seed no summer opened).

        The caller must pass exactly the words it added; the count drops by one.
        """
        ...

    def merge(self, snapshot: Snapshot) -> None:
        """Add a partial aggregate (another worker's snapshot) and its count."""
        ...

    def total(self) -> Words:
        """A host copy of the current sum."""
        ...

    def subtract_mask(self, mask: WordsLike) -> None:
        """Subtract the winning aggregate mask, once; the sum is then the plain sum."""
        ...

    def decode(
        self, config: MaskConfig, n_included: int | None = None
    ) -> tuple[npt.NDArray[np.float64], float]:
        """The weighted sum of the deltas and the sum of the weights (protocol decoding).

        ``n_included`` defaults to :attr:`count`.
        """
        ...

    def plain(self) -> Words:
        """The unmasked sum in host memory, to decode in slices: the live buffer on
        the CPU (no copy; read it, do not keep it), a host copy from a GPU."""
        ...

    def snapshot(self) -> Snapshot:
        """A host copy for checkpointing; restore it with ``Backend.restore``."""
        ...

    def checkpoint_image(self) -> list[bytes | memoryview]:
        """:meth:`snapshot`'s ``to_bytes()`` in parts, viewing the live sum where it is
        in host memory (no copy of the model's size): write it before the sum changes."""
        ...


class Backend(Protocol):
    """Makes accumulators on one kind of device."""

    @property
    def name(self) -> BackendName: ...

    @property
    def description(self) -> str:
        """What runs the arithmetic, for logs (``numpy 2.4 on the CPU``, a GPU's name)."""
        ...

    def accumulator(self, length: int, word_bits: int) -> Accumulator:
        """An empty sum of ``length`` words of ``word_bits`` bits."""
        ...

    def restore(self, snapshot: Snapshot) -> Accumulator:
        """An accumulator holding exactly what ``snapshot`` holds."""
        ...


class AccumulatorState(abc.ABC):
    """The bookkeeping every :class:`Accumulator` shares: shape, count, masked or not.

    Backends subclass it and keep the words wherever they live; the sum, the count
    and the unmasked flag change only in the subclass, after its arithmetic worked.
    """

    def __init__(self, length: int, word_bits: int) -> None:
        self._dtype = word_dtype(word_bits)
        self._length = check_length(length)
        self._count = 0
        self._unmasked = False

    @property
    def length(self) -> int:
        return self._length

    @property
    def word_bits(self) -> int:
        return self._dtype.itemsize * 8

    @property
    def count(self) -> int:
        return self._count

    @property
    def unmasked(self) -> bool:
        return self._unmasked

    def _check_masked(self, what: str) -> None:
        if self._unmasked:
            raise AggregationError(f"cannot {what}: the aggregate mask was already subtracted")

    @abc.abstractmethod
    def _host_words(self) -> Words:
        """The current sum in host memory; may be the live buffer (read it, do not keep it)."""

    @abc.abstractmethod
    def total(self) -> Words:
        """A host copy of the current sum."""

    def decode(
        self, config: MaskConfig, n_included: int | None = None
    ) -> tuple[npt.NDArray[np.float64], float]:
        return decode_words(
            self._host_words(),
            word_bits=self.word_bits,
            count=self._count,
            unmasked=self._unmasked,
            config=config,
            n_included=n_included,
        )

    def plain(self) -> Words:
        if not self._unmasked:
            raise AggregationError("subtract the aggregate mask before decoding")
        return self._host_words()

    def snapshot(self) -> Snapshot:
        return Snapshot(words=self.total(), count=self._count, unmasked=self._unmasked)

    def checkpoint_image(self) -> list[bytes | memoryview]:
        live = Snapshot(words=self._host_words(), count=self._count, unmasked=self._unmasked)
        return live.parts()


def check_mergeable(length: int, word_bits: int, snapshot: Snapshot) -> None:
    """A snapshot can be merged only into a masked sum of the same shape."""
    if snapshot.word_bits != word_bits or snapshot.length != length:
        raise AggregationError(
            f"cannot merge a snapshot of {snapshot.length} x {snapshot.word_bits}-bit words "
            f"into an accumulator of {length} x {word_bits}-bit words"
        )
    if snapshot.unmasked:
        raise AggregationError("cannot merge an unmasked snapshot: its mask is already gone")


def decode_words(
    words: Words,
    *,
    word_bits: int,
    count: int,
    unmasked: bool,
    config: MaskConfig,
    n_included: int | None,
) -> tuple[npt.NDArray[np.float64], float]:
    """Check the state and hand the plain sum to the protocol's decoder."""
    if not unmasked:
        raise AggregationError("subtract the aggregate mask before decoding")
    if config.word_bits != word_bits:
        raise AggregationError(
            f"config has {config.word_bits}-bit words, the aggregate {word_bits}-bit"
        )
    n = count if n_included is None else n_included
    if n < 1:
        raise AggregationError("nothing to decode: no vectors were added")
    if n > config.n_max:
        raise AggregationError(f"{n} vectors exceed n_max={config.n_max}: the sum may have wrapped")
    return decode_aggregate(words, n, config)
