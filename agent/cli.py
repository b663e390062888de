"""``maskfl-agent``: the device daemon and its small helpers.

    maskfl-agent run --config agent.toml       the daemon (systemd Type=notify)
    maskfl-agent check --config agent.toml     validate config and identity, then exit
    maskfl-agent status --config agent.toml    the journal: rounds taken part in (JSON)
    maskfl-agent keygen --out device.key       a new Ed25519 device key (mode 0600)

User errors (a bad config, a missing file) print one line and exit with status 2;
there are no stack traces for them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from maskfl.agent.config import AgentConfig, load_config
from maskfl.agent.daemon import run_daemon
from maskfl.agent.identity import generate_key_file, load_identity
from maskfl.agent.logs import setup_logging
from maskfl.agent.state import Journal, state_as_dict
from maskfl.protocol.errors import ConfigError, MaskflError
from maskfl.protocol.keys import public_key_to_pem

__all__ = ["main"]

log = logging.getLogger("maskfl.agent")

EXIT_USAGE = 2


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("MASKFL_AGENT_CONFIG"),
        help="agent.toml (default: $MASKFL_AGENT_CONFIG)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-agent", description="maskfl device agent: masked federated learning"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon")
    _config_arg(run)
    check = sub.add_parser("check", help="validate the config and the identity files")
    _config_arg(check)
    status = sub.add_parser("status", help="print the rounds this device took part in (JSON)")
    _config_arg(status)
    status.add_argument("--limit", type=int, default=20)
    keygen = sub.add_parser("keygen", help="create a device key (PKCS#8 PEM, mode 0600)")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _fail(message: str) -> int:
    print(f"maskfl-agent: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        match args.command:
            case "keygen":
                return _keygen(args.out, args.force)
            case "check":
                return _check(args.config)
            case "status":
                return asyncio.run(_status(args.config, args.limit))
            case "run":
                return _run(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return _fail(f"unknown command {args.command}")


def _load(path: Path | None) -> AgentConfig:
    if path is None:
        raise ConfigError("--config is required (or set MASKFL_AGENT_CONFIG)", field="--config")
    return load_config(path)


def _keygen(out: Path, force: bool) -> int:
    key = generate_key_file(out, overwrite=force)
    sys.stdout.write(public_key_to_pem(key.verify_key).decode())
    return 0


def _check(path: Path | None) -> int:
    config = _load(path)
    ident = load_identity(config.device)
    cert = ident.identity.certificate
    print(
        json.dumps(
            {
                "device": cert.subject,
                "fleet": cert.fleet,
                "serial": cert.serial,
                "not_after": cert.not_after,
                "broker": f"{config.broker.host}:{config.broker.port}",
                "state": str(config.state.database),
                "revocations": None if ident.revocations is None else ident.revocations.version,
            }
        )
    )
    return 0


async def _status(path: Path | None, limit: int) -> int:
    config = _load(path)
    if not config.state.database.exists():
        print("[]")
        return 0
    async with Journal.open(config.state.database) as journal:
        rounds = await journal.history(limit)
    print(json.dumps([state_as_dict(r) for r in rounds], indent=1))
    return 0


def _run(path: Path | None) -> int:
    config = _load(path)
    setup_logging(config.logging.level, config.logging.format)
    try:
        code: int = asyncio.run(run_daemon(config))
        return code
    except MaskflError as exc:
        # Start-up failures (identity, database): one line, exit 2 so systemd does not
        # restart-loop on a broken bundle (RestartPreventExitStatus=2 in the unit).
        log.error("cannot start: %s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
