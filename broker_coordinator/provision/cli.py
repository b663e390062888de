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
from maskfl.broker_coordinator.provision._fleet import AddOutcome, Fleet, Keys, Status
from maskfl.broker_coordinator.provision._reload import reload_broker
from maskfl.broker_coordinator.provision._settings import (
    BrokerSettings,
    CoordinatorSettings,
    FleetSettings,
    ValiditySettings,
)
from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.models import shipped_model, shipped_models
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.version import version_text

__all__ = ["build_parser", "main"]

PASSPHRASE_ENV = "MASKFL_CA_PASSPHRASE"
EXIT_USAGE = 2
DEFAULT_MODEL = "mlp"

EPILOG = """\
examples:
  maskfl-provision --dir fleet init --fleet demo --host broker.example.org --ip 192.0.2.10
  maskfl-provision --dir fleet init --fleet digits --model cnn   # the shipped CNN
  maskfl-provision --dir fleet add-device pi --count 3      # pi-001 .. pi-003
  maskfl-provision --dir fleet add-device cam-7 --public-key cam-7.pub --tls-csr cam-7.csr
  maskfl-provision --dir fleet add-observer dashboard        # read-only: observers/dashboard/
  maskfl-provision --dir fleet revoke pi-002
  maskfl-provision --dir fleet rotate pi-001
  maskfl-provision --dir fleet list

The CA keys can be passphrase-protected: give the passphrase with --passphrase-file
FILE or in the environment variable MASKFL_CA_PASSPHRASE, at init and later (or
init --ask-passphrase, and type it when a command that signs asks on a terminal).
add-device, add-observer, revoke and rotate change the broker's ACL or CRL: mosquitto
applies them on a reload (SIGHUP). Set it up once and they reload it themselves:
  maskfl-provision --dir fleet broker-config --reload-command 'systemctl reload mosquitto'
  maskfl-provision --dir fleet broker-config --broker-pid-file /run/mosquitto/mosquitto.pid
The coordinator picks up coordinator/revocations.bin by itself.
"""


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes (also accepted before the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="fleet directory (default: the current directory)",
    )
    common.add_argument(
        "--passphrase-file",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"file whose first line is the CA key passphrase (or set {PASSPHRASE_ENV})",
    )
    return common


def _broker_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Broker settings; with defaults=False (broker-config) unset ones keep fleet.toml's."""
    d = BrokerSettings()

    def default(value: object) -> object:
        return value if defaults else None

    parser.add_argument(
        "--port", type=int, default=default(d.port), help=f"TLS listener port (default {d.port})"
    )
    parser.add_argument(
        "--bind", default=default(d.bind), help=f"TLS listener address (default {d.bind})"
    )
    parser.add_argument(
        "--dev-port",
        type=int,
        default=default(d.dev_port),
        metavar="PORT",
        help="also open a plain, anonymous listener on 127.0.0.1:PORT "
        "(development only; 0 = none, the default)",
    )
    parser.add_argument(
        "--broker-config-dir",
        default=default(d.config_dir),
        metavar="PATH",
        help=f"where mosquitto sees the broker/ files (default {d.config_dir})",
    )
    parser.add_argument(
        "--broker-data-dir",
        default=default(d.data_dir),
        metavar="PATH",
        help=f"mosquitto persistence location (default {d.data_dir})",
    )
    parser.add_argument(
        "--broker-user",
        default=default(d.user),
        metavar="USER",
        help="mosquitto's `user` option (default: mosquitto's own, `mosquitto`)",
    )
    parser.add_argument(
        "--reload-command",
        default=default(d.reload_command),
        metavar="CMD",
        help="run after add-device, add-observer, revoke and rotate so the broker applies "
        "the new ACL and CRL, e.g. 'systemctl reload mosquitto' (no shell; '' = none)",
    )
    parser.add_argument(
        "--broker-pid-file",
        default=default(d.pid_file),
        metavar="FILE",
        help="or: send SIGHUP to the mosquitto whose pid is in FILE after those commands",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="maskfl-provision",
        description="Provision a maskfl fleet: CAs, broker TLS and ACL, coordinator and "
        "device bundles, revocation and rotation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=version_text("maskfl-provision"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        parents=[common],
        help="create a fleet: CAs, broker and coordinator files",
        description="Create a fleet directory: the fleet CA (Ed25519), the broker's TLS CA "
        "and server certificate, the coordinator's identity and bundle, mosquitto.conf, "
        "the ACL, the CRL, the revocation list and fleet.toml.",
    )
    init.add_argument("--fleet", required=True, help="fleet name ([A-Za-z0-9_-]{1,64})")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="broker DNS name for the server certificate; repeatable; the "
        "first is what devices connect to (default: localhost)",
    )
    init.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="broker IP for the server certificate; repeatable (default: 127.0.0.1)",
    )
    init.add_argument(
        "--coordinator-host",
        default=BrokerSettings().coordinator_host,
        metavar="NAME",
        help="what the coordinator connects to (default: mosquitto, the "
        "compose service; localhost for a bare-metal install)",
    )
    _broker_options(init, defaults=True)
    init.add_argument(
        "--model",
        metavar="NAME",
        help=f"shipped model to train ({', '.join(m.name for m in shipped_models())}; "
        f"default {DEFAULT_MODEL}): its .tflite and initial weights are copied into the "
        "coordinator bundle and named in coordinator.toml [model]",
    )
    init.add_argument(
        "--model-id",
        metavar="ID",
        help="a model of your own instead of --model: its id (with --model-length); "
        "add its initial_weights and graph_file to coordinator.toml yourself",
    )
    init.add_argument(
        "--model-length",
        type=int,
        metavar="M",
        help="a model of your own: its flat weight vector length (with --model-id)",
    )
    init.add_argument(
        "--coordinator-state-dir",
        default=CoordinatorSettings().state_dir,
        metavar="PATH",
        help="the coordinator's SQLite state folder (default: /var/lib/maskfl-coordinator)",
    )
    init.add_argument(
        "--device-days",
        type=int,
        default=ValiditySettings().device_days,
        help="enrollment certificate lifetime in days (default 825)",
    )
    init.add_argument(
        "--tls-days",
        type=int,
        default=ValiditySettings().tls_days,
        help="TLS certificate lifetime in days (default 825)",
    )
    init.add_argument(
        "--ca-days",
        type=int,
        default=ValiditySettings().ca_days,
        help="CA lifetime in days (default 3650)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing fleet (its CA is lost; re-provision everything)",
    )
    init.add_argument(
        "--ask-passphrase",
        action="store_true",
        help="protect the CA keys with a passphrase typed on the terminal (twice); later "
        "commands that sign ask for it on a terminal, or read --passphrase-file or "
        f"{PASSPHRASE_ENV}",
    )

    add = sub.add_parser(
        "add-device",
        parents=[common],
        help="enroll devices and write their bundles",
        description="Enroll a device: Ed25519 signing key (or the device's own public key), "
        "enrollment certificate, TLS client certificate, ACL entry, and a bundle "
        "devices/ID/ plus devices/ID.tar.gz. Re-running for an enrolled device changes nothing.",
    )
    add.add_argument("id", help="device id ([A-Za-z0-9_-]{1,64}); with --count, a prefix")
    add.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="enroll N numbered devices ID-001, ID-002 ...; revoked numbers are skipped "
        "and numbering continues after them (--count 1 makes ID-001)",
    )
    add.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the device generated its own Ed25519 key: its public key (PEM)",
    )
    add.add_argument(
        "--tls-csr",
        type=Path,
        metavar="CSR",
        help="the device generated its own TLS key: its certificate request (PEM)",
    )
    add.add_argument(
        "--force",
        action="store_true",
        help="re-issue an enrolled device (its old credentials are revoked), "
        "re-enroll a revoked one, or overwrite a stray bundle",
    )

    observer = sub.add_parser(
        "add-observer",
        parents=[common],
        help="issue a read-only identity (operators, dashboards, mosquitto_sub)",
        description="Issue a read-only broker identity: a TLS client certificate and an ACL "
        "block that reads round parameters, sum dictionaries, models, device status and the "
        "revocation list and publishes nothing. Writes observers/NAME/ (with a README "
        "showing the mosquitto_sub command). It takes no part in rounds. Revoke it with "
        "`revoke NAME`. Re-running for an existing observer changes nothing.",
    )
    observer.add_argument("name", help="observer name ([A-Za-z0-9_-]{1,64}, not a device id)")
    observer.add_argument(
        "--force",
        action="store_true",
        help="re-issue an existing observer (its old certificate is revoked) or a revoked one",
    )

    revoke = sub.add_parser(
        "revoke",
        parents=[common],
        help="revoke a device or an observer (revocation list, CRL, ACL)",
        description="Revoke a device: its serials join the signed revocation list and its "
        "TLS certificate the CRL, its ACL entries are removed. No other device is touched. "
        "An observer's TLS certificate joins the CRL and its ACL entries are removed.",
    )
    revoke.add_argument(
        "id", help="the device id or observer name to revoke (see `maskfl-provision list`)"
    )

    rotate = sub.add_parser(
        "rotate",
        parents=[common],
        help="new keys and certificates for one device",
        description="Issue new keys and certificates for one device (or `coordinator`) and "
        "revoke the old ones; writes a new bundle. No other device is touched.",
    )
    rotate.add_argument("id", help="the device id, or `coordinator`")
    rotate.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the device's new public key, if it generated its own",
    )
    rotate.add_argument(
        "--tls-csr",
        type=Path,
        metavar="CSR",
        help="the device's new TLS certificate request, if it made its own",
    )

    broker = sub.add_parser(
        "broker-config",
        parents=[common],
        help="rewrite mosquitto.conf and the ACL",
        description="Rewrite broker/mosquitto.conf and broker/acl from fleet.toml; options "
        "given here are saved to fleet.toml first. Needs no CA key.",
    )
    _broker_options(broker, defaults=False)

    sub.add_parser(
        "server-cert",
        parents=[common],
        help="re-issue the broker's TLS server certificate",
        description="Re-issue broker/server.crt and server.key for the host names and IPs "
        "in fleet.toml ([broker] host, san_hosts, san_ips, coordinator_host).",
    )

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="show the coordinator and devices",
        description="The coordinator and every device with its state (active, revoked), "
        "enrollment serial and expiry date, and the revocation list version. Needs no "
        "CA key.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


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
        passphrase = getpass.getpass("CA key passphrase: ").encode() or None
    return fleet.unlock(passphrase)


def _new_passphrase(args: argparse.Namespace) -> bytes | None:
    """init's passphrase: --passphrase-file, the environment, or --ask-passphrase."""
    passphrase = _passphrase(args)
    if passphrase is None and args.ask_passphrase:
        first = getpass.getpass("new CA key passphrase: ")
        if not first:
            raise ProvisionError(
                "an empty passphrase protects nothing; give one or omit --ask-passphrase"
            )
        if getpass.getpass("again: ") != first:
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
    ids = fleet.device_ids(args.id, args.count, force=args.force)
    if args.count is not None and (args.public_key or args.tls_csr):
        raise ProvisionError("--public-key and --tls-csr enroll one device; drop --count")
    if args.count is not None and not args.force:
        for device in fleet.revoked_numbered(args.id, ids):
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
