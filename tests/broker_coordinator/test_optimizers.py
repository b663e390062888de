"""Server optimizers: FedAvg, FedAvgM, FedAdam, and their saved state."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from maskfl.broker_coordinator.config import OptimizerConfig, OptimizerKind
from maskfl.broker_coordinator.optimizers import ServerOptimizer

floats = st.floats(-1, 1, allow_nan=False, width=32)


@settings(max_examples=50)
@given(w=arrays(np.float32, 8, elements=floats), d=arrays(np.float64, 8, elements=floats))
def test_fedavg_with_lr_1_is_the_mean_delta(w: np.ndarray, d: np.ndarray) -> None:
    opt = ServerOptimizer(OptimizerConfig(kind=OptimizerKind.FEDAVG, lr=1.0))
    np.testing.assert_allclose(opt.step(w, d), w + d, rtol=1e-6, atol=1e-6)


def test_fedavgm_accumulates_momentum() -> None:
    opt = ServerOptimizer(OptimizerConfig(kind=OptimizerKind.FEDAVGM, lr=1.0, momentum=0.5))
    w = np.zeros(2, np.float32)
    d = np.array([1.0, -1.0])
    w = opt.step(w, d)  # v = d
    w = opt.step(w, d)  # v = 0.5 d + d
    np.testing.assert_allclose(w, [2.5, -2.5])


def test_fedadam_matches_the_formula_and_state_round_trips() -> None:
    cfg = OptimizerConfig(kind=OptimizerKind.FEDADAM, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = ServerOptimizer(cfg)
    w = np.ones(3, np.float32)
    d = np.array([0.2, -0.4, 0.0])
    out = opt.step(w, d)
    m = 0.1 * d
    v = 0.01 * d * d
    np.testing.assert_allclose(out, w + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    again = ServerOptimizer(cfg)
    again.load_state(opt.state_bytes(), 3)
    np.testing.assert_allclose(again.step(out, d), opt.step(out, d))
    fresh = ServerOptimizer(cfg)
    fresh.load_state(opt.state_bytes(), 4)  # another model length: start over
    assert fresh.state == {}


def _whole_array_step(
    kind: OptimizerKind,
    state: dict[str, np.ndarray],
    w: np.ndarray,
    d: np.ndarray,
    c: OptimizerConfig,
) -> np.ndarray:
    """The rules written over whole arrays, as before the slicing: the reference."""
    match kind:
        case OptimizerKind.FEDAVG:
            step = c.lr * d
        case OptimizerKind.FEDAVGM:
            state["v"] = c.momentum * state.get("v", np.zeros_like(d)) + d
            step = c.lr * state["v"]
        case OptimizerKind.FEDADAM:
            m = c.beta1 * state.get("m", np.zeros_like(d)) + (1.0 - c.beta1) * d
            v = c.beta2 * state.get("v", np.zeros_like(d)) + (1.0 - c.beta2) * d * d
            state["m"], state["v"] = m, v
            step = c.lr * m / (np.sqrt(v) + c.tau)
    return (w.astype(np.float64) + step).astype(np.float32)


def test_stepping_in_slices_is_bit_identical_to_whole_arrays() -> None:
    rng = np.random.default_rng(7)
    for kind in OptimizerKind:
        cfg = OptimizerConfig(kind=kind, lr=0.7, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3)
        opt, ref_state = ServerOptimizer(cfg), {}
        w = rng.standard_normal(1000).astype(np.float32)
        ref = w.copy()
        for _ in range(3):
            d = rng.standard_normal(1000) * 0.01
            w = opt.step_chunked(w, lambda part, d=d: d[part], chunk=97)
            ref = _whole_array_step(kind, ref_state, ref, d, cfg)
            assert w.tobytes() == ref.tobytes(), kind


def test_stepping_into_a_given_array_gives_the_same_weights() -> None:
    """``out=`` (the unmask phase steps into the next message's buffer) changes where the
    weights go, not what they are; the old weights stay as they were."""
    rng = np.random.default_rng(8)
    for kind in OptimizerKind:
        cfg = OptimizerConfig(kind=kind, lr=0.7, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3)
        fresh, into = ServerOptimizer(cfg), ServerOptimizer(cfg)
        w = rng.standard_normal(1000).astype(np.float32)
        before = w.copy()
        for _ in range(3):
            d = rng.standard_normal(1000) * 0.01
            want = fresh.step_chunked(w, lambda part, d=d: d[part], chunk=97)
            buffer = bytearray(8 + 4000)
            out = np.frombuffer(buffer, "<f4", 1000, 8)
            got = into.step_chunked(w, lambda part, d=d: d[part], chunk=97, out=out)
            assert got is out and out.tobytes() == want.tobytes(), kind
            assert w.tobytes() == before.tobytes()
            w = before = want
