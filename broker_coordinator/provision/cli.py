"""``maskfl-provision``: create a fleet, add, revoke and rotate devices, write broker config.

Every subcommand works on a fleet directory (``--dir``, default: the current
directory). User errors (an existing fleet without ``--force``, an unknown
device, a wrong passphrase, a bad file) print one line on stderr and exit 2;
nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from maskfl.broker_coordinator.provision._broker import COORDINATOR_USER
from maskfl.broker_coordinator.provision._fleet import AddOutcome, Fleet
from maskfl.broker_coordinator.provision._issue import Keys
from maskfl.broker_coordinator.provision._parser import DEFAULT_MODEL, PASSPHRASE_ENV, build_parser
from maskfl.broker_coordinator.provision._registry import Status
from maskfl.broker_coordinator.provision._reload import reload_broker
from maskfl.broker_coordinator.provision._settings import (
    BrokerSettings,
    CoordinatorSettings,
    FleetSettings,
    ValiditySettings,
)
from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.models import shipped_model
from maskfl.protocol.errors import MaskflError

__all__ = ["PASSPHRASE_ENV", "build_parser", "main"]

EXIT_USAGE = 2


def _passphrase(args: argparse.Namespace) -> bytes | None:
    path: Path | None = getattr(args, "passphrase_file", None)
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProvisionError(f"--passphrase-file {path}: {exc.strerror or exc}") from exc
        line = text.splitlines()[0] if text else ""
        if not line:
            raise ProvisionError(f"--passphrase-file {path} is empty")
        return line.encode()
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def _unlock(fleet: Fleet, args: argparse.Namespace) -> Keys:
    """The CA keys, with the passphrase from --passphrase-file or the environment, or
    asked for on the terminal when the keys are protected and neither gives one."""
    passphrase = _passphrase(args)
    if passphrase is None and fleet.ca_encrypted() and sys.stdin.isatty():
        typed = _ask("CA key passphrase: ", "signing with the protected CA key")
        passphrase = typed.encode() or None
    return fleet.unlock(passphrase)


def _ask(prompt: str, option: str) -> str:
    """A passphrase typed on the terminal; a ProvisionError naming ``option`` and the ways
    around it where there is no terminal (stdin redirected, as under cron or a pipe) or
    nothing was typed (end of input)."""
    try:
        if sys.stdin.isatty():
            return getpass.getpass(prompt)
    except EOFError:
        pass
    raise ProvisionError(
        f"{option} needs a terminal to type the passphrase on, and stdin is none (or at its "
        f"end); give it with --passphrase-file FILE or the {PASSPHRASE_ENV} environment variable"
    )


def _new_passphrase(args: argparse.Namespace) -> bytes | None:
    """init's passphrase: --passphrase-file, the environment, or --ask-passphrase."""
    passphrase = _passphrase(args)
    if passphrase is None and args.ask_passphrase:
        first = _ask("new CA key passphrase: ", "--ask-passphrase")
        if not first:
            raise ProvisionError(
                "an empty passphrase protects nothing; give one or omit --ask-passphrase"
            )
        if _ask("again: ", "--ask-passphrase") != first:
            raise ProvisionError("the two passphrases differ; nothing was created")
        passphrase = first.encode()
    return passphrase


def _read_optional(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProvisionError(f"{option} {path}: {exc.strerror or exc}") from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _model_settings(args: argparse.Namespace) -> CoordinatorSettings:
    """--model NAME (shipped; the default) or --model-id with --model-length (your own)."""
    own = args.model_id is not None or args.model_length is not None
    if not own:
        model = shipped_model(args.model or DEFAULT_MODEL)
        return CoordinatorSettings(
            model_id=model.name,
            model_length=model.num_params,
            state_dir=args.coordinator_state_dir,
            shipped_model=model.name,
        )
    if args.model is not None:
        raise ProvisionError(
            "--model picks a shipped model, --model-id/--model-length describe one of "
            "your own: give one or the other"
        )
    if args.model_id is None or args.model_length is None:
        raise ProvisionError("a model of your own needs both --model-id and --model-length")
    return CoordinatorSettings(
        model_id=args.model_id,
        model_length=args.model_length,
        state_dir=args.coordinator_state_dir,
    )


def _cmd_init(args: argparse.Namespace, root: Path) -> None:
    hosts = args.host or ["localhost"]
    ips = args.ip or ([] if args.host else ["127.0.0.1"])
    settings = FleetSettings(
        name=args.fleet,
        broker=BrokerSettings(
            host=hosts[0],
            port=args.port,
            bind=args.bind,
            coordinator_host=args.coordinator_host,
            san_hosts=tuple(hosts),
            san_ips=tuple(ips),
            config_dir=args.broker_config_dir,
            data_dir=args.broker_data_dir,
            dev_port=args.dev_port,
            user=args.broker_user,
            reload_command=args.reload_command,
            pid_file=args.broker_pid_file,
        ),
        validity=ValiditySettings(
            ca_days=args.ca_days, device_days=args.device_days, tls_days=args.tls_days
        ),
        coordinator=_model_settings(args),
    )
    passphrase = _new_passphrase(args)
    Fleet.init(root, settings, now=_now(), passphrase=passphrase, force=args.force)
    protected = "passphrase-protected" if passphrase else "NOT passphrase-protected"
    print(f"fleet {args.fleet!r} created in {root} (CA keys {protected})")
    print(f"  broker files:      {root / 'broker'}  (mount at {args.broker_config_dir})")
    print(f"  coordinator:       {root / 'coordinator'}")
    model = settings.coordinator
    if model.shipped_model:
        print(f"  model:             {model.shipped_model} (graph and initial weights copied)")
    else:
        print(
            f"  model:             {model.model_id}, {model.model_length} weights: add "
            "[model] initial_weights and graph_file to coordinator.toml"
        )
    print(f"  next: maskfl-provision --dir {root} add-device ID")


def _cmd_add(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    ids = fleet.registry.device_ids(args.id, args.count, force=args.force)
    if args.count is not None and (args.public_key or args.tls_csr):
        raise ProvisionError("--public-key and --tls-csr enroll one device; drop --count")
    if args.count is not None and not args.force:
        for device in fleet.registry.revoked_numbered(args.id, ids):
            print(f"{device}: revoked, skipped (numbering continues after it)")
    public_key = _read_optional(args.public_key, "--public-key")
    csr = _read_optional(args.tls_csr, "--tls-csr")
    with fleet.locked():
        fleet = Fleet.open(root)
        pending = [d for d in ids if args.force or d not in fleet.registry.devices]
        if not pending and all(fleet.registry.devices[d].status is Status.ACTIVE for d in ids):
            for device in ids:
                print(f"{device}: already enrolled, nothing changed")
            return
        keys = _unlock(fleet, args)
        now = _now()
        changed = False
        for device in ids:
            outcome = fleet.add_device(
                device,
                keys,
                now=now,
                public_key_pem=public_key,
                tls_csr_pem=csr,
                force=args.force,
            )
            if outcome is AddOutcome.UNCHANGED:
                print(f"{device}: already enrolled, nothing changed")
            else:
                changed = True
                print(f"{device}: {outcome} -> {fleet.layout.bundle_tar(device)}")
    if changed:
        _reload(fleet)


def _reload(fleet: Fleet) -> None:
    """The ACL or CRL changed: reload the broker as fleet.toml says, in one line."""
    print(f"  {reload_broker(fleet.settings.broker)}")


def _cmd_add_observer(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    with fleet.locked():
        fleet = Fleet.open(root)
        member = fleet.registry.observers.get(args.name)
        if member is not None and member.status is Status.ACTIVE and not args.force:
            print(f"{args.name}: already issued, nothing changed")
            return
        keys = _unlock(fleet, args)
        outcome = fleet.add_observer(args.name, keys, now=_now(), force=args.force)
    print(f"{args.name}: read-only observer {outcome} -> {fleet.layout.observer_dir(args.name)}")
    _reload(fleet)


def _cmd_revoke(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    with fleet.locked():
        fleet = Fleet.open(root)
        fleet.member(args.id)  # unknown id: fail before asking for the passphrase
        keys = _unlock(fleet, args)
        changed = fleet.revoke(args.id, keys, now=_now())
    state = "revoked" if changed else "was already revoked (files rewritten)"
    print(f"{args.id}: {state}; revocation list version {fleet.registry.revocations_version}")
    _reload(fleet)


def _cmd_rotate(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    public_key = _read_optional(args.public_key, "--public-key")
    csr = _read_optional(args.tls_csr, "--tls-csr")
    with fleet.locked():
        fleet = Fleet.open(root)
        if args.id != COORDINATOR_USER:
            fleet.member(args.id)
        keys = _unlock(fleet, args)
        fleet.rotate(args.id, keys, now=_now(), public_key_pem=public_key, tls_csr_pem=csr)
    if args.id == COORDINATOR_USER:
        where = fleet.layout.coordinator_dir
    elif args.id in fleet.registry.observers:
        where = fleet.layout.observer_dir(args.id)
    else:
        where = fleet.layout.bundle_tar(args.id)
    print(f"{args.id}: rotated -> {where}; old credentials revoked")
    _reload(fleet)


def _cmd_broker_config(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    with fleet.locked():
        fleet = Fleet.open(root)
        changes = {
            name: value
            for name, value in (
                ("port", args.port),
                ("bind", args.bind),
                ("dev_port", args.dev_port),
                ("config_dir", args.broker_config_dir),
                ("data_dir", args.broker_data_dir),
                ("user", args.broker_user),
                ("reload_command", args.reload_command),
                ("pid_file", args.broker_pid_file),
            )
            if value is not None
        }
        if changes:
            settings = replace(fleet.settings, broker=replace(fleet.settings.broker, **changes))
            fleet.save_settings(settings)
        fleet.write_broker_config()
    print(f"wrote {fleet.layout.broker_dir / 'mosquitto.conf'} and acl")


def _cmd_server_cert(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    with fleet.locked():
        keys = _unlock(fleet, args)
        fleet.write_server_cert(keys, _now())
    print(f"wrote {fleet.layout.broker_dir / 'server.crt'}; restart the broker to use it")


def _cmd_list(args: argparse.Namespace, root: Path) -> None:
    fleet = Fleet.open(root)
    reg = fleet.registry
    members = sorted(reg.devices.items())
    if args.json:
        rows = [
            {
                "id": name,
                "status": str(m.status),
                "serial": m.current.serial,
                "own_key": m.current.own_key,
                "not_after": m.current.not_after,
            }
            for name, m in members
        ]
        report = {
            "fleet": reg.fleet,
            "revocations_version": reg.revocations_version,
            "coordinator_serial": reg.coordinator.serial if reg.coordinator else None,
            "devices": rows,
            "observers": [
                {"id": name, "status": str(m.status), "not_after": m.current.not_after}
                for name, m in sorted(reg.observers.items())
            ],
            "revoked_serials": [r.serial for r in reg.revoked if r.serial],
        }
        print(json.dumps(report, indent=2))
        return
    print(
        f"fleet {reg.fleet!r}: revocation list version {reg.revocations_version}, "
        f"{len(reg.revoked)} revoked serials"
    )
    if reg.coordinator:
        print(f"  {'coordinator':<16} {'active':<8} serial {reg.coordinator.serial}")
    for name, m in members:
        expires = dt.datetime.fromtimestamp(m.current.not_after, dt.UTC).date()
        print(f"  {name:<16} {m.status:<8} serial {m.current.serial}  expires {expires}")
    for name, m in sorted(reg.observers.items()):
        expires = dt.datetime.fromtimestamp(m.current.not_after, dt.UTC).date()
        print(f"  {name:<16} {m.status:<8} observer (read-only)  expires {expires}")


COMMANDS = {
    "init": _cmd_init,
    "add-device": _cmd_add,
    "add-observer": _cmd_add_observer,
    "revoke": _cmd_revoke,
    "rotate": _cmd_rotate,
    "broker-config": _cmd_broker_config,
    "server-cert": _cmd_server_cert,
    "list": _cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = Path(getattr(args, "dir", Path.cwd()))
    try:
        COMMANDS[args.command](args, root)
    except MaskflError as exc:
        print(f"maskfl-provision: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("maskfl-provision: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
