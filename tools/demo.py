"""``maskfl-demo``: a whole secured fleet on this machine trains a model, with a report.

What it does, in order (everything lands in ``--workdir``, default ``./demo-run``)::

    fleet/            maskfl-provision: fleet CA, broker TLS + ACL, coordinator and
                      device bundles (dev-001 ...) and the demo's observer identity
    logs/             one log per process: mosquitto, coordinator, every agent
    mosquitto         the generated config (mutual TLS, ACL) on a free loopback port
    agents            N processes (``maskfl-agent run`` plus a local log of the plain
                      update), each with its own bundle and non-IID digits share;
                      or, with --in-process, N asyncio tasks in this process
    coordinator       ``maskfl-coordinator run`` with round timing for a small fleet
    rounds            the demo watches over MQTT as a read-only enrolled identity,
                      evaluates every new global model on the held-out digits, and
                      prints phase times, participants, accuracy, bytes per device
    report.json/.png  per-round numbers, the plot, the privacy check, a summary

The privacy check takes one masked update exactly as the coordinator stored it and
shows that its bytes are indistinguishable from random (entropy, chi-square), next
to the same update encoded without the mask; and for every round it compares the
unmasked aggregate with the plain weighted mean of the deltas the updaters logged
locally, against the masking error bound.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL) on
the way out: at the end, on an error, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from maskfl.agent.datasources import load_dataset
from maskfl.agent.training import Evaluation, LocalTrainer
from maskfl.models import shipped_model
from maskfl.protocol.errors import ConfigError, MaskflError
from maskfl.protocol.messages import GlobalModel, RoundParams
from maskfl.protocol.round import RoundOutcome
from maskfl.protocol.version import version_text
from maskfl.tools import report as rep
from maskfl.tools._demo_findings import Findings
from maskfl.tools._demo_fleet import (
    DEMO_MIN_DEVICES,
    DEMO_MIN_UPDATES,
    DemoFleet,
    FleetSettings,
    demo_pet,
    provision_fleet,
)
from maskfl.tools._demo_processes import DemoProcesses
from maskfl.tools._demo_watch import (
    ModelEvent,
    RoundEvent,
    SumsEvent,
    coordinator_round,
    fetch_status,
    next_event,
)

__all__ = ["DemoOptions", "build_parser", "main", "run_demo"]

MARKER = ".maskfl-demo"
EXIT_USAGE = 2
EXIT_FAILED = 1


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 10
    rounds: int = 10
    model: str = "mlp"
    workdir: Path = Path("demo-run")
    in_process: bool = False
    epochs: int = 5
    alpha: float = 0.5
    timeout_s: float = 600.0
    quiet: bool = False
    dp: bool = False
    noise_multiplier: float = 0.1
    clip_norm: float = 1.0


@dataclass
class _Round:
    """What the demo has seen of one round so far."""

    round_id: int
    started: float
    params: RoundParams
    sums_at: float | None = None
    summers: int = 0
    phase_seen: dict[str, float] = field(default_factory=dict)


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.o = options
        self.root = options.workdir.resolve()
        self.logs = self.root / "logs"
        self.fleet: DemoFleet | None = None
        self.seen = Findings()
        self.procs = DemoProcesses(
            self.logs,
            devices=options.devices,
            model=options.model,
            in_process=options.in_process,
            say=self.say,
            timeline=self.seen.timeline,
        )
        self.rounds: dict[int, _Round] = {}
        self.started = time.monotonic()
        self._report_args: tuple[FleetSettings, dict[str, Any], float, float] | None = None

    def say(self, text: str) -> None:
        if not self.o.quiet:
            print(text, flush=True)

    # -- set-up ---------------------------------------------------------------------

    def _prepare_workdir(self) -> None:
        root = self.root
        if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
            raise ConfigError(
                f"--workdir {root} is not empty and was not made by maskfl-demo; "
                "choose an empty or new directory",
                field="--workdir",
            )
        for name in ("fleet", "logs", "agents", "coordinator-state", "broker-data"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in ("report.json", "report.png"):
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text("made by maskfl-demo; its contents are replaced on every run\n")

    async def run(self) -> rep.Report:
        o = self.o
        self._prepare_workdir()
        spec = shipped_model(o.model)
        trainer = await asyncio.to_thread(LocalTrainer.shipped, o.model, num_threads=1)
        initial = trainer.get_weights()
        settings = FleetSettings(
            devices=o.devices,
            model=o.model,
            num_params=spec.num_params,
            epochs=o.epochs,
            alpha=o.alpha,
        )
        x_test, y_test = await asyncio.to_thread(_held_out, settings)
        start_eval = trainer.evaluate(x_test, y_test)
        pet = demo_pet(o.devices)
        self._report_args = (settings, pet, start_eval.accuracy, start_eval.loss)
        mode = "in-process agents" if o.in_process else "agent processes"
        self.say(
            f"maskfl demo: {o.devices} devices ({mode}), {o.rounds} rounds, model {o.model} "
            f"({spec.num_params} parameters), work directory {self.root}"
        )
        fleet = await self._provision(settings, pet, initial)
        try:
            await self.procs.start(fleet)
            await self._watch_rounds(fleet, trainer, x_test, y_test, initial)
        finally:
            await self.procs.stop()
        return self._report(settings, pet, start_eval.accuracy, start_eval.loss)

    async def _provision(
        self, settings: FleetSettings, pet: dict[str, Any], initial: npt.NDArray[np.float32]
    ) -> DemoFleet:
        """The fleet's CA, broker TLS and ACL, coordinator and device bundles (with DP
        when asked)."""
        o = self.o
        t = time.monotonic()
        privacy: dict[str, Any] = {}
        if o.dp:
            privacy = {
                "dp": "distributed",
                "noise_multiplier": o.noise_multiplier,
                "clip_norm": o.clip_norm,
            }
            self.say(
                f"  differential privacy: distributed discrete Gaussian, noise multiplier "
                f"{o.noise_multiplier:g}, clip norm {o.clip_norm:g}, at least "
                f"{DEMO_MIN_UPDATES} honest updaters (epsilon per round in the report)"
            )
        else:
            self.say("  differential privacy: off (--dp turns it on)")
        fleet = await asyncio.to_thread(
            partial(provision_fleet, privacy=privacy),
            self.root,
            settings,
            pet=pet,
            initial=initial,
        )
        self.fleet = fleet
        self.seen.timeline["provision_s"] = time.monotonic() - t
        self.say(
            f"  provisioned fleet {fleet.fleet!r}: CA, broker TLS + ACL, coordinator, "
            f"{o.devices} device bundles ({self.seen.timeline['provision_s']:.1f} s)"
        )
        return fleet

    def partial_report(self) -> rep.Report | None:
        """The report of the rounds seen so far (after an interruption), if any."""
        if self._report_args is None or not self.seen.records:
            return None
        report = self._report(*self._report_args)
        report.summary["interrupted"] = True
        return report

    # -- the rounds -----------------------------------------------------------------

    async def _watch_rounds(
        self,
        fleet: DemoFleet,
        trainer: LocalTrainer,
        x_test: npt.NDArray[np.float32],
        y_test: npt.NDArray[np.int32],
        initial: npt.NDArray[np.float32],
    ) -> None:
        o = self.o
        assert self.procs.observer is not None
        previous = initial
        deadline = time.monotonic() + o.timeout_s
        last_progress = time.monotonic()
        next_status = 0.0
        completed = 0
        while completed < o.rounds:
            now = time.monotonic()
            if now > deadline:
                raise MaskflError(
                    f"only {completed} of {o.rounds} rounds completed within {o.timeout_s:.0f} s; "
                    f"see the logs in {self.logs}"
                )
            if now - last_progress > 180.0:
                raise MaskflError(f"no progress for 180 s; see the logs in {self.logs}")
            self.procs.check()
            if now >= next_status:
                next_status = now + 0.25
                await self._poll_status(fleet)
            event = await next_event(self.procs.observer.events, 0.25)
            if event is None:
                continue
            last_progress = time.monotonic()
            match event:
                case RoundEvent():
                    await self._on_round(event, fleet)
                case SumsEvent():
                    r = self.rounds.get(event.round_id)
                    if r is not None:
                        r.sums_at, r.summers = event.at, len(event.summers)
                case ModelEvent():
                    previous = await self._on_model(
                        event,
                        fleet=fleet,
                        trainer=trainer,
                        x_test=x_test,
                        y_test=y_test,
                        previous=previous,
                    )
                    completed += 1

    async def _on_round(self, event: RoundEvent, fleet: DemoFleet) -> None:
        for rid, seen in list(self.rounds.items()):
            if (
                rid < event.round_id
                and rid not in self.seen.failed_rounds
                and not any(rec.round_id == rid for rec in self.seen.records)
            ):
                self.seen.failed_rounds.append(rid)
                row = await asyncio.to_thread(coordinator_round, fleet.coordinator_state, rid)
                reason = (row.detail if row is not None else None) or "see coordinator.log"
                phases = rep.phase_times(row.phases if row is not None else None)
                self.seen.records.append(
                    rep.RoundReport(
                        round_id=rid,
                        outcome=RoundOutcome.FAILED,
                        model_version=None,
                        participants=0,
                        summers=seen.summers,
                        accuracy=None,
                        loss=None,
                        seconds=None,
                        bytes_per_device=0.0,
                        phases=phases,
                        reason=reason,
                    )
                )
                self.say(f"round {rid:3d} | {_phase_text(phases)} | failed: {reason}")
        self.rounds[event.round_id] = _Round(event.round_id, event.at, event.params)
        self.seen.mask = event.params.mask

    async def _poll_status(self, fleet: DemoFleet) -> None:
        status = await fetch_status(fleet.http_port, 0.5)
        if not status:
            return
        rid, phase = status.get("round_id"), status.get("phase")
        r = self.rounds.get(rid) if isinstance(rid, int) else None
        if r is not None and isinstance(phase, str):
            r.phase_seen.setdefault(phase, time.monotonic())

    async def _on_model(
        self,
        event: ModelEvent,
        *,
        fleet: DemoFleet,
        trainer: LocalTrainer,
        x_test: npt.NDArray[np.float32],
        y_test: npt.NDArray[np.int32],
        previous: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.float32]:
        model: GlobalModel = event.model
        rid = int(model.round_id)
        weights = np.array(model.weights, dtype=np.float32)

        def evaluate() -> Evaluation:
            trainer.set_weights(weights)
            return trainer.evaluate(x_test, y_test)

        ev = await asyncio.to_thread(evaluate)
        metrics = event.metrics
        r = self.rounds.get(rid)
        started = r.started if r is not None else event.at
        # The coordinator's own phase log (the model is published after the round's
        # row is committed, so it is complete here).
        row = await asyncio.to_thread(coordinator_round, fleet.coordinator_state, rid)
        phases = rep.phase_times(row.phases if row is not None else None)
        sent, updater_bytes, summer_bytes = self.seen.bytes_sent(fleet, rid)
        participant_bytes = updater_bytes + summer_bytes
        record = rep.RoundReport(
            round_id=rid,
            model_version=model.version,
            participants=int(metrics.get("updates", 0)),
            summers=int(metrics.get("summers", r.summers if r else 0)),
            accuracy=ev.accuracy,
            loss=ev.loss,
            seconds=event.at - started,
            bytes_per_device=float(np.mean(participant_bytes)) if participant_bytes else 0.0,
            phases=phases,
            outcome=RoundOutcome.COMPLETED,
            **_published_metrics(metrics),
        )
        self.seen.records.append(record)
        if self.procs.sampler is not None:
            await self.procs.sampler.refresh()
        check = self.seen.check_round(
            fleet,
            self.procs.sampler,
            rid=rid,
            previous=previous,
            current=weights,
            metrics=metrics,
            sent=sent,
        )
        self._say_completed(record, check, updater_bytes)
        return weights

    def _say_completed(
        self, record: rep.RoundReport, check: rep.AggregateCheck | None, updater_bytes: list[int]
    ) -> None:
        """The console line of a completed round."""
        phase_text = _phase_text(record.phases)
        fleet_text = ""
        if record.fleet_accuracy is not None:
            fleet_text = (
                f" | fleet accuracy of v{record.evaluated_version} {record.fleet_accuracy:.3f} "
                f"({record.fleet_examples} held-out, masked)"
            )
        agg = ""
        if record.epsilon is not None:
            agg = f" | epsilon {record.epsilon:.3g} (delta {record.delta:g})"
        if check is not None:
            same = "=" if check.within else "!="
            agg = f" | aggregate {same} plain mean (max diff {check.max_abs_difference:.1e})"
        self.say(
            f"round {record.round_id:3d} | {phase_text} | {record.summers} summers, "
            f"{record.participants} updates"
            f" | accuracy {record.accuracy:.3f} loss {record.loss:.3f}{fleet_text}"
            f" | {record.seconds:.1f} s"
            f" | {_kb(float(np.mean(updater_bytes)) if updater_bytes else 0.0)} per updater{agg}"
        )

    # -- shutdown and report ----------------------------------------------------------

    def _report(
        self, settings: FleetSettings, pet: dict[str, Any], acc0: float, loss0: float
    ) -> rep.Report:
        return self.seen.report(
            self._config(settings, pet),
            fleet=self.fleet,
            sampler=self.procs.sampler,
            initial=(acc0, loss0),
            model_float32_bytes=4 * int(shipped_model(self.o.model).num_params),
            total_seconds=time.monotonic() - self.started,
        )

    def _config(self, settings: FleetSettings, pet: dict[str, Any]) -> dict[str, Any]:
        """The report's ``config``: what this run was."""
        o = self.o
        return {
            "title": f"maskfl demo: {o.devices} devices, {o.model}",
            "devices": o.devices,
            "rounds": o.rounds,
            "model": o.model,
            "in_process": o.in_process,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "partition": f"{settings.partition}(alpha={settings.alpha})",
            "pet": pet,
            "mask": None
            if self.seen.mask is None
            else {
                "word_bits": self.seen.mask.word_bits,
                "bound": self.seen.mask.bound,
                "n_max": self.seen.mask.n_max,
                "resolution": self.seen.mask.resolution,
            },
            "workdir": str(self.root),
            "cpus": os.cpu_count(),
        }


def _published_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """The record's fields from the model's metrics: the fleet's evaluation of the version
    the round started from, and the privacy spent (None where the round had none)."""
    return {
        "fleet_accuracy": metrics.get("accuracy"),
        "fleet_loss": metrics.get("loss"),
        "fleet_examples": None if "examples" not in metrics else int(metrics["examples"]),
        "evaluated_version": None
        if "evaluated_version" not in metrics
        else int(metrics["evaluated_version"]),
        "epsilon": metrics.get("epsilon"),
        "epsilon_round": metrics.get("epsilon_round"),
        "delta": metrics.get("delta"),
    }


def _held_out(settings: FleetSettings) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """The digits test split the demo checks each round's model on."""
    data = load_dataset(
        "digits",
        {
            "shard": 0,
            "shards": settings.shards,
            "partition": settings.partition,
            "alpha": settings.alpha,
            "seed": settings.data_seed,
            "min_samples": settings.min_samples,
        },
    )
    return data.x_test, data.y_test


def _phase_text(phases: dict[str, float | None]) -> str:
    """The console's phase column: every phase, always in the same shape."""
    return " ".join(f"{k} {'-' if v is None else f'{v:.1f}s':>5}" for k, v in phases.items())


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} kB"


async def run_demo(options: DemoOptions) -> tuple[rep.Report, Path, Path]:
    """Run the demo; returns the report and the paths of report.json and report.png."""
    demo = Demo(options)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        report = await demo.run()
    except (asyncio.CancelledError, KeyboardInterrupt):
        partial = demo.partial_report()
        if partial is not None:
            json_path, _ = partial.write(demo.root)
            print(f"\nmaskfl-demo: report of the rounds so far: {json_path}", file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    json_path, png_path = report.write(demo.root)
    return report, json_path, png_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-demo",
        description="Run a secured maskfl fleet on this machine (mosquitto with TLS + ACL, "
        "coordinator, agents) for a few rounds; write report.json and report.png.",
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-demo"))
    parser.add_argument(
        "--devices",
        type=int,
        default=10,
        help="number of devices (default 10, at least 4; more than 50 need --in-process; "
        "beyond 700 devices share the digits data, device i training on shard i mod 700)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="completed rounds (default 10)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="default mlp")
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"), help="default ./demo-run")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the agents as asyncio tasks in this process (for hundreds of devices)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round (default 5)")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration (default 0.5)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds (600)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument(
        "--dp",
        action="store_true",
        help="train with distributed differential privacy (privacy.dp = distributed); "
        "report.json/png show accuracy against epsilon per round",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=0.1,
        help="with --dp: aggregate noise std / clip norm (default 0.1: a handful of "
        "devices cannot afford more; epsilon is large, see the report)",
    )
    parser.add_argument(
        "--clip-norm", type=float, default=1.0, help="with --dp: L2 clip norm (default 1.0)"
    )
    return parser


def _check(args: argparse.Namespace) -> DemoOptions:
    if args.devices < DEMO_MIN_DEVICES:
        raise ConfigError(
            f"--devices must be at least {DEMO_MIN_DEVICES}: a round needs a summer and "
            f"{DEMO_MIN_DEVICES - 1} updaters (the privacy floor, privacy.min_updates)",
            field="--devices",
        )
    if not 1 <= args.rounds <= 1000:
        raise ConfigError("--rounds must be between 1 and 1000", field="--rounds")
    if not args.in_process and args.devices > 50:
        raise ConfigError(
            f"--devices {args.devices} as separate processes is too many for one machine; "
            "add --in-process",
            field="--devices",
        )
    if not 1 <= args.epochs <= 100:
        raise ConfigError("--epochs must be between 1 and 100", field="--epochs")
    if not args.alpha > 0:
        raise ConfigError("--alpha must be > 0", field="--alpha")
    if not 0 < args.noise_multiplier <= 1e4:
        raise ConfigError("--noise-multiplier must be in (0, 10000]", field="--noise-multiplier")
    if not args.clip_norm > 0:
        raise ConfigError("--clip-norm must be > 0", field="--clip-norm")
    return DemoOptions(
        devices=args.devices,
        rounds=args.rounds,
        model=args.model,
        workdir=args.workdir,
        in_process=args.in_process,
        epochs=args.epochs,
        alpha=args.alpha,
        timeout_s=args.timeout,
        quiet=args.quiet,
        dp=args.dp,
        noise_multiplier=args.noise_multiplier,
        clip_norm=args.clip_norm,
    )


def print_summary(report: rep.Report, json_path: Path, png_path: Path) -> None:
    s = report.summary
    p = report.privacy
    print("\nsummary")
    acc = s.get("final_accuracy")
    print(
        f"  rounds: {s['rounds_completed']} completed, {s['rounds_failed']} failed; "
        f"total {s['total_seconds']:.1f} s"
    )
    if acc is not None:
        print(
            f"  accuracy on held-out digits: {s['initial_accuracy']:.3f} -> {acc:.3f} "
            f"(best {s['best_accuracy']:.3f})"
        )
    fleet = s.get("fleet_evaluation") or []
    if fleet:
        first, last = fleet[0], fleet[-1]
        print(
            f"  fleet accuracy (federated evaluation, only fleet totals unmasked): "
            f"v{first['model_version']} {first['fleet_accuracy']:.3f} -> "
            f"v{last['model_version']} {last['fleet_accuracy']:.3f} "
            f"on {last['examples']} held-out examples of the updaters"
        )
    if s.get("round_seconds_mean") is not None:
        print(
            f"  round time: mean {s['round_seconds_mean']:.2f} s, "
            f"max {s['round_seconds_max']:.2f} s"
        )
    if s.get("bytes_per_updater_per_round") is not None:
        print(
            f"  bytes sent per updater per round: {s['bytes_per_updater_per_round']:.0f} "
            f"(float32 model: {s['model_float32_bytes']} bytes); per device per round, all "
            f"devices: {s['bytes_per_device_per_round']:.0f}"
        )
    stored = p.get("stored_update")
    if stored:
        m, e = stored["masked"], stored["same_update_encoded_unmasked"]
        print(
            f"  privacy: update of {stored['device']} (round {stored['round_id']}) as stored: "
            f"{m['entropy_bits_per_byte']:.4f} bits/byte, chi-square {m['chi_square']:.0f} "
            f"(255 dof, p = {m['p_value']:.2f}); the same update unmasked: "
            f"{e['entropy_bits_per_byte']:.2f} bits/byte, chi-square {e['chi_square']:.0f}"
        )
    checks = p.get("aggregate_checks", [])
    if checks:
        worst = max(c["max_abs_difference"] for c in checks)
        bound = max(c["tolerance"] for c in checks)
        verdict = "matches" if p.get("aggregate_matches_plain_mean") else "DOES NOT match"
        print(
            f"  aggregate {verdict} the plain weighted mean of the agents' logged deltas in "
            f"{len(checks)} rounds (max difference {worst:.2e}, bound {bound:.2e})"
        )
    print(f"  report: {json_path}\n          {png_path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = _check(args)
        report, json_path, png_path = asyncio.run(run_demo(options))
    except ConfigError as exc:
        print(f"maskfl-demo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(
            "\nmaskfl-demo: interrupted; every process it started has been stopped", file=sys.stderr
        )
        return 130
    except MaskflError as exc:
        print(f"maskfl-demo: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(report, json_path, png_path)
    return 0


def report_json(path: Path) -> dict[str, Any]:
    """Read a demo's report.json (for tests and tooling)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


if __name__ == "__main__":
    sys.exit(main())
