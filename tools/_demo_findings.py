"""What ``maskfl-demo`` learns of a run (every round seen, the aggregate checks, the
bytes sent) and the report made of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.agent.steps import Step
from maskfl.protocol.masking import MaskConfig, encode_update
from maskfl.protocol.round import RoundOutcome
from maskfl.protocol.sortition import Task
from maskfl.tools import report as rep
from maskfl.tools._demo_fleet import DemoFleet
from maskfl.tools._demo_watch import StoreSampler, journal_rounds, plain_update


@dataclass
class Findings:
    """Every round the demo saw (completed or failed), the checks of the unmasked
    aggregates against the plain means, the bytes the devices sent, the timeline."""

    records: list[rep.RoundReport] = field(default_factory=list)
    failed_rounds: list[int] = field(default_factory=list)
    checks: list[rep.AggregateCheck] = field(default_factory=list)
    unchecked: dict[int, str] = field(default_factory=dict)
    bytes_rows: list[dict[str, Any]] = field(default_factory=list)
    mask: MaskConfig | None = None
    timeline: dict[str, float] = field(default_factory=dict)

    def bytes_sent(
        self, fleet: DemoFleet, rid: int
    ) -> tuple[dict[str, dict[str, Any]], list[int], list[int]]:
        """What each device's journal says it sent in round ``rid``, and the bytes its
        updaters and summers sent (a row of the report's bytes table)."""
        journals = {d: journal_rounds(fleet.agent_state(d)) for d in fleet.device_ids}
        sent = {d: j[rid] for d, j in journals.items() if rid in j}
        updater_bytes = [
            v["bytes_sent"] for v in sent.values() if v["task"] is Task.UPDATE and v["bytes_sent"]
        ]
        summer_bytes = [
            v["bytes_sent"] for v in sent.values() if v["task"] is Task.SUM and v["bytes_sent"]
        ]
        participant_bytes = updater_bytes + summer_bytes
        self.bytes_rows.append(
            {
                "round_id": rid,
                "updater_bytes_mean": float(np.mean(updater_bytes)) if updater_bytes else 0.0,
                "summer_bytes_mean": float(np.mean(summer_bytes)) if summer_bytes else 0.0,
                "all_devices_mean": float(sum(participant_bytes)) / max(1, len(fleet.device_ids)),
            }
        )
        return sent, updater_bytes, summer_bytes

    def check_round(
        self,
        fleet: DemoFleet,
        sampler: StoreSampler | None,
        *,
        rid: int,
        previous: npt.NDArray[np.float32],
        current: npt.NDArray[np.float32],
        metrics: dict[str, float],
        sent: dict[str, dict[str, Any]],
    ) -> rep.AggregateCheck | None:
        """Unmasked aggregate vs the plain weighted mean of the included deltas."""
        if "epsilon" in metrics:
            self.unchecked[rid] = "DP noise: the aggregate is the plain mean plus noise"
            return None
        if self.mask is None or int(metrics.get("dropped", 0)) != 0:
            self.unchecked[rid] = "updates were dropped from the aggregate"
            return None
        included: set[str] = set()
        if sampler is not None:
            included = set(sampler.accepted.get(rid, set()))
        if not included:
            included = {
                d for d, v in sent.items() if v["task"] is Task.UPDATE and v["step"] is Step.DONE
            }
        plain = [plain_update(fleet.plain_log(d), rid) for d in sorted(included)]
        if not plain or any(p is None for p in plain):
            self.unchecked[rid] = "a plain update is missing from the agents' logs"
            return None
        updates = [p for p in plain if p is not None]
        if len(updates) != int(metrics.get("updates", -1)):
            self.unchecked[rid] = (
                f"{len(updates)} logged updates, the model says {metrics.get('updates')}"
            )
            return None
        expected, ws = rep.plain_weighted_mean(
            updates, sample_cap=1000, bound=float(self.mask.bound)
        )
        check = rep.check_aggregate(
            rid,
            previous,
            current,
            expected,
            updates=len(updates),
            lr=1.0,
            error_bound=float(metrics.get("error_bound", 0.0)),
            weight_sum_plain=ws,
            weight_sum_decoded=float(metrics.get("weight_sum", 0.0)),
        )
        self.checks.append(check)
        return check

    def privacy(self, fleet: DemoFleet | None, sampler: StoreSampler | None) -> dict[str, Any]:
        """The privacy check: the aggregate checks, and one stored masked update next to
        the same update unmasked and in the clear."""
        mask = self.mask
        out: dict[str, Any] = {
            "aggregate_checks": [asdict(c) for c in self.checks],
            "aggregate_matches_plain_mean": bool(self.checks)
            and all(c.within for c in self.checks),
            "aggregate_unchecked": {str(r): why for r, why in sorted(self.unchecked.items())},
        }
        if fleet is None or sampler is None or mask is None:
            return out
        for rid in sorted(sampler.samples):
            sample = sampler.samples[rid]
            plain = plain_update(fleet.plain_log(sample.device_id), rid)
            if plain is None:
                continue
            delta, samples = plain
            weight = min(samples, 1000) / 1000
            encoded = encode_update(delta, weight, mask)
            stored = rep.randomness(sample.data)
            out["stored_update"] = {
                "round_id": rid,
                "device": sample.device_id,
                "bytes": len(sample.data),
                "words": len(sample.data) // (mask.word_bits // 8),
                "word_bits": mask.word_bits,
                "source": "coordinator update log (what the coordinator stored)",
                "masked": asdict(stored),
                "same_update_encoded_unmasked": asdict(rep.randomness(encoded)),
                "same_update_plain_float32": asdict(rep.randomness(delta)),
                "looks_random": stored.entropy_bits_per_byte > 7.9 and stored.p_value > 1e-3,
            }
            break
        return out

    def report(
        self,
        config: dict[str, Any],
        *,
        fleet: DemoFleet | None,
        sampler: StoreSampler | None,
        initial: tuple[float, float],
        model_float32_bytes: int,
        total_seconds: float,
    ) -> rep.Report:
        """The report: every round, the privacy check, the summary."""
        acc0, loss0 = initial
        records = sorted(self.records, key=lambda r: r.round_id)
        done = [r for r in records if r.outcome is RoundOutcome.COMPLETED]
        report = rep.Report(config=config, rounds=records)
        report.privacy = self.privacy(fleet, sampler)
        seconds = [r.seconds for r in done if r.seconds is not None]
        evaluated = [r for r in done if r.fleet_accuracy is not None]
        upd = [b["updater_bytes_mean"] for b in self.bytes_rows if b["updater_bytes_mean"]]
        report.summary = {
            "rounds_completed": len(done),
            "rounds_failed": len(self.failed_rounds),
            "failed_rounds": sorted(self.failed_rounds),
            "initial_accuracy": acc0,
            "initial_loss": loss0,
            "final_accuracy": done[-1].accuracy if done else None,
            "best_accuracy": max((r.accuracy for r in done if r.accuracy), default=None),
            "fleet_evaluation": [
                {
                    "model_version": r.evaluated_version,
                    "fleet_accuracy": r.fleet_accuracy,
                    "fleet_loss": r.fleet_loss,
                    "examples": r.fleet_examples,
                }
                for r in evaluated
            ],
            "round_seconds_mean": float(np.mean(seconds)) if seconds else None,
            "round_seconds_max": float(np.max(seconds)) if seconds else None,
            "bytes_per_updater_per_round": float(np.mean(upd)) if upd else None,
            "bytes_per_device_per_round": float(
                np.mean([b["all_devices_mean"] for b in self.bytes_rows])
            )
            if self.bytes_rows
            else None,
            "bytes": self.bytes_rows,
            "model_float32_bytes": model_float32_bytes,
            "timeline": {k: round(v, 2) for k, v in self.timeline.items()},
            "total_seconds": round(total_seconds, 1),
        }
        return report
