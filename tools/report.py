"""The demo's report: per-round numbers, the privacy check, and the plot.

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


@dataclass(frozen=True)
class RoundRecord:
    """What the demo saw of one round."""

    round_id: int
    model_version: int
    participants: int
    summers: int
    accuracy: float
    loss: float
    seconds: float
    bytes_per_device: float
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each phase, as far as the demo could see them."""


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
    rounds: list[RoundRecord] = field(default_factory=list)
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
            failed=[int(r) for r in self.summary.get("failed_rounds", [])],
            initial=None if acc0 is None or loss0 is None else (float(acc0), float(loss0)),
        )
        return json_path, png_path


def plot(
    rounds: list[RoundRecord],
    path: Path,
    *,
    title: str,
    failed: list[int] | None = None,
    initial: tuple[float, float] | None = None,
) -> None:
    """Global accuracy and loss per round, and participants per round, in one PNG.

    ``initial`` (accuracy, loss of the initial model) is drawn at round 0; ``failed``
    rounds are marked with a red x on the participants axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.round_id for r in rounds]
    accuracy = [r.accuracy for r in rounds]
    losses = [r.loss for r in rounds]
    line_xs = xs
    if initial is not None:
        line_xs = [0, *xs]
        accuracy = [initial[0], *accuracy]
        losses = [initial[1], *losses]
    fig, (ax_acc, ax_part) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax_acc.plot(line_xs, accuracy, "o-", color="tab:blue", label="accuracy")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(line_xs, losses, "s--", color="tab:red", label="loss")
    ax_loss.set_ylabel("test loss")
    lines = ax_acc.get_lines() + ax_loss.get_lines()
    ax_acc.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    ax_acc.set_title(title)
    ax_part.bar(xs, [r.participants for r in rounds], color="tab:green", label="updaters")
    ax_part.bar(
        xs,
        [r.summers for r in rounds],
        bottom=[r.participants for r in rounds],
        color="tab:orange",
        label="summers",
    )
    if failed:
        ax_part.plot(
            failed, [0.3] * len(failed), "x", color="tab:red", markersize=10, label="failed round"
        )
    ax_part.set_xlabel("round")
    ax_part.set_ylabel("devices")
    ax_part.legend(loc="upper left")
    ax_part.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
