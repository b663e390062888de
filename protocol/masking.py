"""Masking arithmetic: fixed-point encoding, ChaCha20 masks, unmasking and decoding.

Everything is modular arithmetic on numpy unsigned integers of ``w`` bits
(``w`` in {32, 64}); numpy's array additions wrap modulo ``2^w`` silently, so
there is no big-integer code anywhere. docs/protocol.md §7 is the normative
specification of every rule below; docs/vectors/masking.json has known answers.

Encoding (one update of ``M`` elements becomes ``M + 4`` words)::

    x  = clip(delta, -B, B) * a          clip first, then weight (a in [0, 1])
    e  = clip(rint(x * S), -K, K) + K    K = floor(B * S), an exact integer
    e_M = rint(a * S_w) + S_w            the weight, with its own bound 1
    e_M+1, e_M+2, e_M+3                  evaluation counts of the global model on the
                                         device's held-out data: examples, correct,
                                         rint(summed loss * Q) (see EvalCounts)

with ``S = floor((2^w - 1) / (N_max * 2B + 2T))`` and ``S_w`` the same with
``B = 1, T = 0``. ``T`` (``noise``) is 0 without differential privacy; with it,
the bound on the aggregate noise (protocol/dp.py, docs/protocol.md §7.9), in the
units of ``delta``. Every encoded value lies in ``[0, 2K]`` and the noise of the
sum in ``[-T*S, T*S]`` (but for probability 2^-40), so the sum of up to ``N_max``
updates never wraps. The *masks* wrap, and that is the point: a masked word is uniform modulo
``2^w`` and tells nothing about the value under it.

Masking adds the ChaCha20 keystream of a 32-byte seed (RFC 8439, key = seed,
nonce = ``b"LibsodiumDRG"``, block counter from 0, read as little-endian words),
which is byte-identical to libsodium's ``randombytes_buf_deterministic``. The
keystream comes from ``cryptography`` (OpenSSL, SIMD) in cache-sized chunks that
are added into the target at once, so no function here allocates a whole
stream except :func:`mask_stream`, the plain reference.

Decoding subtracts ``n * K`` (and ``n * S_w``) in integers modulo ``2^w``, reads
the result as two's complement and only then converts to float: a float64 cast
of a raw 64-bit sum would lose 11 bits.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from maskfl.protocol.crypto import SEED_BYTES
from maskfl.protocol.errors import AggregationError, ConfigError, CryptoError, LocalProtocolError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EVAL_MAX_EXAMPLES",
    "EVAL_WORDS",
    "LOSS_CAP",
    "MASK_NONCE",
    "NO_EVALUATION",
    "EvalCounts",
    "FleetEvaluation",
    "MaskConfig",
    "WordBits",
    "Words",
    "add_mask",
    "add_words",
    "aggregate_mask",
    "decode_aggregate",
    "decode_evaluation",
    "decode_values",
    "decode_weight_sum",
    "encode_evaluation",
    "encode_update",
    "error_bound",
    "mask_stream",
    "mask_update",
    "unmask",
    "update_words",
]

_log = logging.getLogger(__name__)

WordBits: TypeAlias = Literal[32, 64]
Words: TypeAlias = npt.NDArray[np.unsignedinteger[Any]]
"""A vector of words: ``np.uint32`` or ``np.uint64``, 1-D."""

MASK_NONCE: Final = b"LibsodiumDRG"
DEFAULT_CHUNK_BYTES: Final = 256 * 1024
"""Keystream bytes generated per step; the target slice (and, when encoding, its
float64 scratch) stays in L2 with it.

Chosen with ``maskfl-bench protocol`` (tools/bench_protocol.py, ``chunk_sweep``),
M = 10^6 on one AMD EPYC core (1 MiB L2): add_mask and mask_update rise
steeply up to 64 KiB (per-call overhead), are flat within noise from 128 to
512 KiB, and 256 KiB was best or tied for both word sizes. Re-run the sweep
before changing it, and on the target hardware (a Pi 4 has 1 MiB of shared L2).
"""

EVAL_WORDS: Final = 3
"""Words after the weight word: evaluation examples, correct predictions, summed loss."""
EVAL_MAX_EXAMPLES: Final = 4096
"""Held-out examples one update may count (fewer when the word size needs it, see
:attr:`MaskConfig.eval_max_examples`); a device with more evaluates a fixed subset."""
LOSS_CAP: Final = 32
"""Each example's loss (nats) is clipped to ``[0, LOSS_CAP]`` before it is summed."""

# Floating-point slack, in units of 1/S, of computing rint(a * x * S) in float64:
# three roundings (a*x, float(S), the product), each at most 2^-53 relative.
_FLOAT_UNITS: Final = 4 * 2.0**-53


@dataclass(frozen=True, slots=True)
class MaskConfig:
    """How updates become words: clipping bound ``B``, fleet size ``N_max``, word size.

    ``bound`` is the largest magnitude of a delta element that survives clipping;
    ``n_max`` the largest number of updates that may be summed without wrapping.
    Invalid values raise :class:`ConfigError` naming the field.
    """

    bound: float
    n_max: int
    word_bits: WordBits = 32
    noise: float = 0.0
    """``T``: the bound on the aggregate DP noise of one element, in delta units (0: none)."""
    # Derived exactly (with Fractions) once, in __post_init__.
    _scale: int = field(init=False, repr=False, compare=False)
    _offset: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.bound, bool) or not isinstance(self.bound, int | float):
            raise ConfigError("bound must be a number, e.g. 1.0", field="bound")
        if not math.isfinite(self.bound) or self.bound <= 0:
            raise ConfigError(
                f"bound must be a finite number > 0 (got {self.bound!r}); e.g. 1.0", field="bound"
            )
        if isinstance(self.n_max, bool) or not isinstance(self.n_max, int) or self.n_max < 1:
            raise ConfigError(
                f"n_max must be an integer >= 1 (got {self.n_max!r}): the most updates per round",
                field="n_max",
            )
        if self.word_bits not in (32, 64):
            raise ConfigError(
                f"word_bits must be 32 or 64 (got {self.word_bits!r})", field="word_bits"
            )
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, int | float)
            or not math.isfinite(self.noise)
            or self.noise < 0
        ):
            raise ConfigError(
                f"noise must be a finite number >= 0 (got {self.noise!r})", field="noise"
            )
        bound = Fraction(self.bound)
        scale = math.floor(
            Fraction(self.modulus - 1) / (self.n_max * 2 * bound + 2 * Fraction(self.noise))
        )
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_offset", math.floor(bound * scale))
        if scale < 1:
            raise ConfigError(
                f"bound * n_max too large for {self.word_bits}-bit words (scale would be 0); "
                "lower bound or n_max, or use word_bits = 64",
                field="n_max",
            )
        if self.weight_scale < 1:
            raise ConfigError(
                f"n_max = {self.n_max} too large for {self.word_bits}-bit words; "
                "use word_bits = 64",
                field="n_max",
            )

    @classmethod
    def for_tolerance(
        cls, bound: float, n_max: int, tolerance: float, noise: float = 0.0
    ) -> MaskConfig:
        """The cheapest word size whose resolution ``1/S`` is at most ``tolerance``.

        32-bit words keep a masked update as large as the float32 model; 64 bits
        are chosen only when 32 would be coarser than ``tolerance``. The choice is
        logged. Raises :class:`ConfigError` when even 64 bits are too coarse.
        """
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
            raise ConfigError("tolerance must be a number, e.g. 1e-6", field="tolerance")
        if not math.isfinite(tolerance) or tolerance <= 0:
            raise ConfigError(
                f"tolerance must be a finite number > 0 (got {tolerance!r})", field="tolerance"
            )
        bits: WordBits
        for bits in (32, 64):
            try:
                cfg = cls(bound, n_max, bits, noise)
            except ConfigError as exc:
                if exc.field != "n_max" or bits == 64:
                    raise
                continue
            if cfg.resolution <= tolerance:
                _log.info(
                    "masking: %d-bit words, resolution %.3g <= tolerance %.3g (bound %g, n_max %d)",
                    bits,
                    cfg.resolution,
                    tolerance,
                    bound,
                    n_max,
                )
                return cfg
        raise ConfigError(
            f"no word size reaches tolerance {tolerance:g} with bound {bound:g} and "
            f"n_max {n_max}: 64-bit resolution is {cls(bound, n_max, 64, noise).resolution:.3g}; "
            "raise tolerance or lower bound or n_max",
            field="tolerance",
        )

    @property
    def dtype(self) -> type[np.uint32] | type[np.uint64]:
        """The numpy word type: ``np.uint32`` or ``np.uint64``."""
        return np.uint32 if self.word_bits == 32 else np.uint64

    @property
    def modulus(self) -> int:
        """``2^w``."""
        return 1 << self.word_bits

    @property
    def scale(self) -> int:
        """``S = floor((2^w - 1) / (N_max * 2B + 2T))``, exact (``B``, ``T`` read as their
        exact binary values)."""
        return self._scale

    @property
    def weight_scale(self) -> int:
        """``S_w = floor((2^w - 1) / (N_max * 2))``: the scale of the weight (bound 1)."""
        return (self.modulus - 1) // (self.n_max * 2)

    @property
    def offset(self) -> int:
        """``K = floor(B * S)``: added to every encoded element so words are non-negative."""
        return self._offset

    @property
    def resolution(self) -> float:
        """``1/S``: the smallest step an encoded element can take."""
        return 1.0 / self.scale

    @property
    def eval_capacity(self) -> int:
        """``C = floor((2^w - 1) / N_max)``: the most one evaluation word may hold, so that
        the sum of ``N_max`` of them never wraps."""
        return (self.modulus - 1) // self.n_max

    @property
    def eval_max_examples(self) -> int:
        """``E = min(EVAL_MAX_EXAMPLES, floor(C / LOSS_CAP))``: examples per update."""
        return min(EVAL_MAX_EXAMPLES, self.eval_capacity // LOSS_CAP)

    @property
    def loss_scale(self) -> int:
        """``Q = floor(C / (E * LOSS_CAP))``: loss units per nat (the summed loss of ``E``
        examples at ``LOSS_CAP`` each still fits ``C``)."""
        return self.eval_capacity // (self.eval_max_examples * LOSS_CAP)


@dataclass(frozen=True, slots=True)
class EvalCounts:
    """One updater's evaluation of the round's global model on its held-out data.

    ``examples`` evaluated (at most :attr:`MaskConfig.eval_max_examples`), how many
    of them were predicted ``correct``, and ``loss_sum``, the sum of their losses with
    each clipped to ``[0, LOSS_CAP]``. Travels masked, as three words after the weight
    word, so only the fleet's totals are ever seen. All zero: no evaluation.
    """

    examples: int
    correct: int
    loss_sum: float


NO_EVALUATION: Final = EvalCounts(0, 0, 0.0)


@dataclass(frozen=True, slots=True)
class FleetEvaluation:
    """The unmasked totals of the included updates' evaluation words."""

    examples: int
    correct: int
    loss_sum: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else math.nan

    @property
    def loss(self) -> float:
        """Mean loss per example."""
        return self.loss_sum / self.examples if self.examples else math.nan


def update_words(m: int) -> int:
    """Words of an update (and of an aggregate mask) for a model of ``m`` parameters."""
    return m + 1 + EVAL_WORDS


def encode_evaluation(ev: EvalCounts, cfg: MaskConfig) -> list[int]:
    """The three evaluation words ``[examples, correct, rint(loss_sum * Q)]``.

    Raises :class:`LocalProtocolError` unless ``0 <= correct <= examples <= E`` and
    ``0 <= loss_sum <= examples * LOSS_CAP`` (finite).
    """
    n, c = ev.examples, ev.correct
    if not (isinstance(n, int) and isinstance(c, int)) or isinstance(n, bool):
        raise LocalProtocolError("evaluation counts must be integers")
    if not 0 <= c <= n <= cfg.eval_max_examples:
        raise LocalProtocolError(
            f"evaluation counts out of range: need 0 <= correct ({c}) <= examples ({n}) <= "
            f"{cfg.eval_max_examples}"
        )
    loss = float(ev.loss_sum)
    if not (math.isfinite(loss) and 0.0 <= loss <= n * LOSS_CAP):
        raise LocalProtocolError(
            f"evaluation loss sum {loss!r} outside [0, examples * {LOSS_CAP}]: clip each "
            "example's loss to [0, LOSS_CAP]"
        )
    return [n, c, round(Fraction(loss) * cfg.loss_scale)]


def decode_evaluation(words: Words, n_included: int, cfg: MaskConfig) -> FleetEvaluation:
    """The fleet totals from the last :data:`EVAL_WORDS` words of an unmasked sum.

    Raises :class:`AggregationError` when the totals are impossible for
    ``n_included`` honest updates (an updater sent out-of-range words): the model
    is still good, but its evaluation must not be published.
    """
    tail = [int(w) for w in words[-EVAL_WORDS:]]
    if len(tail) != EVAL_WORDS:
        raise AggregationError(f"an aggregate needs at least {EVAL_WORDS} evaluation words")
    examples, correct, loss_units = tail
    if not (
        correct <= examples <= n_included * cfg.eval_max_examples
        and loss_units <= examples * LOSS_CAP * cfg.loss_scale
    ):
        raise AggregationError(
            f"evaluation totals impossible for {n_included} updates (examples {examples}, "
            f"correct {correct}, loss units {loss_units}): some updater sent bad words"
        )
    return FleetEvaluation(examples, correct, loss_units / cfg.loss_scale)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != SEED_BYTES:
        raise CryptoError(f"a mask seed must be {SEED_BYTES} bytes")


def _word_bits(words: np.ndarray[Any, Any]) -> WordBits:
    if words.dtype == np.uint32:
        return 32
    if words.dtype == np.uint64:
        return 64
    raise AggregationError(f"words must be uint32 or uint64, not {words.dtype}")


def _check_target(acc: np.ndarray[Any, Any]) -> WordBits:
    if not isinstance(acc, np.ndarray):
        raise AggregationError("the target must be a numpy array")
    bits = _word_bits(acc)
    if acc.ndim != 1 or not acc.flags.c_contiguous or not acc.flags.writeable:
        raise AggregationError("the target must be a 1-D, C-contiguous, writeable array")
    return bits


def _le(bits: WordBits) -> np.dtype[Any]:
    return np.dtype("<u4") if bits == 32 else np.dtype("<u8")


def _keystream(seed: bytes) -> CipherContext:
    # cryptography takes a 16-byte nonce: the 32-bit block counter (LE) first, then
    # the 96-bit RFC 8439 nonce. libsodium's deterministic generator uses counter 0.
    nonce = (0).to_bytes(4, "little") + MASK_NONCE
    return Cipher(algorithms.ChaCha20(bytes(seed), nonce), mode=None).encryptor()


_ZEROS: Final = memoryview(bytes(DEFAULT_CHUNK_BYTES))  # shared, read-only plaintext


def _zeros(n_bytes: int) -> memoryview:
    """``n_bytes`` zero bytes to encrypt into keystream, without a fresh allocation."""
    return _ZEROS[:n_bytes] if n_bytes <= len(_ZEROS) else memoryview(bytes(n_bytes))


def _chunk_words(bits: WordBits, chunk_bytes: int) -> int:
    if chunk_bytes < 64:
        raise LocalProtocolError("chunk_bytes must be at least 64 (one ChaCha20 block)")
    return max(1, chunk_bytes // (bits // 8))


def mask_stream(seed: bytes, n_words: int, word_bits: WordBits) -> Words:
    """The mask of ``seed``: ``n_words`` little-endian words of its ChaCha20 keystream.

    The plain reference (allocates the whole stream); :func:`add_mask` and
    :func:`aggregate_mask` produce the same words chunk by chunk.
    """
    _check_seed(seed)
    if word_bits not in (32, 64):
        raise LocalProtocolError(f"word_bits must be 32 or 64, not {word_bits!r}")
    if n_words < 0:
        raise LocalProtocolError("n_words must be >= 0")
    n_bytes = n_words * (word_bits // 8)
    raw = _keystream(seed).update(bytes(n_bytes))
    words = np.frombuffer(raw, dtype=_le(word_bits))
    return words.astype(np.uint32 if word_bits == 32 else np.uint64)


def _add_streams(acc: Words, seeds: Sequence[bytes], *, chunk_bytes: int) -> None:
    """acc += mask(seed) for every seed, chunk-outer so each slice of acc stays in cache."""
    bits = _word_bits(acc)
    streams = [_keystream(seed) for seed in seeds]
    if not streams or acc.size == 0:
        return
    step = min(_chunk_words(bits, chunk_bytes), acc.size)
    word_bytes = bits // 8
    zeros = _zeros(step * word_bytes)
    ks_all = np.empty(step, dtype=_le(bits))
    ks_bytes = ks_all.data.cast("B")
    for start in range(0, acc.size, step):
        stop = min(start + step, acc.size)
        n = stop - start
        target = acc[start:stop]
        ks = ks_all[:n]
        src = zeros[: n * word_bytes]
        dst = ks_bytes[: n * word_bytes]
        for stream in streams:
            stream.update_into(src, dst)
            np.add(target, ks, out=target)


def add_mask(acc: Words, seed: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Add the mask of ``seed`` into ``acc`` in place, modulo ``2^w`` (w from ``acc.dtype``).

    This is how an updater masks its encoded words. ``acc`` must be a 1-D,
    C-contiguous, writeable uint32/uint64 array (else :class:`AggregationError`);
    it is modified only after the seed has been checked.
    """
    _check_seed(seed)
    _check_target(acc)
    _add_streams(acc, [seed], chunk_bytes=chunk_bytes)


def aggregate_mask(
    seeds: Sequence[bytes],
    n_words: int,
    word_bits: WordBits,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Words:
    """The sum of the masks of ``seeds`` modulo ``2^w``: what a summer publishes in sum2."""
    for seed in seeds:
        _check_seed(seed)
    if word_bits not in (32, 64):
        raise LocalProtocolError(f"word_bits must be 32 or 64, not {word_bits!r}")
    if n_words < 0:
        raise LocalProtocolError("n_words must be >= 0")
    acc: Words = np.zeros(n_words, dtype=np.uint32 if word_bits == 32 else np.uint64)
    _add_streams(acc, seeds, chunk_bytes=chunk_bytes)
    return acc


def add_words(acc: Words, words: Words) -> None:
    """``acc += words`` in place, modulo ``2^w``: how masked updates are aggregated.

    Raises :class:`AggregationError` when word size or length differ; ``acc`` is
    then unchanged.
    """
    _check_target(acc)
    _check_same(acc, words)
    np.add(acc, words, out=acc)


def unmask(masked_sum: Words, aggregate: Words) -> Words:
    """``masked_sum - aggregate`` modulo ``2^w`` (a new array): the sum of the encoded updates."""
    _check_same(masked_sum, aggregate)
    result: Words = np.subtract(masked_sum, aggregate)
    return result


def _check_same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    if not isinstance(b, np.ndarray) or not isinstance(a, np.ndarray):
        raise AggregationError("words must be numpy arrays")
    if _word_bits(a) != _word_bits(b):
        raise AggregationError(f"word size differs: {a.dtype} vs {b.dtype}")
    if a.shape != b.shape or a.ndim != 1:
        raise AggregationError(f"length differs: {a.shape} vs {b.shape}")


def _check_update(delta: npt.NDArray[np.floating[Any]], weight: float) -> None:
    if not isinstance(delta, np.ndarray) or delta.ndim != 1:
        raise LocalProtocolError("delta must be a 1-D numpy array")
    if not np.issubdtype(delta.dtype, np.floating):
        raise LocalProtocolError(f"delta must be a float array, not {delta.dtype}")
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.floating):
        raise LocalProtocolError("weight must be a number in [0, 1]")
    if not 0.0 <= float(weight) <= 1.0:
        raise LocalProtocolError(f"weight must be in [0, 1], got {weight!r}")


# 1.5·2^52: adding it to a float64 y with |y| < 2^51 rounds y to the nearest integer
# and leaves that integer in the low mantissa bits (the classic fast float-to-int).
_ROUNDING_MAGIC: Final = 1.5 * 2.0**52
_LOW_HALF: Final = 0 if sys.byteorder == "little" else 1


def _check_noise(noise: npt.NDArray[np.int64] | None, m: int) -> None:
    if noise is not None and (noise.dtype != np.int64 or noise.shape != (m,)):
        raise LocalProtocolError(f"noise must be {m} int64 values, got {noise.dtype} {noise.shape}")


def _add_noise(out: Words, noise: npt.NDArray[np.int64]) -> None:
    """out += noise modulo 2^w (a negative value wraps, as two's complement)."""
    np.add(out, noise.astype(out.dtype), out=out, casting="unsafe")


class _Encoder:
    """Encodes one update chunk by chunk, with the constants and scratch computed once.

    Per element: ``rint(clip(x·(a·S), ±c)) + K`` with ``c = min(B·(a·S), K)``,
    which is ``rint(clip(x, ±B)·a·S)`` (float multiplication is monotone) kept
    within ``±K``, shifted by ``K``; ``rint`` rounds half to even *before* the
    shift (docs/protocol.md §7.2). The chunk stays in cache. For 32-bit words the
    rounding is one float addition of ``1.5·2^52``, whose low 32 mantissa bits are
    the rounded value in two's complement, and ``K`` is added in integers (adding
    ``1.5·2^52 + K`` at once would round ties to an even *word*, which differs
    from an even value when ``K`` is odd); 64-bit words take ``rint`` and a cast.
    The caller checks for NaN first (:func:`_check_no_nan`).
    """

    __slots__ = ("_bits", "_bound", "_factor", "_offset", "_work")

    def __init__(self, weight: float, cfg: MaskConfig, chunk: int) -> None:
        self._bits = cfg.word_bits
        self._factor = float(weight) * float(cfg.scale)
        k_float = float(cfg.offset)
        if k_float > cfg.offset:  # above 2^53 float(K) may round up, past K
            k_float = math.nextafter(k_float, 0.0)
        self._bound = min(float(cfg.bound) * self._factor, k_float)
        self._offset = cfg.dtype(cfg.offset)
        self._work = np.empty(chunk, dtype=np.float64)

    def encode(self, out: Words, delta: npt.NDArray[np.floating[Any]]) -> None:
        """out[:] = encode(delta), for a delta without NaN."""
        if self._factor == 0.0:  # weight 0: inf * 0 would be NaN, and every value is 0
            out.fill(self._offset)
            return
        work = self._work[: out.size]
        np.copyto(work, delta)
        np.multiply(work, self._factor, out=work)
        np.clip(work, -self._bound, self._bound, out=work)
        if self._bits == 32:
            np.add(work, _ROUNDING_MAGIC, out=work)
            np.copyto(out, work.view(np.uint32)[_LOW_HALF::2])
            np.add(out, self._offset, out=out)
        else:
            np.rint(work, out=work)
            np.copyto(out.view(np.int64), work, casting="unsafe")
            np.add(out, self._offset, out=out)


def _output(out: Words | None, n: int, cfg: MaskConfig) -> Words:
    if out is None:
        fresh: Words = np.empty(n, dtype=cfg.dtype)
        return fresh
    _check_target(out)
    if out.dtype != cfg.dtype or out.size != n:
        raise AggregationError(f"out must be {n} words of {np.dtype(cfg.dtype)}")
    return out


def _check_no_nan(delta: npt.NDArray[np.floating[Any]]) -> None:
    # min() propagates NaN: one fast reduction instead of a boolean array.
    if delta.size and np.isnan(delta.min()):
        raise LocalProtocolError("delta contains NaN; refusing to encode it")


def _encode_weight(weight: float, cfg: MaskConfig) -> int:
    units = round(Fraction(float(weight)) * cfg.weight_scale)
    return units + cfg.weight_scale


def encode_update(
    delta: npt.NDArray[np.floating[Any]],
    weight: float,
    cfg: MaskConfig,
    *,
    evaluation: EvalCounts = NO_EVALUATION,
    chunk_words: int = 1 << 16,
    out: Words | None = None,
    noise: npt.NDArray[np.int64] | None = None,
) -> Words:
    """Encode ``clip(delta, -B, B) * weight``, the weight and the evaluation counts as
    ``M + 4`` words of ``cfg`` (:func:`update_words`).

    ``weight`` is ``min(samples, cap) / cap`` in [0, 1]. NaN in ``delta``, a
    weight outside [0, 1] or evaluation counts out of range raise
    :class:`LocalProtocolError` (infinities clip); nothing is written then.
    ``out``, if given, receives the words (for instance the payload slot of an
    outgoing message) and is returned. ``noise``, if given, is ``M`` integers (the
    updater's DP noise share, protocol/dp.py) added to the encoded values modulo ``2^w``.
    """
    _check_update(delta, weight)
    _check_no_nan(delta)
    _check_noise(noise, delta.size)
    tail = [_encode_weight(weight, cfg), *encode_evaluation(evaluation, cfg)]
    m = delta.size
    out = _output(out, update_words(m), cfg)
    step = max(1, min(chunk_words, m))
    encoder = _Encoder(weight, cfg, step)
    for start in range(0, m, step):
        stop = min(start + step, m)
        encoder.encode(out[start:stop], delta[start:stop])
        if noise is not None:
            _add_noise(out[start:stop], noise[start:stop])
    out[m:] = tail
    return out


def mask_update(
    delta: npt.NDArray[np.floating[Any]],
    weight: float,
    seed: bytes | Sequence[bytes],
    cfg: MaskConfig,
    *,
    evaluation: EvalCounts = NO_EVALUATION,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    out: Words | None = None,
    noise: npt.NDArray[np.int64] | None = None,
) -> Words:
    """``encode_update`` then ``add_mask``, fused chunk by chunk: what an updater sends.

    Equal to ``w = encode_update(delta, weight, cfg, evaluation=e); add_mask(w, seed)`` word
    for word, but each chunk is encoded and masked while it is in cache. With mask
    groups ``seed`` is the sequence of the g group seeds and the mask is the sum of
    their masks, ``Σ_j ChaCha20(seed_j) mod 2^w`` (one seed: exactly the one mask).
    ``out``, if given, receives the words and is returned (no allocation).
    """
    seeds = [bytes(seed)] if isinstance(seed, bytes | bytearray | memoryview) else list(seed)
    if not seeds:
        raise LocalProtocolError("an update is masked with at least one seed")
    for one in seeds:
        _check_seed(one)
    _check_update(delta, weight)
    _check_no_nan(delta)
    _check_noise(noise, delta.size)
    tail = [_encode_weight(weight, cfg), *encode_evaluation(evaluation, cfg)]
    bits = cfg.word_bits
    m = delta.size
    total = update_words(m)
    out = _output(out, total, cfg)
    step = min(_chunk_words(bits, chunk_bytes), total)
    word_bytes = bits // 8
    encoder = _Encoder(weight, cfg, step)
    zeros = _zeros(step * word_bytes)
    ks_all = np.empty(step, dtype=_le(bits))
    ks_bytes = ks_all.data.cast("B")
    streams = [_keystream(one) for one in seeds]
    for start in range(0, total, step):
        stop = min(start + step, total)
        n = stop - start
        target = out[start:stop]
        enc_stop = min(stop, m)
        if enc_stop > start:
            encoder.encode(target[: enc_stop - start], delta[start:enc_stop])
            if noise is not None:
                _add_noise(target[: enc_stop - start], noise[start:enc_stop])
        for i in range(max(start, m), stop):
            target[i - start] = tail[i - m]
        for stream in streams:
            stream.update_into(zeros[: n * word_bytes], ks_bytes[: n * word_bytes])
            np.add(target, ks_all[:n], out=target)
    return out


def decode_aggregate(
    words: Words, n_included: int, cfg: MaskConfig
) -> tuple[npt.NDArray[np.float64], float]:
    """Decode the unmasked sum of ``n_included`` updates: ``(Σ a_k·delta_k, Σ a_k)``.

    Subtracts the offsets in integers modulo ``2^w``, reads two's complement,
    then converts to float. Divide the first by the second for the weighted mean;
    :func:`error_bound` says how far that mean can be from the exact one.
    The last :data:`EVAL_WORDS` words (the evaluation counts) are
    :func:`decode_evaluation`'s. Raises :class:`AggregationError` on a word-size
    mismatch, a vector too short or ``n_included`` outside ``[1, n_max]``.
    """
    if not isinstance(words, np.ndarray) or words.ndim != 1 or words.size < 1 + EVAL_WORDS:
        raise AggregationError(
            f"an aggregate must be a 1-D array of at least {1 + EVAL_WORDS} words"
        )
    if _word_bits(words) != cfg.word_bits:
        raise AggregationError(f"aggregate is {words.dtype}, config says {cfg.word_bits}-bit")
    if isinstance(n_included, bool) or not 1 <= n_included <= cfg.n_max:
        raise AggregationError(f"n_included must be in [1, n_max={cfg.n_max}], got {n_included!r}")
    m = words.size - 1 - EVAL_WORDS
    return decode_values(words[:m], n_included, cfg), decode_weight_sum(words, n_included, cfg)


def decode_values(part: Words, n_included: int, cfg: MaskConfig) -> npt.NDArray[np.float64]:
    """The weighted sum ``Σ a_k·delta_k`` of any slice of an unmasked aggregate's model
    words (not the weight word): element by element, so decoding a large model in
    slices gives exactly the values of decoding it whole, with scratch memory of the
    slice only. The caller checks ``words``, ``n_included`` as :func:`decode_aggregate`."""
    signed_t = np.int32 if cfg.word_bits == 32 else np.int64
    shift = cfg.dtype((n_included * cfg.offset) % cfg.modulus)
    centred = np.subtract(part, shift)
    values = centred.view(signed_t).astype(np.float64)
    values /= float(cfg.scale)
    return values


def decode_weight_sum(words: Words, n_included: int, cfg: MaskConfig) -> float:
    """``Σ a_k`` from an unmasked aggregate (its weight word, before the evaluation words)."""
    weight_units = (
        int(words[words.size - 1 - EVAL_WORDS]) - n_included * cfg.weight_scale
    ) % cfg.modulus
    if weight_units >= cfg.modulus // 2:
        weight_units -= cfg.modulus
    return float(Fraction(weight_units, cfg.weight_scale))


def error_bound(n: int, weight_sum: float, cfg: MaskConfig) -> float:
    """Largest possible error, per element, of the decoded weighted mean of ``n`` updates.

    With exact rounding each element of each update is off by at most half a unit
    ``1/(2S)``, so the weighted sum is off by ``n/(2S)`` and — because the weight
    sum is encoded the same way — the mean ``T/W`` is off by at most
    ``(n·u/S + B·n·u_w/S_w) / W``, i.e. about ``n / (S·W)``. ``u`` and ``u_w``
    are the half unit plus the float64 slack of encoding (which matters only for
    64-bit words with small ``n_max``) and, for ``B·S`` not an integer, the
    ``B·S - floor(B·S)`` lost at the clip edge. ``weight_sum`` is the decoded one.
    Returns ``inf`` when ``weight_sum <= 0`` (nothing to average).
    """
    if n < 0:
        raise LocalProtocolError("n must be >= 0")
    if not weight_sum > 0:
        return math.inf
    s = cfg.scale
    s_w = cfg.weight_scale
    bs = float(Fraction(cfg.bound) * s)
    edge = float(Fraction(cfg.bound) * s - cfg.offset)
    u = 0.5 + edge + _FLOAT_UNITS * bs  # encoding an element: rint, clip edge, float64
    u_w = 0.5  # the weight is encoded with exact rational arithmetic
    eps = sys.float_info.epsilon
    # The float64 conversion and division of the decoded sum (|sum| <= n·B) and of the
    # final mean (|mean| <= B) add a few ulps.
    sum_error = n * u / s + cfg.bound * n * u_w / s_w + 4 * eps * n * cfg.bound
    return sum_error / weight_sum + 4 * eps * cfg.bound
