"""The GPU backend: pinned staging, batched copies on streams, one reduction at the end.

How a vector travels:

1. :meth:`CupyAccumulator.add` copies it (one host memcpy) into the next free
   row of the current *slot*: a pinned host buffer of ``rows`` vectors.
2. When the slot is full it is *launched*: on the slot's own CUDA stream, one
   asynchronous host-to-device copy of the whole block, then one kernel that
   adds all its rows into the slot's own partial sum on the device. The host
   meanwhile fills the next slot, so copies and adds overlap with host work.
   Before a slot's pinned buffer is refilled the host waits for the event
   recorded after its last kernel.
3. :meth:`CupyAccumulator.total` launches the partly filled slot, waits for
   every stream, reduces the partial sums (one per slot, plus a *base* row that
   holds restored snapshots, merges and the subtracted mask) with one kernel and
   copies the result back once.

Because each slot's partial sum is written only by its own stream, streams never
race; because addition modulo ``2^w`` is associative and commutative, the result
is bit-identical to numpy's whatever the order. CuPy is imported lazily: this
module imports without it, and :func:`open_cupy` turns every way CuPy can fail
(not installed, no driver, no device, a kernel that does not compile or gives a
wrong answer) into :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.aggregator_gpu._base import (
    AccumulatorState,
    BackendName,
    BackendUnavailableError,
    Snapshot,
    Words,
    WordsLike,
    as_words,
    check_mergeable,
    iter_rows,
    word_dtype,
)
from maskfl.aggregator_gpu._cuda_source import ADD_ROWS, SOURCE, THREADS_PER_BLOCK, grid_for
from maskfl.protocol.errors import AggregationError

STAGING_BYTES = 32 << 20
"""Target size of one pinned staging slot (rows x length x word size)."""
MAX_ROWS = 64
SLOTS = 3


@dataclass(frozen=True)
class CupyRuntime:
    """A working CuPy: the module, its compiled kernels and the device it found."""

    cp: Any
    module: Any
    device_id: int
    device_name: str
    cupy_version: str

    def kernel(self, name: str) -> Any:
        return self.module.get_function(name)

    def errors(self) -> tuple[type[BaseException], ...]:
        """What a CUDA call can raise once the kernels are compiled.

        CUDARuntimeError and CUDADriverError derive from RuntimeError,
        OutOfMemoryError from MemoryError; all become AggregationError.
        """
        return (RuntimeError, MemoryError, OSError)


_runtime: CupyRuntime | None = None


def open_cupy() -> CupyRuntime:
    """Import CuPy, find a device, compile the kernels and check them; cached once it works.

    Raises :class:`BackendUnavailableError` with the reason otherwise (each call
    retries: a driver can appear after boot).
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    try:
        import cupy as cp
    except ImportError as exc:
        raise BackendUnavailableError(f"cupy is not installed ({exc})") from exc
    except (RuntimeError, OSError) as exc:
        raise BackendUnavailableError(f"cupy failed to import: {exc}") from exc
    try:
        from cupy.cuda.compiler import CompileException
    except ImportError:  # pragma: no cover - every cupy release so far has it
        CompileException = RuntimeError
    try:
        if not cp.cuda.is_available():
            raise BackendUnavailableError("no CUDA device (cupy.cuda.is_available() is False)")
        device_id = int(cp.cuda.runtime.getDevice())
        props = cp.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"]
        device_name = name.decode() if isinstance(name, bytes) else str(name)
        module = cp.RawModule(code=SOURCE)
        runtime = CupyRuntime(cp, module, device_id, device_name, cp.__version__)
        _self_test(runtime)
    except BackendUnavailableError:
        raise
    except (RuntimeError, MemoryError, OSError, ImportError, CompileException) as exc:
        raise BackendUnavailableError(
            f"cupy cannot use the GPU: {type(exc).__name__}: {exc}"
        ) from exc
    _runtime = runtime
    return runtime


def _self_test(runtime: CupyRuntime) -> None:
    """Add a few rows that wrap around on the device and compare with numpy."""
    cp = runtime.cp
    for word_bits in (32, 64):
        dtype = word_dtype(word_bits)
        top = np.iinfo(dtype).max
        rows = np.array([[top, top - 1, 1, 0, top], [1, 2, top, 0, top]] * 3, dtype=dtype)
        expected = np.zeros(rows.shape[1], dtype=dtype)
        for row in rows:
            np.add(expected, row, out=expected)
        acc = cp.zeros(rows.shape[1], dtype=dtype)
        dev_rows = cp.asarray(rows)
        _launch_add_rows(
            runtime, word_bits, dev_rows, k=rows.shape[0], width=rows.shape[1], acc=acc
        )
        got = cp.asnumpy(acc)
        if not np.array_equal(got, expected):
            raise BackendUnavailableError(
                f"the GPU self-test failed for {word_bits}-bit words: {got} != {expected}"
            )


def _launch_add_rows(
    runtime: CupyRuntime, word_bits: int, rows: Any, *, k: int, width: int, acc: Any
) -> None:
    """On the current stream: ``acc += rows[0] + ... + rows[k-1]`` (``rows`` flat, C order)."""
    kernel = runtime.kernel(ADD_ROWS[word_bits])
    kernel(
        (grid_for(width),),
        (THREADS_PER_BLOCK,),
        (rows, np.int64(k), np.int64(width), acc),
    )


class _Slot:
    """One staging buffer: pinned host rows, their device twin, a partial sum, a stream."""

    def __init__(
        self, runtime: CupyRuntime, rows: int, length: int, dtype: np.dtype[Any], partial: Any
    ) -> None:
        import cupyx

        cp = runtime.cp
        self.rows = rows
        self.host: npt.NDArray[Any] = cupyx.empty_pinned((rows, length), dtype=dtype)
        self.device = cp.empty(rows * length, dtype=dtype)
        self.partial = partial
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.done: Any = None  # Event recorded after the last launch on this slot

    def wait(self) -> None:
        """Block until this slot's last copy and kernel have finished."""
        if self.done is not None:
            self.done.synchronize()
            self.done = None


class CupyAccumulator(AccumulatorState):
    """The running sum on the GPU (see the module docstring for the pipeline).

    Invalid input raises :class:`AggregationError` before anything is staged. A
    CUDA failure (lost device, out of memory) also raises it, but leaves this
    accumulator unusable: restore the last snapshot into a new one.
    """

    def __init__(
        self,
        runtime: CupyRuntime,
        length: int,
        word_bits: int,
        *,
        staging_bytes: int = STAGING_BYTES,
        slots: int = SLOTS,
    ) -> None:
        self._rt = runtime
        super().__init__(length, word_bits)
        rows = max(1, min(MAX_ROWS, staging_bytes // (self._length * self._dtype.itemsize)))
        cp = runtime.cp
        try:
            with cp.cuda.Device(runtime.device_id):
                # row i < slots: slot i's partial sum; row `slots`: the base row
                self._partials = cp.zeros((slots + 1) * self._length, dtype=self._dtype)
                self._slots = [
                    _Slot(runtime, rows, self._length, self._dtype, self._row(i))
                    for i in range(slots)
                ]
                self._stream = cp.cuda.Stream(non_blocking=True)
                # The zeros were written on the legacy default stream, which the
                # non-blocking slot streams do not wait for: finish them now.
                cp.cuda.get_current_stream().synchronize()
        except runtime.errors() as exc:
            raise AggregationError(f"cannot allocate the GPU accumulator: {exc}") from exc
        self._base = self._row(slots)
        self._current = 0
        self._filled = 0

    def __del__(self) -> None:
        # The device buffers return to CuPy's pool when this object dies; a copy or
        # kernel still in flight on a slot stream must not outlive them.
        for slot in getattr(self, "_slots", ()):
            with contextlib.suppress(RuntimeError):
                slot.wait()

    def _row(self, index: int) -> Any:
        return self._partials[index * self._length : (index + 1) * self._length]

    @property
    def backend(self) -> BackendName:
        return BackendName.CUPY

    @property
    def rows_per_slot(self) -> int:
        return self._slots[0].rows

    @property
    def pinned_bytes(self) -> int:
        """Host memory pinned for staging (all slots)."""
        return sum(slot.host.nbytes for slot in self._slots)

    @property
    def device_bytes(self) -> int:
        """Device memory held: partial sums, base row and staging twins."""
        return int(self._partials.nbytes) + sum(int(slot.device.nbytes) for slot in self._slots)

    def _stage(self, words: Words) -> None:
        """Copy one validated vector into the current slot; launch the slot when full."""
        slot = self._slots[self._current]
        if self._filled == 0:
            slot.wait()
        np.copyto(slot.host[self._filled], words, casting="no")
        self._filled += 1
        if self._filled == slot.rows:
            self._launch()

    def _launch(self) -> None:
        """Copy the filled rows of the current slot to the device and add them, async."""
        if self._filled == 0:
            return
        slot = self._slots[self._current]
        k = self._filled
        n = k * self._length
        try:
            with slot.stream:
                slot.device[:n].set(slot.host[:k].reshape(n), stream=slot.stream)
                _launch_add_rows(
                    self._rt, self.word_bits, slot.device, k=k, width=self._length, acc=slot.partial
                )
                slot.done = slot.stream.record()
        except self._rt.errors() as exc:
            raise AggregationError(f"GPU add failed: {exc}") from exc
        self._current = (self._current + 1) % len(self._slots)
        self._filled = 0

    def _sync(self) -> None:
        """Launch what is staged and wait for every stream."""
        self._launch()
        for slot in self._slots:
            slot.wait()
        self._stream.synchronize()

    def add(self, vector: WordsLike) -> None:
        self._check_masked("add a vector")
        words = as_words(vector, self._length, self._dtype)
        self._stage(words)
        self._count += 1

    def add_batch(self, vectors: Iterable[WordsLike] | Words) -> int:
        self._check_masked("add vectors")
        rows = [as_words(v, self._length, self._dtype) for v in iter_rows(vectors)]
        for words in rows:
            self._stage(words)
        self._count += len(rows)
        return len(rows)

    def _upload(self, words: Words) -> Any:
        """A device copy of host words, made on the accumulator's own stream."""
        cp = self._rt.cp
        with self._stream:
            device = cp.empty(self._length, dtype=self._dtype)
            device.set(np.ascontiguousarray(words, dtype=self._dtype), stream=self._stream)
        return device

    def retract(self, vector: WordsLike) -> None:
        self._check_masked("retract a vector")
        words = as_words(vector, self._length, self._dtype)
        if self._count < 1:
            raise AggregationError("cannot retract a vector: none was added")
        self._subtract_from_base(words, "retraction")
        self._count -= 1

    def _subtract_from_base(self, words: Words, what: str) -> None:
        cp = self._rt.cp
        try:
            device = self._upload(words)
            with self._stream:
                cp.subtract(self._base, device, out=self._base)
            self._stream.synchronize()
        except self._rt.errors() as exc:
            raise AggregationError(f"GPU {what} failed: {exc}") from exc

    def merge(self, snapshot: Snapshot) -> None:
        self._check_masked("merge a snapshot")
        check_mergeable(self._length, self.word_bits, snapshot)
        cp = self._rt.cp
        try:
            device = self._upload(snapshot.words)
            with self._stream:
                cp.add(self._base, device, out=self._base)
            self._stream.synchronize()
        except self._rt.errors() as exc:
            raise AggregationError(f"GPU merge failed: {exc}") from exc
        self._count += snapshot.count

    def _reduce(self) -> Words:
        """One kernel sums the partial rows; the result comes back to the host once."""
        cp = self._rt.cp
        try:
            self._sync()
            with self._stream:
                out = cp.zeros(self._length, dtype=self._dtype)
                _launch_add_rows(
                    self._rt,
                    self.word_bits,
                    self._partials,
                    k=len(self._slots) + 1,
                    width=self._length,
                    acc=out,
                )
                host: Words = out.get(stream=self._stream)
            self._stream.synchronize()
        except self._rt.errors() as exc:
            raise AggregationError(f"GPU reduction failed: {exc}") from exc
        return host

    def _host_words(self) -> Words:
        return self._reduce()

    def total(self) -> Words:
        return self._reduce()

    def subtract_mask(self, mask: WordsLike) -> None:
        self._check_masked("subtract the mask")
        words = as_words(mask, self._length, self._dtype)
        self._subtract_from_base(words, "mask subtraction")
        self._unmasked = True

    def restore_words(self, snapshot: Snapshot) -> None:
        """Load a snapshot into this empty accumulator (into the base row)."""
        if self._count or self._filled:
            raise AggregationError("restore needs an empty accumulator")
        if snapshot.word_bits != self.word_bits or snapshot.length != self._length:
            raise AggregationError("snapshot shape does not match the accumulator")
        cp = self._rt.cp
        try:
            device = self._upload(snapshot.words)
            with self._stream:
                cp.copyto(self._base, device)
            self._stream.synchronize()
        except self._rt.errors() as exc:
            raise AggregationError(f"GPU restore failed: {exc}") from exc
        self._count = snapshot.count
        self._unmasked = snapshot.unmasked


class CupyBackend:
    """Accumulators on the GPU that :func:`open_cupy` found."""

    def __init__(self, runtime: CupyRuntime) -> None:
        self._rt = runtime

    @classmethod
    def open(cls) -> CupyBackend:
        """The backend, or :class:`BackendUnavailableError` saying why not."""
        return cls(open_cupy())

    @property
    def name(self) -> BackendName:
        return BackendName.CUPY

    @property
    def description(self) -> str:
        rt = self._rt
        return f"cupy {rt.cupy_version} on {rt.device_name} (device {rt.device_id})"

    def accumulator(
        self, length: int, word_bits: int, *, staging_bytes: int = STAGING_BYTES, slots: int = SLOTS
    ) -> CupyAccumulator:
        """An empty sum; ``staging_bytes`` and ``slots`` size the pinned staging ring."""
        return CupyAccumulator(
            self._rt, length, word_bits, staging_bytes=staging_bytes, slots=slots
        )

    def restore(self, snapshot: Snapshot) -> CupyAccumulator:
        acc = CupyAccumulator(self._rt, snapshot.length, snapshot.word_bits)
        acc.restore_words(snapshot)
        return acc
