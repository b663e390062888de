"""report.png: the demo's rounds in one figure (accuracy and loss, participants and round
time, failed rounds shaded, accuracy against epsilon with differential privacy)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskfl.protocol.round import RoundOutcome

if TYPE_CHECKING:
    from maskfl.tools.report import RoundReport


def plot(
    rounds: list[RoundReport],
    path: Path,
    *,
    title: str,
    initial: tuple[float, float] | None = None,
    privacy: str | None = None,
) -> None:
    """Accuracy and loss per round (the demo's held-out check and the fleet's masked
    evaluation), and participants and round time per round, in one PNG.

    A failed round is shaded across both panels, with its reason in the legend; no
    line is drawn across it. Legends sit beside the axes, never on the data. The title
    counts the rounds the x axis shows; the privacy verdict is printed under it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(rounds, key=lambda r: r.round_id)
    completed = [r for r in ordered if r.outcome is RoundOutcome.COMPLETED]
    failed = [r for r in ordered if r.outcome is not RoundOutcome.COMPLETED]
    # With differential privacy, a third panel: accuracy against the cumulative epsilon.
    private = [r for r in completed if r.epsilon is not None and r.accuracy is not None]
    ax_eps = None
    ax_acc: Any
    ax_part: Any
    if private:
        fig = plt.figure(figsize=(11, 11))
        ax_acc = fig.add_subplot(3, 1, 1)
        ax_part = fig.add_subplot(3, 1, 2, sharex=ax_acc)
        ax_eps = fig.add_subplot(3, 1, 3)
    else:
        fig, (ax_acc, ax_part) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    xs = [0, *(r.round_id for r in ordered)]
    ax_loss = _accuracy_panel(ax_acc, ordered, xs, initial)
    ax_time = _participants_panel(ax_part, ordered, completed)
    _legends(ax_acc, ax_loss, ax_part, ax_time, _shade_failures(failed, (ax_acc, ax_part)))
    last = max(xs)
    ax_part.set_xlim(-0.6, last + 0.6)
    ax_part.set_xticks(range(0, last + 1, max(1, (last + 9) // 10)))
    fig.suptitle(
        f"{title}: {len(completed)} rounds completed, {len(failed)} failed "
        f"(round 0 = the initial model)",
        fontsize=11,
    )
    if privacy:
        fig.text(0.5, 0.005, privacy, ha="center", va="bottom", fontsize=8, wrap=True)
    if ax_eps is not None:
        _epsilon_panel(ax_eps, private)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _accuracy_panel(
    ax_acc: Any, ordered: list[RoundReport], xs: list[int], initial: tuple[float, float] | None
) -> Any:
    """Accuracy (left axis) and loss (right axis, returned) per round: the demo's
    held-out check and the fleet's masked evaluation; round 0 is the initial model."""
    nan = float("nan")
    held_acc = [initial[0] if initial else nan] + [
        nan if r.accuracy is None else r.accuracy for r in ordered
    ]
    held_loss = [initial[1] if initial else nan] + [
        nan if r.loss is None else r.loss for r in ordered
    ]
    # The fleet's evaluation of version v is drawn where v came out: round 0 for the
    # initial model, else the round that published v.
    where = {0: 0, **{r.model_version: r.round_id for r in ordered if r.model_version}}
    fleet: dict[int, tuple[float, float]] = {
        where[r.evaluated_version]: (
            r.fleet_accuracy,
            nan if r.fleet_loss is None else r.fleet_loss,
        )
        for r in ordered
        if r.evaluated_version in where and r.fleet_accuracy is not None
    }
    fleet_acc = [fleet.get(x, (nan, nan))[0] for x in xs]
    fleet_loss = [fleet.get(x, (nan, nan))[1] for x in xs]
    ax_acc.plot(xs, held_acc, "o-", color="tab:blue", label="accuracy, demo's held-out check")
    if any(not math.isnan(v) for v in fleet_acc):
        ax_acc.plot(
            xs, fleet_acc, "^:", color="tab:purple", label="accuracy, fleet (masked evaluation)"
        )
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(xs, held_loss, "s--", color="tab:red", label="loss, demo's held-out check")
    if any(not math.isnan(v) for v in fleet_loss):
        ax_loss.plot(xs, fleet_loss, "v:", color="tab:brown", label="loss, fleet (masked)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_ylim(bottom=0)
    return ax_loss


def _participants_panel(
    ax_part: Any, ordered: list[RoundReport], completed: list[RoundReport]
) -> Any:
    """Updates and summers per round (stacked bars) and the round time (right axis,
    returned; none for a failed round)."""
    nan = float("nan")
    part_xs = [r.round_id for r in ordered]
    ax_part.bar(part_xs, [r.participants for r in ordered], color="tab:green", label="updates")
    ax_part.bar(
        part_xs,
        [r.summers for r in ordered],
        bottom=[r.participants for r in ordered],
        color="tab:orange",
        label="summers",
    )
    ax_part.set_ylabel("devices")
    ax_part.set_xlabel("round")
    ax_part.grid(alpha=0.3, axis="y")
    ax_time = ax_part.twinx()
    ax_time.plot(
        part_xs,
        [
            nan if r.seconds is None or r.outcome is not RoundOutcome.COMPLETED else r.seconds
            for r in ordered
        ],
        "d-",
        color="tab:gray",
        label="round time (s)",
    )
    ax_time.set_ylabel("round time (s)")
    times = [r.seconds for r in completed if r.seconds is not None]
    ax_time.set_ylim(0, 1.3 * max(times) if times else 1.0)
    return ax_time


def _shade_failures(failed: list[RoundReport], axes: tuple[Any, ...]) -> list[str]:
    """Shade each failed round on ``axes``; the legend labels, one per distinct reason."""
    reasons: dict[str, None] = {}
    for r in failed:
        why = (r.reason or "failed").split(": ", 1)[-1]
        label = f"round {r.round_id} failed: {why[:70]}"
        reasons[label] = None
        for ax in axes:
            ax.axvspan(r.round_id - 0.5, r.round_id + 0.5, color="tab:red", alpha=0.15, lw=0)
    return list(reasons)


def _legends(ax_acc: Any, ax_loss: Any, ax_part: Any, ax_time: Any, reasons: list[str]) -> None:
    """Both panels' legends beside the axes; the top one names the failed rounds."""
    from matplotlib.patches import Patch

    shade = [Patch(color="tab:red", alpha=0.15, label=label) for label in reasons]
    top = ax_acc.get_lines() + ax_loss.get_lines()
    ax_acc.legend(
        [*top, *shade],
        [str(line.get_label()) for line in top] + reasons,
        loc="upper left",
        bbox_to_anchor=(1.08, 1.0),
        fontsize=8,
        frameon=False,
    )
    bottom = [*ax_part.containers, *ax_time.get_lines()]
    ax_part.legend(
        bottom,
        ["updates", "summers", "round time (s)"],
        loc="upper left",
        bbox_to_anchor=(1.08, 1.0),
        fontsize=8,
        frameon=False,
    )


def _epsilon_panel(ax_eps: Any, private: list[RoundReport]) -> None:
    """Accuracy against the cumulative epsilon, each point labelled with its round."""
    eps = [float(r.epsilon or 0.0) for r in private]
    acc = [float(r.accuracy or 0.0) for r in private]
    ax_eps.plot(eps, acc, "o-", color="tab:purple", label="accuracy, demo's held-out check")
    for r, x, y in zip(private, eps, acc, strict=True):
        ax_eps.annotate(str(r.round_id), (x, y), textcoords="offset points", xytext=(3, 3))
    ax_eps.set_xlabel(f"cumulative epsilon (delta {private[-1].delta:g}); labels: round")
    ax_eps.set_ylabel("accuracy")
    ax_eps.set_ylim(0, 1.02)
    ax_eps.grid(alpha=0.3)
    ax_eps.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
