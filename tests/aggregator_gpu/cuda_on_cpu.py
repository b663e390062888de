"""Compile the CuPy backend's CUDA C with the host C++ compiler and call it through ctypes.

This is not a GPU emulator: every "thread" runs one after another. It checks
the arithmetic of the kernel text itself (the ChaCha20 block function, the
word order, the wraparound, the grid-stride loops) on machines without a GPU;
the ``gpu`` tests check the same text compiled by NVRTC on a real device.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.aggregator_gpu._cuda_source import NONCE_WORDS, SOURCE

SHIM = r"""
struct maskfl_dim3 { unsigned int x, y, z; };
static maskfl_dim3 blockIdx, blockDim, threadIdx, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
"""

LAUNCHERS = r"""
#define MASKFL_HOST_LAUNCH(BODY)                                  \
    gridDim.x = grid; blockDim.x = block;                         \
    for (unsigned bx = 0; bx < grid; ++bx) {                      \
        for (unsigned tx = 0; tx < block; ++tx) {                 \
            blockIdx.x = bx; threadIdx.x = tx; BODY;              \
        }                                                         \
    }

extern "C" void host_add_rows_u32(unsigned grid, unsigned block, const maskfl_u32* rows,
                                  long long k, long long width, maskfl_u32* acc)
{ MASKFL_HOST_LAUNCH(maskfl_add_rows_u32(rows, k, width, acc)) }

extern "C" void host_add_rows_u64(unsigned grid, unsigned block, const maskfl_u64* rows,
                                  long long k, long long width, maskfl_u64* acc)
{ MASKFL_HOST_LAUNCH(maskfl_add_rows_u64(rows, k, width, acc)) }

extern "C" void host_chacha20_sum_u32(unsigned grid, unsigned block, const maskfl_u32* keys,
                                      long long n_seeds, long long n_blocks, maskfl_u32 n0,
                                      maskfl_u32 n1, maskfl_u32 n2, maskfl_u32* out)
{ MASKFL_HOST_LAUNCH(maskfl_chacha20_sum_u32(keys, n_seeds, n_blocks, n0, n1, n2, out)) }

extern "C" void host_chacha20_sum_u64(unsigned grid, unsigned block, const maskfl_u32* keys,
                                      long long n_seeds, long long n_blocks, maskfl_u32 n0,
                                      maskfl_u32 n1, maskfl_u32 n2, maskfl_u64* out)
{ MASKFL_HOST_LAUNCH(maskfl_chacha20_sum_u64(keys, n_seeds, n_blocks, n0, n1, n2, out)) }
"""


def compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


class HostKernels:
    """The kernels of ``_cuda_source.SOURCE`` as host functions."""

    def __init__(self, workdir: Path, *, grid: int = 3, block: int = 5) -> None:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler")
        src = workdir / "kernels.cpp"
        lib = workdir / "kernels.so"
        src.write_text(SHIM + SOURCE + LAUNCHERS)
        subprocess.run(
            [cxx, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(src)],
            check=True,
            capture_output=True,
        )
        self._lib = ctypes.CDLL(str(lib))
        self.grid = grid
        self.block = block

    def add_rows(self, rows: npt.NDArray[Any], acc: npt.NDArray[Any]) -> None:
        """acc += rows.sum(axis=0) modulo 2^w, in place, through the kernel."""
        assert rows.flags.c_contiguous and acc.flags.c_contiguous and rows.dtype == acc.dtype
        fn = self._lib.host_add_rows_u64 if acc.dtype.itemsize == 8 else self._lib.host_add_rows_u32
        fn(
            ctypes.c_uint(self.grid),
            ctypes.c_uint(self.block),
            ctypes.c_void_p(rows.ctypes.data),
            ctypes.c_longlong(rows.shape[0]),
            ctypes.c_longlong(acc.shape[0]),
            ctypes.c_void_p(acc.ctypes.data),
        )

    def chacha20_sum(self, seeds: list[bytes], n_words: int, word_bits: int) -> npt.NDArray[Any]:
        """The sum over seeds of the libsodium deterministic stream, through the kernel."""
        keys = np.frombuffer(b"".join(seeds), dtype="<u4").copy()
        n_blocks = -(-n_words * word_bits // 8 // 64)
        per_block = 16 if word_bits == 32 else 8
        out = np.zeros(n_blocks * per_block, dtype=np.uint32 if word_bits == 32 else np.uint64)
        fn = self._lib.host_chacha20_sum_u32 if word_bits == 32 else self._lib.host_chacha20_sum_u64
        fn(
            ctypes.c_uint(self.grid),
            ctypes.c_uint(self.block),
            ctypes.c_void_p(keys.ctypes.data),
            ctypes.c_longlong(len(seeds)),
            ctypes.c_longlong(n_blocks),
            *(ctypes.c_uint(w) for w in NONCE_WORDS),
            ctypes.c_void_p(out.ctypes.data),
        )
        return out[:n_words]
