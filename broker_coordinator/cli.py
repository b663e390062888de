"""``maskfl-coordinator``: run the service, inspect its state, export models.

::

    maskfl-coordinator run --config coordinator.toml
    maskfl-coordinator status --config coordinator.toml [--json]
    maskfl-coordinator devices --config coordinator.toml [--json] [--rounds N]
    maskfl-coordinator models list --config coordinator.toml [--json]
    maskfl-coordinator models export --config coordinator.toml [--version N] --out model.npy

User errors (a bad config, a missing file, a private key readable by others, an
unknown version) print one line to stderr and exit with status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maskfl.broker_coordinator.config import CoordinatorConfig, check_files, load_config
from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.broker_coordinator.fleetview import device_table, round_groups
from maskfl.broker_coordinator.privacy import describe_status, privacy_status
from maskfl.broker_coordinator.service import (
    Coordinator,
    initial_weights,
    load_identity,
    model_graph,
    mqtt_config,
    state_db,
)
from maskfl.broker_coordinator.store import Store
from maskfl.models import graph_with_weights
from maskfl.protocol.errors import ConfigError, MaskflError, StorageError
from maskfl.protocol.identity import RevocationList
from maskfl.protocol.keys import public_key_from_pem
from maskfl.protocol.version import version_text
from maskfl.transport import LOG_FORMATS, check_private_mode, probe_broker, setup_logging

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_USAGE = 2

_EPILOG = """\
examples:
  maskfl-coordinator check --config fleet/coordinator/coordinator.toml
  maskfl-coordinator run --config fleet/coordinator/coordinator.toml
  maskfl-coordinator status --config fleet/coordinator/coordinator.toml
  maskfl-coordinator devices --config fleet/coordinator/coordinator.toml
  maskfl-coordinator models list --config fleet/coordinator/coordinator.toml
  maskfl-coordinator models export --config fleet/coordinator/coordinator.toml --out model.npy
  maskfl-coordinator models export --config ... --format tflite --out model.tflite

coordinator.toml is written by `maskfl-provision init` (every key is commented in
configs/coordinator.toml); MASKFL__SECTION__KEY environment variables override it,
e.g. MASKFL__PET__SUM__TIME_MAX_S=20. A user error prints one line and exits 2.
"""


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help="coordinator.toml (from maskfl-provision; relative paths in it are "
        "relative to the file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-coordinator",
        description="Run the maskfl coordinator, inspect its state, export global models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-coordinator"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _service_parsers(sub)
    _state_parsers(sub)
    _models_parser(sub)
    return parser


def _service_parsers(sub: _Subparsers) -> None:
    """check and run: the service itself."""
    check = sub.add_parser(
        "check",
        help="validate config, keys, files and the broker, then exit",
        description="Everything `run` needs, checked without running: the config (one line "
        "per mistake), the identity (key, certificate, fleet CA, revocation list), file "
        "modes, the initial weights and the model graph, the status port, and the broker "
        "(TCP, and the TLS handshake with the coordinator's certificate; no MQTT CONNECT, "
        "so a running coordinator keeps its session). Prints a JSON summary; exit 0 when "
        "all is well, 2 for a config or file mistake, 1 when the broker refuses or is "
        "unreachable.",
    )
    _config_arg(check)
    run = sub.add_parser(
        "run",
        help="run the coordinator service",
        description="Run the coordinator until SIGTERM/SIGINT: connect to the broker "
        "(retrying while it is unreachable), drive the rounds, serve /metrics /healthz "
        "/readyz /status on [http] host:port. A killed coordinator resumes its round "
        "from [storage] dir on the next start.",
    )
    _config_arg(run)
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines as text or JSON; auto: text on a terminal or under journald, JSON "
        "otherwise (default: [log] format, itself auto by default)",
    )


def _state_parsers(sub: _Subparsers) -> None:
    """status and devices: what the database says, read while the service runs."""
    status = sub.add_parser(
        "status",
        help="show rounds and the latest model from the database",
        description="The last 10 rounds and the latest global model, read from "
        "[storage] dir (works while the coordinator runs).",
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    devices = sub.add_parser(
        "devices",
        help="every device seen: last seen, roles, accepted/rejected messages, revoked",
        description="One line per device the coordinator accepted or rejected a message "
        "from, read from [storage] dir (works while the coordinator runs): when it was last "
        "seen, its role in the last rounds (S summer, U updater, . none), accepted sum/update/"
        "sum2 messages, rejections by reason, and whether the revocation list in "
        "fleet.revocations_file revokes its certificate. Metadata only, never model numbers.",
    )
    _config_arg(devices)
    devices.add_argument("--json", action="store_true", help="print JSON instead of text")
    devices.add_argument(
        "--rounds", type=int, default=5, metavar="N", help="roles in the last N rounds (default 5)"
    )


def _models_parser(sub: _Subparsers) -> None:
    """models list and models export: the global model registry."""
    models = sub.add_parser(
        "models",
        help="the global model registry",
        description="Every global model version the coordinator has published.",
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    mlist = msub.add_parser(
        "list",
        help="every version with digest and metrics",
        description="One line per version: model id, version, when it was published (UTC), "
        "round, digest prefix, metrics (updates, weight sum, fleet accuracy and loss, ...).",
    )
    _config_arg(mlist)
    mlist.add_argument("--json", action="store_true", help="print JSON instead of text")
    export = msub.add_parser(
        "export",
        help="write one version's weights as .npy, or the model as .tflite",
        description="Write one version's flat float32[M] weight vector as a .npy file, or "
        "(--format tflite) the model graph ([model] graph_file) with that version's weights "
        "built in, ready for inference anywhere TFLite runs (needs ai-edge-litert: the "
        "agent extra).",
    )
    _config_arg(export)
    export.add_argument(
        "--version", type=int, default=None, help="model version (default: the latest)"
    )
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
    export.add_argument(
        "--format",
        choices=("npy", "tflite"),
        default="npy",
        help="npy: the weight vector (default); tflite: the graph with the weights set",
    )


def check_private_files(config: CoordinatorConfig) -> None:
    """Refuse private key files that group or others can read.

    Raises :class:`ConfigError` naming the field, the mode and the ``chmod`` that
    fixes it (the agent refuses its keys the same way).
    """
    files = [
        ("identity.key_file", config.identity.key_file),
        ("broker.key_file", config.broker.key_file),
    ]
    for field, path in files:
        if path is not None:
            check_private_mode(Path(path), field)


def check_revocations(config: CoordinatorConfig) -> None:
    """Refuse to start on a revocation list that is there but does not verify.

    While running, a bad new list is refused and the current one stays; at start
    there is no current one, so going on would accept every revoked device.
    (A missing file is allowed: the list is picked up when it appears.)
    """
    path = config.fleet.revocations_file
    if path is None or not path.exists():
        return
    try:
        ca = public_key_from_pem(config.fleet.ca_public_key_file.read_bytes())
    except (OSError, MaskflError):
        return  # the service names fleet.ca_public_key_file itself
    try:
        RevocationList.from_bytes(path.read_bytes()).verify(ca_public_key=ca, fleet=config.fleet.id)
    except (OSError, MaskflError) as exc:
        raise ConfigError(
            f"fleet.revocations_file: {path} is not a valid revocation list of fleet "
            f"{config.fleet.id!r} ({exc}); copy coordinator/revocations.bin from the fleet "
            "directory again (`maskfl-provision revoke ID` rewrites it)",
            field="fleet.revocations_file",
        ) from exc


def check_http_port(config: CoordinatorConfig) -> None:
    """Refuse an ``[http]`` address that cannot be listened on, before anything starts.

    The ops server starts after the broker link is up; a port in use would only
    fail then, with a traceback. Binding once here names the field instead.
    """
    http = config.http
    if not http.enabled or http.port == 0:
        return
    try:
        infos = socket.getaddrinfo(http.host, http.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(
            f"http.host: cannot resolve {http.host!r}: {exc}; use an address of this machine "
            "(127.0.0.1, or 0.0.0.0 for every interface)",
            field="http.host",
        ) from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                field, fix = "http.port", "choose another port or stop what uses it"
            else:
                field, fix = "http.host", "use an address of this machine (127.0.0.1, 0.0.0.0)"
            raise ConfigError(
                f"{field}: cannot listen on {http.host}:{http.port}: {exc.strerror}; {fix}, "
                "or set [http] enabled = false",
                field=field,
            ) from exc


LOCK_NAME = "coordinator.lock"


@contextlib.contextmanager
def state_lock(config: CoordinatorConfig) -> Iterator[None]:
    """Hold an exclusive lock on ``storage.dir`` while the coordinator runs.

    Two coordinators on one state directory would both write its database and both
    publish round parameters; the second one is refused with one line instead. The
    lock is ``flock`` on ``coordinator.lock``: the kernel drops it when the process
    dies (kill -9 included), so a crash never leaves a stale lock behind.
    """
    state = config.storage.dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"storage.dir: cannot use {state}: {exc.strerror}; fix the path or its owner",
            field="storage.dir",
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"storage.dir: another coordinator (pid {holder}) is running on {state}; "
                "stop it first, or give this one its own storage.dir",
                field="storage.dir",
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def _run(config: CoordinatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Coordinator(config).run(stop)
    except asyncio.CancelledError:
        # A stop while the broker was still unreachable ends the connect loop with
        # CancelledError: that is a clean shutdown, not a crash.
        if not stop.is_set():
            raise


def _open_existing(config: CoordinatorConfig) -> Path:
    db: Path = state_db(config)
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
        "privacy": privacy_status(
            config.privacy.dp,
            config.privacy.delta,
            config.privacy.budget,
            {} if latest is None else latest.metrics,
        ),
        "rounds": [
            {
                "round_id": r.round_id,
                "phase": r.phase.value,
                "outcome": None if r.outcome is None else r.outcome.value,
                "detail": r.detail,
                "model_version": r.model_version,
                "p_sum": r.p_sum,
                "p_update": r.p_update,
                "groups": round_groups(r.params),
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
    print(describe_status(data["privacy"]))
    for r in data["rounds"]:
        outcome = r["outcome"] or f"in progress ({r['phase']})"
        extra = f": {r['detail']}" if r["detail"] else ""
        groups = "" if r["groups"] is None else f" (g = {r['groups']})"
        print(f"round {r['round_id']}{groups}: {outcome}{extra}")


def _revocations(config: CoordinatorConfig) -> RevocationList | None:
    """The revocation list in force (verified against the fleet CA), or None without one."""
    check_revocations(config)  # one that does not verify is an error, not "nobody revoked"
    path = config.fleet.ca_public_key_file
    try:
        ca = public_key_from_pem(path.read_bytes())
    except (OSError, MaskflError) as exc:
        raise ConfigError(
            f"fleet.ca_public_key_file: cannot read the fleet CA key {path}: {exc}",
            field="fleet.ca_public_key_file",
        ) from exc
    enrollment = Enrollment(
        fleet=config.fleet.id, ca_public_key=ca, revocations_file=config.fleet.revocations_file
    )
    enrollment.reload_if_changed()
    return enrollment.revocations


async def _devices(config: CoordinatorConfig, as_json: bool, recent: int) -> None:
    if recent < 1:
        raise ConfigError("--rounds: must be at least 1", field="--rounds")
    revocations = _revocations(config)
    async with Store.open(_open_existing(config)) as store:
        rows = await device_table(store, revocations=revocations, recent_rounds=recent)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no device has sent a message yet")
        return
    now = time.time()
    width = max(len("device"), *(len(r["device"]) for r in rows))
    print(f"{'device':<{width}}  {'last seen':>11}  revoked  roles  sum/upd/sum2  rejected")
    for r in rows:
        seen = "never" if r["last_seen"] is None else _ago(now - r["last_seen"])
        revoked = {None: "?", True: "REVOKED", False: "no"}[r["revoked"]]
        roles = "".join({"summer": "S", "updater": "U"}.get(x["role"], ".") for x in r["roles"])
        a = r["accepted"]
        counts = f"{a['sum']}/{a['update']}/{a['sum2']}"
        rejected = ", ".join(f"{k} x{v}" for k, v in sorted(r["rejected"].items())) or "-"
        print(
            f"{r['device']:<{width}}  {seen:>11}  {revoked:<7}  {roles:<5}  {counts:<12}  "
            f"{rejected}"
        )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


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
            "files_kept": m.kept,
        }
        for m in models
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        metrics = " ".join(f"{k}={v:g}" for k, v in sorted(r["metrics"].items()))
        rnd = "-" if r["round_id"] is None else r["round_id"]
        pruned = "" if r["files_kept"] else " (files removed: registry.keep_versions)"
        made = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r["created_at"]))
        line = (
            f"{r['model_id']} v{r['version']} {made} round {rnd} {r['digest'][:16]} "
            f"{metrics}{pruned}"
        )
        print(line.rstrip())


async def _models_export(
    config: CoordinatorConfig, version: int | None, out: Path, fmt: str = "npy"
) -> None:
    async with Store.open(_open_existing(config)) as store:
        try:
            if version is None:
                record = await store.latest_model(config.model.id)
            else:
                record = await store.model(config.model.id, version)
        except StorageError as exc:
            raise ConfigError(f"--version: {exc}", field="--version") from exc
    if record is None:
        async with Store.open(_open_existing(config)) as store:
            versions = [m.version for m in await store.models() if m.model_id == config.model.id]
        have = (
            f"versions {versions[0]}..{versions[-1]} exist"
            if versions
            else "it has no versions yet"
        )
        raise ConfigError(
            f"--version: no version {version} of model {config.model.id}; {have} "
            "(see `maskfl-coordinator models list`)",
            field="--version",
        )
    weights = np.frombuffer(record.weights, dtype="<f4")
    graph = None
    if fmt == "tflite":
        source = model_graph(config)
        if source is None:
            raise ConfigError(
                "--format tflite: [model] graph_file is not set, so there is no graph to "
                "build the weights into; set it, or export --format npy",
                field="--format",
            )
        graph = graph_with_weights(source, weights)
    try:
        with out.open("wb") as f:  # exactly the name given (np.save(path) would add .npy)
            if graph is None:
                np.save(f, weights)
            else:
                f.write(graph)
    except OSError as exc:
        raise ConfigError(
            f"--out: cannot write {out}: {exc.strerror}; choose a writable path", field="--out"
        ) from exc
    what = f"{weights.size} weights" if graph is None else f"graph with {weights.size} weights set"
    print(f"wrote {config.model.id} v{record.version} ({what}) to {out}")


def _check(config: CoordinatorConfig) -> int:
    """``maskfl-coordinator check``: what ``run`` checks at start, and the broker."""
    check_files(config)
    check_private_files(config)
    check_revocations(config)
    check_http_port(config)
    _, _, certificate = load_identity(config)
    weights = initial_weights(config)
    graph = model_graph(config)
    mqtt = mqtt_config(config)
    problem = probe_broker(mqtt)
    print(
        json.dumps(
            {
                "fleet": certificate.fleet,
                "coordinator": certificate.subject,
                "serial": certificate.serial,
                "not_after": certificate.not_after,
                "model": {
                    "id": config.model.id,
                    "length": int(weights.size),
                    "graph_bytes": None if graph is None else len(graph),
                },
                "state": str(state_db(config)),
                "http": f"{config.http.host}:{config.http.port}" if config.http.enabled else None,
                "broker": {
                    "address": mqtt.address,
                    "tls": mqtt.tls is not None,
                    "ok": problem is None,
                    "problem": None if problem is None else f"{problem.advice} ({problem.detail})",
                },
            }
        )
    )
    if problem is not None:
        print(f"maskfl-coordinator: broker {mqtt.address}: {problem.advice}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        match args.command:
            case "check":
                return _check(config)
            case "run":
                check_files(config)  # missing files first, then their modes
                check_private_files(config)
                check_revocations(config)
                check_http_port(config)
                with state_lock(config):
                    setup_logging(config.log.level, args.log_format or config.log.format)
                    asyncio.run(_run(config))
            case "status":
                asyncio.run(_status(config, args.json))
            case "devices":
                asyncio.run(_devices(config, args.json, args.rounds))
            case "models" if args.models_command == "list":
                asyncio.run(_models_list(config, args.json))
            case "models":
                asyncio.run(_models_export(config, args.version, args.out, args.format))
    except ConfigError as exc:
        print(f"maskfl-coordinator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MaskflError as exc:
        print(f"maskfl-coordinator: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `maskfl-coordinator models list | head`: the reader left; say nothing more.
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
