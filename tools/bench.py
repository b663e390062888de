"""``maskfl-bench``: performance measured as JSON, never asserted in tests.

Every subcommand prints its JSON on stdout, or writes it to ``--json FILE``. One that
also exposes ``format_table(results) -> str`` (``scale``) prints its figures as a table
at the end: on stdout when the JSON goes to a file, else on stderr.
Subcommands live in ``tools/bench_<name>.py``; each exposes ``add_parser`` and
``run(args) -> dict``. ``all`` runs every subcommand with its defaults except
``scale`` (its own target, ``make bench-scale``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from maskfl.protocol.version import version_text

# subcommand -> module under maskfl.tools that implements it
SUBCOMMANDS: dict[str, str] = {
    "protocol": "bench_protocol",
    "messages": "bench_messages",
    "transport": "bench_transport",
    "aggregate": "bench_aggregate",
    "coordinator": "bench_coordinator",
    "agent": "bench_agent",
    "agent-train": "bench_agent_train",
    "round": "bench_round",
    "scale": "bench_scale",
}


def machine() -> dict[str, Any]:
    """What ran the benchmark, so numbers from different machines are not compared blindly."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-bench",
        description="Measure maskfl's throughput; writes JSON (stdout, or --json FILE).",
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-bench"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"maskfl.tools.{module_name}")
        except ModuleNotFoundError as exc:
            if (exc.name or "maskfl").startswith("maskfl"):
                raise
            # e.g. maskfl without extras (make gpu-check): `aggregate` needs nothing more,
            # `transport` needs paho-mqtt; list it, and refuse it in main()
            missing = sub.add_parser(name, help=f"(not installed: needs {exc.name})")
            missing.set_defaults(missing=exc.name)
            continue
        module.add_parser(sub)
    everything = sub.add_parser(
        "all", help="run every benchmark but scale with its defaults (make bench-scale)"
    )
    everything.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    return parser


#: Too heavy for ``all`` (an hour and 100k connections by default): run on its own.
HEAVY = frozenset({"scale"})


def run_all() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, module_name in SUBCOMMANDS.items():
        if name in HEAVY:
            continue
        module = importlib.import_module(f"maskfl.tools.{module_name}")
        parser = argparse.ArgumentParser()
        module.add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args([name])
        print(f"maskfl-bench: running {name}", file=sys.stderr)
        results[name] = module.run(args)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "missing", None):
        print(
            f"maskfl-bench {args.command}: needs the Python module {args.missing}, which is "
            "not installed; install maskfl[coordinator,agent] (or maskfl[dev])",
            file=sys.stderr,
        )
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    table = None
    if args.command == "all":
        results = run_all()
    else:
        module = importlib.import_module(f"maskfl.tools.{SUBCOMMANDS[args.command]}")
        results = module.run(args)
        table = getattr(module, "format_table", None)
    document = {"benchmark": args.command, "machine": machine(), "results": results}
    text = json.dumps(document, indent=2, sort_keys=False)
    if getattr(args, "json", None):
        Path(args.json).write_text(text + "\n")
        print(f"maskfl-bench: wrote {args.json}", file=sys.stderr)
    else:
        print(text)
    if table is not None:
        print(table(results), file=sys.stdout if getattr(args, "json", None) else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
