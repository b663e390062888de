"""Server optimizers: how the unmasked mean delta moves the global model.

The round produces ``Δ = Σ a_k·δ_k / Σ a_k`` (clients send deltas, so this is a
pseudo-gradient with the sign of an improvement). Three rules (Reddi et al.,
"Adaptive Federated Optimization", 2021):

- FedAvg:  ``w ← w + lr·Δ`` (lr = 1 is plain federated averaging);
- FedAvgM: ``v ← momentum·v + Δ;  w ← w + lr·v``;
- FedAdam: ``m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;  w ← w + lr·m / (√v + τ)``.

The state (``v``, ``m``) is saved with every model version in the registry, so
a restart continues with the same momentum.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from maskfl.broker_coordinator.config import OptimizerConfig, OptimizerKind
from maskfl.protocol.errors import StorageError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class ServerOptimizer:
    """One of the three rules, with its state (float64 moments)."""

    config: OptimizerConfig
    state: dict[str, F64] = field(default_factory=dict)

    def step(self, weights: F32, mean_delta: F64) -> F32:
        """The next global weights; updates the optimizer state."""
        c = self.config
        delta = np.asarray(mean_delta, dtype=np.float64)
        match c.kind:
            case OptimizerKind.FEDAVG:
                step = c.lr * delta
            case OptimizerKind.FEDAVGM:
                v = self.state.get("v", np.zeros_like(delta))
                v = c.momentum * v + delta
                self.state["v"] = v
                step = c.lr * v
            case OptimizerKind.FEDADAM:
                m = self.state.get("m", np.zeros_like(delta))
                v = self.state.get("v", np.zeros_like(delta))
                m = c.beta1 * m + (1.0 - c.beta1) * delta
                v = c.beta2 * v + (1.0 - c.beta2) * delta * delta
                self.state["m"], self.state["v"] = m, v
                step = c.lr * m / (np.sqrt(v) + c.tau)
        return (weights.astype(np.float64) + step).astype(np.float32)

    def state_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.state)  # type: ignore[arg-type]
        return buf.getvalue()

    def load_state(self, data: bytes | None, length: int) -> None:
        """Restore the moments saved with a model version (ignored if of another length)."""
        self.state = {}
        if not data:
            return
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                loaded = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
        except (OSError, ValueError) as exc:
            raise StorageError(f"optimizer state in the registry is unreadable: {exc}") from exc
        if all(v.shape == (length,) for v in loaded.values()):
            self.state = loaded
