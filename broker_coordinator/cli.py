"""``maskfl-coordinator``: run the service, inspect its state, export models.

::

    maskfl-coordinator run --config coordinator.toml
    maskfl-coordinator status --config coordinator.toml [--json]
    maskfl-coordinator models list --config coordinator.toml [--json]
    maskfl-coordinator models export --config coordinator.toml [--version N] --out model.npy

User errors (a bad config, a missing file, an unknown version) print one line
to stderr and exit with status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.broker_coordinator.config import CoordinatorConfig, load_config
from maskfl.broker_coordinator.logs import setup_logging
from maskfl.broker_coordinator.service import Coordinator, state_db
from maskfl.broker_coordinator.store import Store
from maskfl.protocol.errors import ConfigError, MaskflError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-coordinator",
        description="Run the maskfl coordinator, inspect its state, export global models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the coordinator service")
    run.add_argument("--config", required=True, type=Path)
    status = sub.add_parser("status", help="show rounds and the latest model from the database")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true")
    models = sub.add_parser("models", help="the global model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list", help="every version with digest and metrics")
    mlist.add_argument("--config", required=True, type=Path)
    mlist.add_argument("--json", action="store_true")
    export = msub.add_parser("export", help="write one version's weights as .npy")
    export.add_argument("--config", required=True, type=Path)
    export.add_argument("--version", type=int, default=None, help="default: the latest")
    export.add_argument("--out", required=True, type=Path)
    return parser


async def _run(config: CoordinatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Coordinator(config).run(stop)


def _open_existing(config: CoordinatorConfig) -> Path:
    db = state_db(config)
    if not db.exists():
        raise ConfigError(
            f"storage.dir: no coordinator database at {db}; has the coordinator run with this "
            "config?",
            field="storage.dir",
        )
    return db


async def _status(config: CoordinatorConfig, as_json: bool) -> None:
    async with Store.open(_open_existing(config)) as store:
        rounds = await store.rounds(10)
        latest = await store.latest_model(config.model.id)
        devices = await store.device_count()
    data: dict[str, Any] = {
        "fleet": config.fleet.id,
        "devices_enrolled_seen": devices,
        "model": None
        if latest is None
        else {"id": latest.model_id, "version": latest.version, "digest": latest.digest.hex()},
        "rounds": [
            {
                "round_id": r.round_id,
                "phase": r.phase,
                "outcome": r.outcome,
                "detail": r.detail,
                "model_version": r.model_version,
                "p_sum": r.p_sum,
                "p_update": r.p_update,
            }
            for r in rounds
        ],
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(f"fleet {data['fleet']}: {devices} devices seen")
    if latest is not None:
        print(f"model {latest.model_id} v{latest.version} digest {latest.digest.hex()[:16]}")
    for r in data["rounds"]:
        outcome = r["outcome"] or f"in progress ({r['phase']})"
        extra = f": {r['detail']}" if r["detail"] else ""
        print(f"round {r['round_id']}: {outcome}{extra}")


async def _models_list(config: CoordinatorConfig, as_json: bool) -> None:
    async with Store.open(_open_existing(config)) as store:
        models = await store.models()
    rows: list[dict[str, Any]] = [
        {
            "model_id": m.model_id,
            "version": m.version,
            "round_id": m.round_id,
            "digest": m.digest.hex(),
            "created_at": m.created_at,
            "metrics": m.metrics,
        }
        for m in models
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        metrics = " ".join(f"{k}={v:g}" for k, v in sorted(r["metrics"].items()))
        print(f"{r['model_id']} v{r['version']} round {r['round_id']} {r['digest'][:16]} {metrics}")


async def _models_export(config: CoordinatorConfig, version: int | None, out: Path) -> None:
    async with Store.open(_open_existing(config)) as store:
        if version is None:
            record = await store.latest_model(config.model.id)
        else:
            record = await store.model(config.model.id, version)
    if record is None:
        raise ConfigError(f"--version: no version {version} of model {config.model.id}")
    weights = np.frombuffer(record.weights, dtype="<f4")
    np.save(out, weights)
    print(f"wrote {config.model.id} v{record.version} ({weights.size} weights) to {out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        match args.command:
            case "run":
                setup_logging(config.log.level, config.log.format)
                asyncio.run(_run(config))
            case "status":
                asyncio.run(_status(config, args.json))
            case "models" if args.models_command == "list":
                asyncio.run(_models_list(config, args.json))
            case "models":
                asyncio.run(_models_export(config, args.version, args.out))
    except ConfigError as exc:
        print(f"maskfl-coordinator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MaskflError as exc:
        print(f"maskfl-coordinator: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
