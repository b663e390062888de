"""``maskfl-bench agent-train``: on-device training cost of every shipped model.

Per model: parameter count and file size, the median time of one ``train`` step at the
configured batch size (an epoch over the training split timed by the trainer's own loop,
divided by its steps), the time of one local round (``epochs`` passes over one device's
digits share, as the agent runs it: set weights, train, delta), the test accuracy after
a few epochs on the whole training split, and the peak RSS of a fresh Python process
that loads the model and runs a local round, alone and with the agent's other runtime
libraries imported (the target is an agent with the MLP under 150 MB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from maskfl.agent.datasources.digits import DigitsSource
from maskfl.agent.training import RUNTIME, LocalTrainer
from maskfl.models import shipped_models

__all__ = ["add_parser", "run"]

RSS_TARGET_MB = 150.0

# Run in a fresh interpreter: load the model, take a digits share, one local round.
_RSS_PROBE = """
import json, sys
extra = sys.argv[2] == "1"
if extra:  # what the agent daemon imports besides training
    for name in ("paho.mqtt.client", "aiosqlite", "pydantic_settings", "nacl.bindings",
                 "cryptography.hazmat.primitives.asymmetric.ed25519", "maskfl.protocol.masking",
                 "maskfl.agent.config"):
        try:
            __import__(name)
        except ImportError:
            pass
from maskfl.agent.datasources import load_dataset
from maskfl.agent.training import LocalTrainer
data = load_dataset("digits", {"shard": 0, "shards": int(sys.argv[3])})
trainer = LocalTrainer.shipped(sys.argv[1])
update = trainer.local_update(trainer.get_weights(), data.x_train, data.y_train,
                              epochs=int(sys.argv[4]), batch_size=32, seed=0)
trainer.evaluate(data.x_test, data.y_test)
print(json.dumps({"peak_kb": peak_kb(), "modules": len(sys.modules)}))
"""

# VmHWM is the peak RSS of this process image; ru_maxrss would also count the parent's
# pages at fork time (Linux keeps it across exec), so it is only the fallback.
_PEAK_KB = """
import resource
def peak_kb():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent-train", help="on-device training: step time, local round, peak RSS per model"
    )
    parser.add_argument("--json", help="write the JSON here instead of stdout")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=10, help="devices sharing the digits")
    parser.add_argument(
        "--timed-epochs", type=int, default=10, help="epochs over the train split timed per model"
    )
    parser.add_argument("--rounds", type=int, default=5, help="local rounds timed per model")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads")
    return parser


def _defaults() -> argparse.Namespace:
    sub = argparse.ArgumentParser().add_subparsers()
    return add_parser(sub).parse_args([])


def _peak_rss_mb(model: str, *, with_agent_libs: bool, devices: int, epochs: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_KB + _RSS_PROBE,
            model,
            "1" if with_agent_libs else "0",
            str(devices),
            str(epochs),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(probe["peak_kb"] / 1024, 1), "modules": probe["modules"]}


def _baseline_rss_mb() -> float:
    code = _PEAK_KB + "import numpy\nprint(peak_kb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def _bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    source = DigitsSource(seed=0)
    whole = source.load(0, 1)
    share = source.load(0, args.devices)
    trainer = LocalTrainer.shipped(name, num_threads=args.threads)
    b = args.batch_size

    # one train step: epochs over the whole training split, timed by the trainer's loop
    per_step = []
    for seed in range(args.timed_epochs):
        stats = trainer.train(whole.x_train, whole.y_train, epochs=1, batch_size=b, seed=seed)
        per_step.append(stats.seconds / stats.steps)

    # a local round as the agent runs it
    start_weights = trainer.get_weights()
    rounds = []
    for seed in range(args.rounds):
        start = time.perf_counter()
        trainer.local_update(
            start_weights,
            share.x_train,
            share.y_train,
            epochs=args.epochs,
            batch_size=b,
            seed=seed,
        )
        rounds.append(time.perf_counter() - start)

    # how good it gets: 5 epochs on the whole training split from the shipped weights
    trainer.set_weights(start_weights)
    trainer.train(whole.x_train, whole.y_train, epochs=5, batch_size=b, seed=0)
    accuracy = trainer.evaluate(whole.x_test, whole.y_test).accuracy

    entry = next(m for m in shipped_models() if m.name == name)
    return {
        "num_params": trainer.spec.num_params,
        "file_bytes": entry.size,
        "train_step_ms_median": round(statistics.median(per_step) * 1e3, 4),
        "train_step_ms_min": round(min(per_step) * 1e3, 4),
        "local_round": {
            "samples": share.num_train,
            "epochs": args.epochs,
            "batch_size": b,
            "ms_median": round(statistics.median(rounds) * 1e3, 3),
        },
        "test_accuracy_after_5_epochs_full_train": round(accuracy, 4),
        "process_trainer_only": _peak_rss_mb(
            name, with_agent_libs=False, devices=args.devices, epochs=args.epochs
        ),
        "process_with_agent_libs": _peak_rss_mb(
            name, with_agent_libs=True, devices=args.devices, epochs=args.epochs
        ),
    }


def run(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Measure every shipped model; ``args`` default to the subcommand's defaults."""
    args = args if args is not None else _defaults()
    models = {m.name: _bench_model(m.name, args) for m in shipped_models()}
    mlp_rss = models.get("mlp", {}).get("process_with_agent_libs", {}).get("peak_rss_mb")
    return {
        "runtime": RUNTIME,
        "threads": args.threads,
        "baseline_python_numpy_rss_mb": _baseline_rss_mb(),
        "rss_target_mb": RSS_TARGET_MB,
        "mlp_within_rss_target": mlp_rss is not None and mlp_rss < RSS_TARGET_MB,
        "models": models,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
