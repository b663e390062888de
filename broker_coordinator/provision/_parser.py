"""The ``maskfl-provision`` argument parser: one function per subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from maskfl.broker_coordinator.provision._settings import (
    BrokerSettings,
    CoordinatorSettings,
    ValiditySettings,
)
from maskfl.models import shipped_models
from maskfl.protocol.version import version_text

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["DEFAULT_MODEL", "PASSPHRASE_ENV", "build_parser"]

PASSPHRASE_ENV = "MASKFL_CA_PASSPHRASE"
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

    _init_parser(sub, common)
    _add_device_parser(sub, common)
    _add_observer_parser(sub, common)
    _revoke_parser(sub, common)
    _rotate_parser(sub, common)
    _broker_config_parser(sub, common)
    _server_cert_parser(sub, common)
    _list_parser(sub, common)
    return parser


def _init_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """init: the fleet's name, broker, model and certificate lifetimes."""
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
    _model_options(init)
    _lifetime_options(init)
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


def _model_options(init: argparse.ArgumentParser) -> None:
    """init: a shipped model, or one of your own, and where the coordinator keeps its state."""
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


def _lifetime_options(init: argparse.ArgumentParser) -> None:
    """init: how long certificates and the CAs are valid."""
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


def _add_device_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """add-device: one device, or --count numbered ones, with keys made here or its own."""
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


def _add_observer_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """add-observer: a read-only identity."""
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


def _revoke_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """revoke: a device or an observer."""
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


def _rotate_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """rotate: new keys for one device or the coordinator."""
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


def _broker_config_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """broker-config: rewrite mosquitto.conf and the ACL, saving options given."""
    broker = sub.add_parser(
        "broker-config",
        parents=[common],
        help="rewrite mosquitto.conf and the ACL",
        description="Rewrite broker/mosquitto.conf and broker/acl from fleet.toml; options "
        "given here are saved to fleet.toml first. Needs no CA key.",
    )
    _broker_options(broker, defaults=False)


def _server_cert_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """server-cert: re-issue the broker's certificate."""
    sub.add_parser(
        "server-cert",
        parents=[common],
        help="re-issue the broker's TLS server certificate",
        description="Re-issue broker/server.crt and server.key for the host names and IPs "
        "in fleet.toml ([broker] host, san_hosts, san_ips, coordinator_host).",
    )


def _list_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """list: the coordinator, devices and observers."""
    listing = sub.add_parser(
        "list",
        parents=[common],
        help="show the coordinator and devices",
        description="The coordinator and every device with its state (active, revoked), "
        "enrollment serial and expiry date, and the revocation list version. Needs no "
        "CA key.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
