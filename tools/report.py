"""The demo's report: per-round numbers, the privacy check, and the plot (_report_plot.py).

Kept apart from the orchestration in ``demo.py`` so the statistics can be tested
on their own and reused by benchmarks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.broker_coordinator.store import LOGGED_PHASES
from maskfl.protocol.round import RoundOutcome
from maskfl.tools._report_plot import plot

PHASES = tuple(p.value for p in LOGGED_PHASES)
"""The keys of every round's ``phases``, in order (None: the round did not reach it)."""


def phase_times(measured: dict[str, Any] | None) -> dict[str, float | None]:
    """``measured`` (the coordinator's phase durations) with exactly the keys of PHASES."""
    out: dict[str, float | None] = {}
    for key in PHASES:
        value = (measured or {}).get(key)
        out[key] = None if value is None else round(float(value), 3)
    return out


@dataclass(frozen=True)
class RoundReport:
    """What the demo saw of one round, completed or failed (every round has all fields).

    ``accuracy``/``loss`` are the demo's own check of the round's new model on held-out
    digits (None for a failed round); ``fleet_*`` the fleet's federated evaluation,
    unmasked only as a total, of the model the round started from
    (``evaluated_version``), published with the round's model.
    """

    round_id: int
    outcome: RoundOutcome
    model_version: int | None
    participants: int
    summers: int
    accuracy: float | None
    loss: float | None
    seconds: float | None
    bytes_per_device: float
    phases: dict[str, float | None] = field(default_factory=lambda: phase_times(None))
    """Seconds in each phase, from the coordinator's phase log: always the keys PHASES."""
    reason: str | None = None
    """Why a failed round failed (the coordinator's words)."""
    fleet_accuracy: float | None = None
    fleet_loss: float | None = None
    fleet_examples: int | None = None
    evaluated_version: int | None = None
    epsilon: float | None = None
    """Cumulative epsilon after this round (at ``delta``), from the signed model; None
    without differential privacy."""
    epsilon_round: float | None = None
    delta: float | None = None


@dataclass(frozen=True)
class Randomness:
    """How random a byte string looks: what a masked update should look like.

    ``entropy_bits_per_byte`` is 8 for uniform bytes; ``chi_square`` over the 256
    byte values has 255 degrees of freedom, so uniform data gives about 255 and
    ``p_value`` is not small. Plain float32 weights score far lower entropy and a
    chi-square in the hundreds of thousands.
    """

    n_bytes: int
    entropy_bits_per_byte: float
    chi_square: float
    p_value: float


def randomness(data: bytes | npt.NDArray[Any]) -> Randomness:
    raw = np.frombuffer(
        bytes(data) if not isinstance(data, np.ndarray) else data.tobytes(), np.uint8
    )
    counts = np.bincount(raw, minlength=256).astype(np.float64)
    n = float(raw.size)
    probabilities = counts[counts > 0] / n
    entropy = float(-(probabilities * np.log2(probabilities)).sum())
    expected = n / 256.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    return Randomness(
        n_bytes=int(n), entropy_bits_per_byte=entropy, chi_square=chi2, p_value=_chi2_sf(chi2, 255)
    )


def _chi2_sf(x: float, dof: int) -> float:
    """Survival function of chi-square via the Wilson-Hilferty normal approximation.

    Accurate to a few 1e-3 for 255 degrees of freedom, which is all a report needs,
    and it spares the demo a SciPy dependency.
    """
    if x <= 0:
        return 1.0
    k = float(dof)
    z = ((x / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass
class Report:
    """Everything ``report.json`` holds."""

    config: dict[str, Any]
    rounds: list[RoundReport] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config,
                "rounds": [asdict(r) for r in self.rounds],
                "privacy": self.privacy,
                "summary": self.summary,
            },
            indent=2,
        )

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / "report.json"
        json_path.write_text(self.to_json() + "\n")
        png_path = directory / "report.png"
        acc0, loss0 = self.summary.get("initial_accuracy"), self.summary.get("initial_loss")
        plot(
            self.rounds,
            png_path,
            title=str(self.config.get("title", "maskfl demo")),
            initial=None if acc0 is None or loss0 is None else (float(acc0), float(loss0)),
            privacy=privacy_verdict(self.privacy),
        )
        return json_path, png_path


def privacy_verdict(privacy: dict[str, Any]) -> str | None:
    """One line: does a stored update look random, does the aggregate match the plain mean."""
    parts = []
    stored = privacy.get("stored_update")
    if stored:
        m = stored["masked"]
        looks = "looks uniform" if stored.get("looks_random") else "DOES NOT look uniform"
        parts.append(
            f"a stored masked update {looks} ({m['entropy_bits_per_byte']:.3f} bits/byte, "
            f"chi-square p = {m['p_value']:.2f})"
        )
    checks = privacy.get("aggregate_checks") or []
    if checks:
        ok = sum(1 for c in checks if c.get("within"))
        worst = max(c["max_abs_difference"] for c in checks)
        parts.append(
            f"unmasked sum = plain weighted mean in {ok}/{len(checks)} rounds "
            f"(max diff {worst:.1e})"
        )
    return "privacy: " + "; ".join(parts) if parts else None


def plain_weighted_mean(
    updates: list[tuple[npt.NDArray[np.float32], int]], *, sample_cap: int, bound: float
) -> tuple[npt.NDArray[np.float64], float]:
    """``Σ a_k·clip(δ_k, ±B) / Σ a_k`` with ``a_k = min(samples, cap) / cap``: the FedAvg
    mean the masked round should reproduce, computed in the clear from the agents' logs."""
    if not updates:
        raise ValueError("no plain updates")
    total = np.zeros(updates[0][0].shape, np.float64)
    weight_sum = 0.0
    for delta, samples in updates:
        a = min(samples, sample_cap) / sample_cap
        total += a * np.clip(delta.astype(np.float64), -bound, bound)
        weight_sum += a
    return total / weight_sum, weight_sum


@dataclass(frozen=True)
class AggregateCheck:
    """How far the unmasked aggregate is from the plain weighted mean of the deltas.

    ``tolerance`` is the masking error bound the coordinator reported with the model
    plus one float32 ulp of the new weights (the global model is stored as float32);
    ``within`` says every element is inside it.
    """

    round_id: int
    updates: int
    max_abs_difference: float
    mean_abs_difference: float
    max_abs_mean: float
    error_bound: float
    tolerance: float
    weight_sum_plain: float
    weight_sum_decoded: float
    within: bool


def check_aggregate(
    round_id: int,
    previous: npt.NDArray[np.float32],
    current: npt.NDArray[np.float32],
    expected_mean: npt.NDArray[np.float64],
    *,
    updates: int,
    lr: float,
    error_bound: float,
    weight_sum_plain: float,
    weight_sum_decoded: float,
) -> AggregateCheck:
    """Compare the model step ``(current - previous) / lr`` (FedAvg) with the plain mean."""
    observed = (current.astype(np.float64) - previous.astype(np.float64)) / lr
    diff = np.abs(observed - expected_mean)
    ulp = np.spacing(np.abs(current).astype(np.float32)).astype(np.float64) / lr
    per_element = error_bound + ulp
    return AggregateCheck(
        round_id=round_id,
        updates=updates,
        max_abs_difference=float(diff.max()),
        mean_abs_difference=float(diff.mean()),
        max_abs_mean=float(np.abs(expected_mean).max()),
        error_bound=float(error_bound),
        tolerance=float(per_element.max()),
        weight_sum_plain=float(weight_sum_plain),
        weight_sum_decoded=float(weight_sum_decoded),
        within=bool((diff <= per_element).all()),
    )
