"""``maskfl-agent``: the device daemon and its small helpers.

    maskfl-agent run --config agent.toml       the daemon (systemd Type=notify)
    maskfl-agent check --config agent.toml     validate config, identity, broker TLS files;
                                               load the data and the model, train one batch
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
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from maskfl.agent.config import AgentConfig, load_config
from maskfl.agent.daemon import build_mqtt_config, run_daemon
from maskfl.agent.datasources import (
    Dataset,
    DataSourceError,
    get_datasource,
    load_dataset,
)
from maskfl.agent.identity import generate_key_file, load_identity
from maskfl.agent.state import Journal
from maskfl.protocol.errors import ConfigError, MaskflError
from maskfl.protocol.keys import public_key_to_pem
from maskfl.protocol.settings import env_variable_for
from maskfl.protocol.version import version_text
from maskfl.transport import LOG_FORMATS, LogFormat, check_private_mode, setup_logging

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


_EPILOG = """\
examples:
  maskfl-agent check --config /etc/maskfl/agent/agent.toml
  maskfl-agent run --config /etc/maskfl/agent/agent.toml
  maskfl-agent status --config /etc/maskfl/agent/agent.toml --limit 5
  maskfl-agent keygen --out /etc/maskfl/agent/device.key

agent.toml comes in the device bundle from `maskfl-provision add-device`; local
settings ([state] dir, [guards], [training], [data]) are commented in configs/agent.toml.
MASKFL__SECTION__KEY environment variables override the file, e.g.
MASKFL__STATE__DIR=/tmp/agent-state. A user error prints one line and exits 2.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskfl-agent",
        description="maskfl device agent: masked federated learning",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-agent"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the agent daemon",
        description="Run the device daemon until SIGTERM/SIGINT: connect to the broker "
        "(retrying while it is unreachable), take part in rounds, journal its state in "
        "[state] dir (default $STATE_DIRECTORY or /var/lib/maskfl-agent). Checks the same "
        "files as `check` first.",
    )
    _config_arg(run)
    _log_format_arg(run)
    check = sub.add_parser(
        "check",
        help="validate the config, identity, broker TLS files, data and model",
        description="Load agent.toml, the device key, certificate, fleet CA key and "
        "revocation list and the broker TLS files; load this device's data from the data "
        "source and the model ([training] model_file, else every shipped model) with the "
        "TFLite runtime and train one batch on it; print a JSON summary with the sample "
        "counts. Exit 2 with one line naming the field when something is wrong. Does not "
        "connect.",
    )
    _config_arg(check)
    status = sub.add_parser(
        "status",
        help="print the rounds this device took part in (JSON)",
        description="The device's journal: its most recent rounds, as JSON.",
    )
    _config_arg(status)
    status.add_argument("--limit", type=int, default=20, help="most rounds shown (default 20)")
    keygen = sub.add_parser(
        "keygen",
        help="create a device key (PKCS#8 PEM, mode 0600)",
        description="Create an Ed25519 device key and print its public key (PEM) for "
        "`maskfl-provision add-device ID --public-key FILE`.",
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="key to write")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _fail(message: str) -> int:
    print(f"maskfl-agent: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 one return per subcommand exit status
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
                return _run(args.config, args.log_format)
    except ConfigError as exc:
        message = str(exc)
        if exc.field and not message.startswith(exc.field):
            message = f"{exc.field}: {message}"
        return _fail(message)
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


def _set_by(*fields: str) -> str:
    """`` (set by environment variable X)`` when the environment set one of ``fields``."""
    names = [n for f in fields if (n := env_variable_for(f, os.environ)) is not None]
    return f" (set by environment variable {', '.join(names)})" if names else ""


def check_local_files(config: AgentConfig) -> None:
    """The checks ``load_identity`` leaves out: the broker's TLS files and the data source.

    Raises :class:`ConfigError` naming the ``agent.toml`` field and the fix.
    """
    broker = config.broker
    if broker.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            file = getattr(broker, name)
            if file is not None and not file.exists():
                raise ConfigError(
                    f"broker.{name}: {file} does not exist{_set_by(f'broker.{name}')}; fix "
                    "the path (relative paths are resolved against the config file's "
                    "directory) or copy the file from the device's bundle",
                    field=f"broker.{name}",
                )
        if broker.ca_file is not None:
            try:
                ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"broker.ca_file: cannot load CA certificates from {broker.ca_file}"
                    f"{_set_by('broker.ca_file')}: {getattr(exc, 'strerror', None) or exc}; "
                    "point it at the bundle's broker-ca.pem",
                    field="broker.ca_file",
                ) from exc
        if broker.cert_file is not None and broker.key_file is not None:
            check_private_mode(broker.key_file, "broker.key_file")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                context.load_cert_chain(str(broker.cert_file), str(broker.key_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"broker.cert_file: cannot load {broker.cert_file} with key "
                    f"{broker.key_file}{_set_by('broker.cert_file', 'broker.key_file')}: "
                    f"{getattr(exc, 'strerror', None) or exc}; use the bundle's "
                    "device-tls.pem and device-tls.key",
                    field="broker.cert_file",
                ) from exc
    build_mqtt_config(config)  # the certificate (or username) must name device.id
    options = {k: v for k, v in config.data.options.items() if k not in ("shard", "shards")}
    try:
        get_datasource(config.data.source, options)
    except DataSourceError as exc:
        if not (exc.field or "").startswith("data.options"):
            raise
        raise DataSourceError(
            f"{exc} (and shard, shards: this device's slice)", field=exc.field
        ) from exc
    model_file = config.training.model_file
    if model_file is not None and not model_file.is_file():
        raise ConfigError(
            f"training.model_file: {model_file} does not exist; fix the path or remove the "
            "key (the agent then uses the graph the coordinator publishes)",
            field="training.model_file",
        )


def check_training(config: AgentConfig) -> dict[str, object]:
    """Load this device's data and the model(s) it may train, and train one batch.

    The model is ``[training] model_file`` when set (the data must fit it), else every
    model that ships with maskfl (the coordinator names the one a round trains; a shipped
    model the data do not fit is reported, not an error, as the fleet may train a graph
    of its own). Loading the interpreter and training a batch is what fails on a device
    whose TFLite runtime is missing or broken, so ``check`` does it before ``run`` does.
    Raises :class:`ConfigError` naming the field.
    """
    from maskfl.agent.training import RUNTIME
    from maskfl.models import shipped_models

    dataset = load_dataset(config.data.source, config.data.options)
    if dataset.num_train == 0:
        raise DataSourceError(
            f"data source {config.data.source!r} gives this device no training samples; "
            "check [data] options",
            field="data.options",
        )
    model_file = config.training.model_file
    candidates: list[tuple[str, str]] = (
        [(str(model_file), "model_file")]
        if model_file is not None
        else [(m.name, "shipped") for m in shipped_models()]
    )
    models = [_check_model(config, dataset, name, origin) for name, origin in candidates]
    return {
        "data": {
            "source": config.data.source,
            "train_samples": dataset.num_train,
            "test_samples": dataset.num_test,
        },
        "runtime": RUNTIME,
        "models": models,
    }


def _check_model(
    config: AgentConfig, dataset: Dataset, name: str, origin: str
) -> dict[str, object]:
    """Load one candidate model and, if the data fit it, train one batch on them.

    ``origin`` is ``model_file`` (the operator's file: every problem is an error naming
    ``training.model_file``) or ``shipped`` (data that do not fit are only reported).
    """
    from maskfl.agent.training import LocalTrainer

    model_file = config.training.model_file
    try:
        trainer = LocalTrainer.load(
            Path(name) if origin == "model_file" else name,
            num_threads=config.training.threads,
        )
    except ConfigError as exc:
        if origin != "model_file":
            raise
        raise ConfigError(str(exc), field="training.model_file") from exc
    spec = trainer.spec
    entry: dict[str, object] = {
        "model": spec.name,
        "from": origin,
        "parameters": spec.num_params,
        "input_shape": list(spec.input_shape),
        "classes": spec.num_classes,
    }
    try:
        dataset.check_fits(spec.input_shape, spec.num_classes)
    except DataSourceError as exc:
        if origin == "model_file":
            raise DataSourceError(
                f"{exc} (model_file {model_file})", field="training.model_file"
            ) from exc
        entry["fits_data"] = False
        entry["why"] = str(exc)
    else:
        batch = config.training.batch_size
        stats = trainer.train(dataset.x_train[:batch], dataset.y_train[:batch], epochs=1)
        entry["fits_data"] = True
        entry["one_batch_loss"] = round(stats.epoch_losses[0], 4)
    return entry


def _check(path: Path | None) -> int:
    config = _load(path)
    ident = load_identity(config.device)
    check_local_files(config)
    training = check_training(config)
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
                **training,
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
    print(json.dumps([r.public() for r in rounds], indent=1))
    return 0


def _log_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines as text or JSON; auto: text on a terminal or under journald, JSON "
        "otherwise (default: [logging] format, itself auto by default)",
    )


def _run(path: Path | None, log_format: LogFormat | None = None) -> int:
    config = _load(path)
    check_local_files(config)
    setup_logging(config.logging.level, log_format or config.logging.format)
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
