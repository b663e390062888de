"""CUDA C for the CuPy backend, kept as plain text so it can also be compiled on a CPU.

The kernels use only ``blockIdx``, ``blockDim``, ``threadIdx``, ``gridDim`` and
fixed-width unsigned arithmetic (which wraps modulo ``2^w`` in C++, as in numpy),
so the test suite compiles this same text with the host C++ compiler behind a
small shim and checks it against numpy and libsodium even where no GPU exists.

Kernels (all use grid-stride loops, so any grid size is correct):

``maskfl_add_rows_u32`` / ``_u64`` ``(rows, k, width, acc)``
    ``acc[i] += rows[0][i] + ... + rows[k-1][i]`` for ``i < width``; ``rows`` is a
    C-contiguous ``k x width`` block.
``maskfl_chacha20_sum_u32`` / ``_u64`` ``(keys, n_seeds, n_blocks, n0, n1, n2, out)``
    For each 64-byte keystream block ``b < n_blocks``: the sum over all seeds of
    RFC 8439 ChaCha20 block ``b`` (key = seed as 8 little-endian words,
    counter = ``b``, nonce = ``n0 n1 n2``), written as 16 uint32 or 8 uint64
    words at ``out + b * 16`` or ``out + b * 8``. With one seed and the nonce
    ``b"LibsodiumDRG"`` that is libsodium's ``randombytes_buf_deterministic``.
"""

from __future__ import annotations

from typing import Final

import numpy as np

ADD_ROWS: Final = {32: "maskfl_add_rows_u32", 64: "maskfl_add_rows_u64"}
CHACHA20_SUM: Final = {32: "maskfl_chacha20_sum_u32", 64: "maskfl_chacha20_sum_u64"}

LIBSODIUM_NONCE: Final = b"LibsodiumDRG"
NONCE_WORDS: Final = tuple(int(w) for w in np.frombuffer(LIBSODIUM_NONCE, dtype="<u4"))
CHACHA20_BLOCK_BYTES: Final = 64
THREADS_PER_BLOCK: Final = 256
MAX_GRID: Final = 1 << 16

SOURCE: Final = r"""
typedef unsigned int maskfl_u32;
typedef unsigned long long maskfl_u64;

#define MASKFL_ADD_ROWS(NAME, T)                                                     \
extern "C" __global__ void NAME(const T* rows, long long k, long long width, T* acc) \
{                                                                                    \
    long long stride = (long long)gridDim.x * blockDim.x;                           \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < width;  \
         i += stride) {                                                              \
        T s = acc[i];                                                                \
        for (long long r = 0; r < k; ++r) {                                          \
            s += rows[r * width + i];                                                \
        }                                                                            \
        acc[i] = s;                                                                  \
    }                                                                                \
}

MASKFL_ADD_ROWS(maskfl_add_rows_u32, maskfl_u32)
MASKFL_ADD_ROWS(maskfl_add_rows_u64, maskfl_u64)

__device__ __forceinline__ maskfl_u32 maskfl_rotl(maskfl_u32 v, int c)
{
    return (v << c) | (v >> (32 - c));
}

#define MASKFL_QR(a, b, c, d)                         \
    a += b; d ^= a; d = maskfl_rotl(d, 16);           \
    c += d; b ^= c; b = maskfl_rotl(b, 12);           \
    a += b; d ^= a; d = maskfl_rotl(d, 8);            \
    c += d; b ^= c; b = maskfl_rotl(b, 7);

/* RFC 8439 section 2.3: the ChaCha20 block function, 32-bit counter. */
__device__ __forceinline__ void maskfl_chacha20_block(
    const maskfl_u32* key, maskfl_u32 counter,
    maskfl_u32 n0, maskfl_u32 n1, maskfl_u32 n2, maskfl_u32* out)
{
    maskfl_u32 s[16];
    s[0] = 0x61707865u; s[1] = 0x3320646eu; s[2] = 0x79622d32u; s[3] = 0x6b206574u;
    for (int j = 0; j < 8; ++j) {
        s[4 + j] = key[j];
    }
    s[12] = counter; s[13] = n0; s[14] = n1; s[15] = n2;
    maskfl_u32 x[16];
    for (int j = 0; j < 16; ++j) {
        x[j] = s[j];
    }
    for (int round = 0; round < 10; ++round) {
        MASKFL_QR(x[0], x[4], x[8],  x[12])
        MASKFL_QR(x[1], x[5], x[9],  x[13])
        MASKFL_QR(x[2], x[6], x[10], x[14])
        MASKFL_QR(x[3], x[7], x[11], x[15])
        MASKFL_QR(x[0], x[5], x[10], x[15])
        MASKFL_QR(x[1], x[6], x[11], x[12])
        MASKFL_QR(x[2], x[7], x[8],  x[13])
        MASKFL_QR(x[3], x[4], x[9],  x[14])
    }
    for (int j = 0; j < 16; ++j) {
        out[j] = x[j] + s[j];
    }
}

extern "C" __global__ void maskfl_chacha20_sum_u32(
    const maskfl_u32* keys, long long n_seeds, long long n_blocks,
    maskfl_u32 n0, maskfl_u32 n1, maskfl_u32 n2, maskfl_u32* out)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks;
         b += stride) {
        maskfl_u32 acc[16];
        maskfl_u32 block[16];
        for (int j = 0; j < 16; ++j) {
            acc[j] = 0u;
        }
        for (long long s = 0; s < n_seeds; ++s) {
            maskfl_chacha20_block(keys + 8 * s, (maskfl_u32)b, n0, n1, n2, block);
            for (int j = 0; j < 16; ++j) {
                acc[j] += block[j];
            }
        }
        for (int j = 0; j < 16; ++j) {
            out[b * 16 + j] = acc[j];
        }
    }
}

extern "C" __global__ void maskfl_chacha20_sum_u64(
    const maskfl_u32* keys, long long n_seeds, long long n_blocks,
    maskfl_u32 n0, maskfl_u32 n1, maskfl_u32 n2, maskfl_u64* out)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks;
         b += stride) {
        maskfl_u64 acc[8];
        maskfl_u32 block[16];
        for (int j = 0; j < 8; ++j) {
            acc[j] = 0ull;
        }
        for (long long s = 0; s < n_seeds; ++s) {
            maskfl_chacha20_block(keys + 8 * s, (maskfl_u32)b, n0, n1, n2, block);
            /* little-endian: word 2j is the low half of 64-bit word j */
            for (int j = 0; j < 8; ++j) {
                acc[j] += (maskfl_u64)block[2 * j] | ((maskfl_u64)block[2 * j + 1] << 32);
            }
        }
        for (int j = 0; j < 8; ++j) {
            out[b * 8 + j] = acc[j];
        }
    }
}
"""


def grid_for(n_items: int) -> int:
    """Enough blocks of THREADS_PER_BLOCK threads for ``n_items``, capped (the loops stride)."""
    return max(1, min(MAX_GRID, -(-n_items // THREADS_PER_BLOCK)))
