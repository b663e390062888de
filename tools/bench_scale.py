"""``maskfl-bench scale``: one coordinator against large fleets and large models.

Four parts (``--parts``), each on fresh brokers and a fresh coordinator process
(``maskfl-coordinator run``, numpy backend, 32-bit words, plain-TCP mosquitto):

- **rounds**: a whole round at N updaters of M parameters, for N in ``--n`` (M =
  ``--n-m``) and M in ``--m`` (N = ``--m-n``). Two simulated summers (in this
  process) and N updates built before the clock starts and sent by a publisher
  process, so the figures are the coordinator's: phase times (from its
  database), its own ingest (first update frame in → last update committed, from
  its ``/status``), its CPU per update over that span, peak RSS (``VmHWM``) of the
  coordinator and the broker, and the bytes the broker sent during the round
  (``wchar`` of the mosquitto process: everything it wrote to sockets).
- **idle**: K connected devices (``--idle``) that heartbeat every ``--interval``
  seconds (raw MQTT clients, :mod:`maskfl.testing.idle_fleet`, spread over
  processes). Reports the coordinator's CPU share over ``--window`` seconds once
  every device has beaten at least once, its alive count and peak RSS, then
  ``--idle-rounds`` rounds of ``--round-n`` updaters with the fleet's heartbeats
  on and as many with them paused (its processes stopped, connections kept),
  alternating on the same coordinator and brokers: the goal is the same round
  with and without them (``with_and_without``: medians). The first row (K = 0)
  is the same rounds on a bed without a fleet. One mosquitto holds at most
  ``--per-broker`` clients (its file-descriptor limit); larger fleets connect to
  edge brokers bridged to the core broker the coordinator uses, as a real
  deployment of that size would.
- **fanout**: ``--fanout-devices`` idle devices subscribed like agents, and two
  rounds of ``--fanout-n`` updaters at M = ``--fanout-m``: the broker's outbound
  bytes over round 2, with devices subscribed to every model (``before``: the
  behaviour up to this release) and fetching it only when they train (``after``:
  the updaters of round 2 fetch model v1 once each, from the retained topic).
- **fleet**: ``--fleet-devices`` heartbeating devices and ``--fleet-rounds``
  rounds of ``--fleet-updaters`` updaters each (M = ``--n-m``), fresh updater
  identities chosen by each round's sortition seed; every second round runs with
  the fleet's heartbeats paused (its processes stopped, connections kept), so the
  rounds compare with and without heartbeats on the same coordinator and brokers.

The coordinator runs on a CPU of its own (``--coordinator-cpu``, default 0; -1 not
to pin), the rest of the bed on the other CPUs, so that the simulated fleet's
processes do not take the coordinator's CPU (see :mod:`._scale_bed`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maskfl.protocol.sortition import MAX_GROUPS
from maskfl.tools._scale_bed import Bed, groups_of, pinning
from maskfl.tools._scale_procs import CHUNK, SUMMERS

PARTS = ("rounds", "idle", "fanout", "fleet")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scale", help="rounds, coordinator ingest, idle fleets and fan-out at fleet scale"
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000], help="updaters")
    p.add_argument("--n-m", type=float, default=1e4, help="M for the --n rows (and fleet)")
    p.add_argument("--m", type=float, nargs="+", default=[1e6, 1e7, 2.5e7], help="parameters")
    p.add_argument("--m-n", type=int, default=10, help="N for the --m rows")
    p.add_argument("--idle", type=int, nargs="+", default=[10000, 100000], help="idle devices")
    p.add_argument("--interval", type=float, default=30.0, help="heartbeat interval, s")
    p.add_argument("--window", type=float, default=60.0, help="CPU measurement window, s")
    p.add_argument("--round-n", type=int, default=1000, help="updaters of the idle-load round")
    p.add_argument(
        "--idle-rounds",
        type=int,
        default=2,
        help="rounds with the idle fleet's heartbeats on, and as many paused, per idle row",
    )
    p.add_argument("--fanout-devices", type=int, default=10000)
    p.add_argument("--fanout-n", type=int, default=100)
    p.add_argument("--fanout-m", type=float, default=1e4)
    p.add_argument("--fleet-devices", type=int, default=100000)
    p.add_argument("--fleet-updaters", type=int, default=1000)
    p.add_argument("--fleet-rounds", type=int, default=3)
    p.add_argument("--per-broker", type=int, default=18000, help="clients per mosquitto")
    p.add_argument("--per-process", type=int, default=17000, help="idle devices per process")
    p.add_argument(
        "--groups",
        type=int,
        default=1,
        help="g, the mask groups ([masking] groups) of every round: updates seal one seed per "
        f"group, with max({SUMMERS}, g) summers, one or more per group (default 1)",
    )
    p.add_argument(
        "--coordinator-cpu",
        type=int,
        default=0,
        help="the CPU the coordinator runs on alone, the rest of the bed on the others "
        "(-1: no pinning; ignored with fewer than 2 CPUs)",
    )
    p.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    p.add_argument("--keep", type=Path, help="keep logs and state in this directory")


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = getattr(args, "parts", None) or list(PARTS)
    groups = groups_of(args)
    if not 1 <= groups <= MAX_GROUPS:
        raise SystemExit(f"maskfl-bench scale: --groups {groups}: pick 1 to {MAX_GROUPS}")
    out: dict[str, Any] = {
        "word_bits": 32,
        "groups": groups,
        "backend": "numpy",
        "chunk_size": CHUNK,
        "fd_limit": _fd_limit(),
        "cpus": pinning(getattr(args, "coordinator_cpu", -1), os.sched_getaffinity(0)),
    }
    if "rounds" in parts:
        rows = [(n, int(args.n_m)) for n in args.n] + [(args.m_n, int(m)) for m in args.m]
        out["rounds"] = [_run(f"round-n{n}-m{m}", args, _round_row, n, m) for n, m in rows]
    if "idle" in parts:
        base = _run("idle-0", args, _idle_row, 0)
        idle_rows = [base] + [_run(f"idle-{k}", args, _idle_row, k) for k in args.idle]
        _net_of_baseline(idle_rows)
        out["idle"] = idle_rows
    if "fanout" in parts:
        out["fanout"] = {
            mode: _run(f"fanout-{mode}", args, _fanout_row, mode == "before")
            for mode in ("before", "after")
        }
    if "fleet" in parts:
        out["fleet"] = _run("fleet", args, _fleet_row)
    return out


def _net_of_baseline(rows: list[dict[str, Any]]) -> None:
    """CPU per heartbeat net of what the coordinator spends with no fleet at all."""
    base = (rows[0].get("coordinator_idle") or {}).get("cpu_share_of_one_core")
    for row in rows[1:]:
        load = row.get("coordinator_idle")
        if base is None or not load or not load.get("heartbeats_per_s"):
            continue
        net = max(0.0, load["cpu_share_of_one_core"] - base)
        load["cpu_share_no_fleet"] = base
        load["cpu_us_per_heartbeat_net"] = round(net / load["heartbeats_per_s"] * 1e6, 1)


def _run(name: str, args: argparse.Namespace, fn: Any, *a: Any) -> dict[str, Any]:
    print(f"maskfl-bench scale: {name}", file=sys.stderr)
    with _workdir(args.keep, name) as work:
        try:
            result: dict[str, Any] = asyncio.run(fn(work, args, *a))
        except Exception as exc:  # a failed row is a result too: say what failed
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), file=sys.stderr)
    return result


# -- rows ---------------------------------------------------------------------------


async def _round_row(work: Path, args: argparse.Namespace, n: int, m: int) -> dict[str, Any]:
    async with Bed.open(work, m=m, n_max=n, updates=n, idle=0, args=args) as bed:
        r = await bed.round(1, n, m)
        return {"n": n, "m": m, **r, "peak_rss_mb": bed.peak_rss()}


async def _idle_row(work: Path, args: argparse.Namespace, k: int) -> dict[str, Any]:
    n, m = args.round_n, int(args.n_m)
    count = args.idle_rounds * (2 if k else 1)
    async with Bed.open(work, m=m, n_max=n, updates=n, idle=k, args=args, rounds=count) as bed:
        load = await bed.idle_load(args.window)
        done = await _alternate(bed, count, n, m, paused_every_second=k > 0)
        return {
            "devices": k,
            "interval_s": args.interval,
            "brokers": len(bed.brokers),
            "cpus": bed.cpus,
            "affinity": bed.affinities(),
            "fleet": bed.fleet_counts(),
            "coordinator_idle": load,
            "n": n,
            "m": m,
            "rounds": done,
            "with_and_without": _with_and_without(done, fleet=k > 0),
            "peak_rss_mb": bed.peak_rss(),
        }


async def _alternate(
    bed: Bed, count: int, n: int, m: int, *, paused_every_second: bool
) -> list[dict[str, Any]]:
    """``count`` rounds; with ``paused_every_second``, rounds 2, 4, ... run with the
    fleet's heartbeats paused (its processes stopped, connections kept): the same
    coordinator, brokers and machine load with and without them, back to back."""
    done = []
    for r in range(1, count + 1):
        paused = paused_every_second and r % 2 == 0
        bed.pause_fleet(paused)
        try:
            done.append({"heartbeats_paused": paused, **await bed.round(r, n, m)})
        finally:
            bed.pause_fleet(False)
    return done


_COMPARED = ("first_update_to_model_s", "ingest_s", "coordinator_cpu_s")


def _with_and_without(rounds: list[dict[str, Any]], *, fleet: bool) -> dict[str, Any]:
    """Medians of the rounds with the heartbeats on and paused (``no_fleet`` on a bed
    without one). The coordinator's CPU is compared as measured: it reads no heartbeat
    in the update and sum2 phases, so the idle cost per heartbeat times the window is
    no longer what they cost a round. ``round_s`` leaves out round 1, whose sum phase
    also holds the bed's start."""
    out: dict[str, Any] = {}
    on = "heartbeats_on" if fleet else "no_fleet"
    for paused, key in ((False, on), (True, "heartbeats_paused")):
        rows = [r for r in rounds if r["heartbeats_paused"] is paused and "error" not in r]
        if not rows:
            continue
        med = {f: round(statistics.median(r[f] for r in rows), 3) for f in _COMPARED}
        # Round 1's sum phase also holds the bed's start (the fleet connecting, the window).
        later = [r["round_s"] for r in rows if r["round_id"] > 1]
        med["round_s"] = round(statistics.median(later), 3) if later else None
        med["brokers_cpu_s"] = round(
            statistics.median(r["brokers_cpu_s_in_cpu_window"] for r in rows), 3
        )
        med["cpu_busy"] = {
            cpu: round(statistics.median(r["cpu_busy_in_cpu_window"][cpu] for r in rows), 3)
            for cpu in rows[0]["cpu_busy_in_cpu_window"]
        }
        out[key] = {"rounds": len(rows), **med}
    return out


async def _fanout_row(work: Path, args: argparse.Namespace, models: bool) -> dict[str, Any]:
    n, m, k = args.fanout_n, int(args.fanout_m), args.fanout_devices
    async with Bed.open(
        work, m=m, n_max=n, updates=n, idle=k, args=args, models=models, rounds=2
    ) as bed:
        await bed.wait_connected()
        first = await bed.round(1, n, m)
        # Round 2: its updaters need model v1 (after: they fetch it, once each).
        second = await bed.round(2, n, m, fetch_model=not models)
        return {
            "devices": k,
            "devices_subscribe_to_models": models,
            "n": n,
            "m": m,
            "model_message_bytes": second["model_message_bytes"],  # None: nobody fetched
            "broker_bytes_out_round_1": first["broker_bytes_out"],
            "broker_bytes_out_round_2": second["broker_bytes_out"],
            "round_2": second,
            "fleet": bed.fleet_counts(),
            "peak_rss_mb": bed.peak_rss(),
        }


async def _fleet_row(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    n, m, k = args.fleet_updaters, int(args.n_m), args.fleet_devices
    rounds = args.fleet_rounds
    async with Bed.open(work, m=m, n_max=n, updates=n, idle=k, args=args, rounds=rounds) as bed:
        load = await bed.idle_load(args.window) if k else None
        done = await _alternate(bed, rounds, n, m, paused_every_second=k > 0)
        return {
            "devices": k,
            "updaters_per_round": n,
            "m": m,
            "brokers": len(bed.brokers),
            "cpus": bed.cpus,
            "fleet": bed.fleet_counts(),
            "coordinator_idle": load,
            "rounds": done,
            "peak_rss_mb": bed.peak_rss(),
        }


# -- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: Path | None, name: str) -> Iterator[Path]:
    if keep is not None:
        path = keep / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="maskfl-bench-scale-") as tmp:
        yield Path(tmp)


def _fd_limit() -> list[int]:
    import resource

    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


# -- the table ----------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """The figures of ``run``'s result as the README's tables (Markdown, aligned): the
    round rows, the idle fleet and its rounds with and without heartbeats, the fan-out
    and the fleet's rounds. A failed row is listed below its table with its error."""
    out: list[str] = []
    rounds = result.get("rounds") or []
    out += _table(
        "Rounds",
        ["N", "M", "sum", "update", "sum2", "unmask", "first update → model",
         "coordinator ingest", "CPU per update", "peak RSS coordinator / broker",
         "broker bytes out", "load 1m"],
        [[f"{r['n']:,}", _m(r["m"]), *(_s(r["phases_s"].get(p), 2) for p in _PHASES),
          f"{r['first_update_to_model_s']:.2f} s", _ingest(r),
          _ms(r["coordinator_cpu_ms_per_update"]), _rss(r["peak_rss_mb"]),
          _bytes(r["broker_bytes_out"]), f"{r['load_average_1m']:.1f}"]
         for r in rounds if "error" not in r],
        rounds,
    )  # fmt: skip
    idle = result.get("idle") or []
    ok = [r for r in idle if "error" not in r]
    out += _table(
        "Idle fleet",
        ["devices", "heartbeats/s", "coordinator CPU (share of a core)", "per heartbeat, net",
         "devices alive", "coordinator peak RSS"],
        [[f"{r['devices']:,}", f"{c['heartbeats_per_s']:,.0f}",
          _pct(c["cpu_share_of_one_core"]), _us(c.get("cpu_us_per_heartbeat_net")),
          f"{c.get('devices_alive', 0):,}", f"{r['peak_rss_mb']['coordinator']:,.0f} MB"]
         for r in ok for c in [r["coordinator_idle"]]],
        idle,
    )  # fmt: skip
    out += _table(
        "Rounds with and without the idle fleet's heartbeats (medians)",
        ["devices", "heartbeats", "rounds", "first update → model", "coordinator ingest",
         "coordinator CPU per round", "brokers CPU per round",
         "busy per CPU"],
        [[f"{r['devices']:,}", _HEARTBEATS[key], str(w["rounds"]),
          f"{w['first_update_to_model_s']:.2f} s", f"{w['ingest_s']:.2f} s", _cpu(w),
          f"{w['brokers_cpu_s']:.2f} s", _busy(w["cpu_busy"])]
         for r in ok for key, w in r["with_and_without"].items()],
        [],
    )  # fmt: skip
    fanout = result.get("fanout") or {}
    out += _table(
        "Model fan-out (broker bytes out over round 2)",
        ["devices", "subscribed to", "N", "M", "broker bytes out"],
        [[f"{r['devices']:,}", "every model" if r["devices_subscribe_to_models"] else
          "models on demand", f"{r['n']:,}", _m(r["m"]), _bytes(r["broker_bytes_out_round_2"])]
         for r in fanout.values() if "error" not in r],
        list(fanout.values()),
    )  # fmt: skip
    fleet = result.get("fleet")
    if fleet is not None:
        out += _table(
            f"Fleet: {fleet.get('devices', 0):,} devices, "
            f"{fleet.get('updaters_per_round', 0):,} updaters per round",
            ["round", "heartbeats", "outcome", "sum", "update", "sum2", "unmask",
             "first update → model", "coordinator ingest", "coordinator CPU", "broker bytes out"],
            [[str(r["round_id"]), "paused" if r["heartbeats_paused"] else "on", r["outcome"],
              *(_s(r["phases_s"].get(p), 2) for p in _PHASES),
              f"{r['first_update_to_model_s']:.2f} s", f"{r['ingest_s']:.2f} s",
              f"{r['coordinator_cpu_s']:.2f} s", _bytes(r["broker_bytes_out"])]
             for r in fleet.get("rounds", []) if "error" not in r],
            [fleet, *fleet.get("rounds", [])],
        )  # fmt: skip
    return "\n".join(out)


_PHASES = ("sum", "update", "sum2", "unmask")
_HEARTBEATS = {"no_fleet": "—", "heartbeats_on": "on", "heartbeats_paused": "paused"}


def _table(
    title: str, head: list[str], rows: list[list[str]], raw: list[dict[str, Any]]
) -> list[str]:
    """Lines of one aligned Markdown table, then the errors of ``raw``'s failed rows."""
    failed = [f"failed: {r.get('name', '?')}: {r['error']}" for r in raw if "error" in r]
    if not rows and not failed:
        return []
    widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return [title, "", line(head), rule, *map(line, rows), *failed, ""]


def _m(m: float) -> str:
    """1e4, 2.5e7: M as the README writes it."""
    exp = len(str(int(m))) - 1
    return f"{m / 10**exp:g}e{exp}"


def _s(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits + (v < 0.1)}f}"


def _ms(v: float) -> str:
    return f"{v:.2f} ms" if v < 10 else f"{v:,.0f} ms"


def _pct(share: float) -> str:
    return f"{share * 100:.2f} %" if share < 0.01 else f"{share * 100:.1f} %"


def _us(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} µs"


def _ingest(r: dict[str, Any]) -> str:
    rate = r.get("ingest_updates_per_s")
    return f"{r['ingest_s']:.2f} s" + ("" if rate is None else f" ({rate:,.0f}/s)")


def _rss(peak: dict[str, float]) -> str:
    return f"{peak['coordinator']:,.0f} / {peak['core_broker']:,.0f} MB"


def _cpu(w: dict[str, Any]) -> str:
    return f"{w['coordinator_cpu_s']:.2f} s"


def _busy(busy: dict[str, float]) -> str:
    """'0: 47 %, 1: 99 %': each CPU's busy share over the rounds' CPU windows."""
    return ", ".join(f"{cpu}: {share * 100:.0f} %" for cpu, share in busy.items())


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.2g} {unit}" if v < 10 else f"{v:,.0f} {unit}"
    return f"{n} B"
