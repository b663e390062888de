"""The CUDA C of the CuPy backend, compiled for the CPU, against numpy and libsodium.

Runs wherever a C++ compiler exists (the GPU is not needed to check arithmetic);
the ``gpu`` tests in test_parity.py run the same source through NVRTC on a device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import randombytes_buf_deterministic

from maskfl.protocol.masking import aggregate_mask
from tests.aggregator_gpu.cuda_on_cpu import HostKernels, compiler

VECTORS = Path("/work/shared/vectors/mask_stream.json")
REPO_VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors" / "mask_stream.json"

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler to build the kernels")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    return HostKernels(tmp_path_factory.mktemp("cuda_on_cpu"), grid=3, block=5)


@settings(max_examples=30, deadline=None)
@given(
    word_bits=st.sampled_from([32, 64]),
    k=st.integers(1, 9),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_add_rows_is_the_modular_column_sum(
    kernels: HostKernels, word_bits: int, k: int, width: int, seed: int
) -> None:
    dtype = np.uint32 if word_bits == 32 else np.uint64
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    rows = rng.integers(top - 3, top, size=(k, width), dtype=dtype, endpoint=True)
    rows[:, ::2] = rng.integers(0, top, size=rows[:, ::2].shape, dtype=dtype, endpoint=True)
    acc = rng.integers(0, top, size=width, dtype=dtype, endpoint=True)
    expected = [
        (int(acc[i]) + sum(int(r[i]) for r in rows)) % (1 << word_bits) for i in range(width)
    ]
    kernels.add_rows(rows, acc)
    assert acc.tolist() == expected


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("n_words", [1, 2, 7, 8, 15, 16, 17, 33, 1000])
def test_chacha20_kernel_is_libsodium(kernels: HostKernels, word_bits: int, n_words: int) -> None:
    seed = bytes(range(32))
    dtype = "<u4" if word_bits == 32 else "<u8"
    reference = np.frombuffer(
        randombytes_buf_deterministic(n_words * word_bits // 8, seed), dtype=dtype
    )
    assert kernels.chacha20_sum([seed], n_words, word_bits).tolist() == reference.tolist()


@pytest.mark.parametrize("word_bits", [32, 64])
def test_chacha20_kernel_sums_seeds_like_the_protocol(kernels: HostKernels, word_bits: int) -> None:
    rng = np.random.default_rng(9)
    seeds = [rng.bytes(32) for _ in range(5)]
    expected = aggregate_mask(seeds, 301, word_bits)  # type: ignore[arg-type]
    assert kernels.chacha20_sum(seeds, 301, word_bits).tolist() == expected.tolist()


def test_chacha20_kernel_matches_the_shared_vectors(kernels: HostKernels) -> None:
    path = REPO_VECTORS if REPO_VECTORS.exists() else VECTORS
    if not path.exists():
        pytest.skip(f"no mask stream vectors at {REPO_VECTORS} or {VECTORS}")
    cases = json.loads(path.read_text())["cases"]
    assert cases
    for case in cases:
        seed = bytes.fromhex(case["seed_hex"])
        assert kernels.chacha20_sum([seed], 8, 64).tolist() == case["first_8_words_u64"]
        assert kernels.chacha20_sum([seed], 8, 32).tolist() == case["first_8_words_u32"]
