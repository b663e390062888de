"""``fleet.toml``: the operator's settings of one fleet, read by every subcommand.

``init`` writes it from its options; the operator may edit it afterwards (for
example to move the broker to another host name) and re-run
``maskfl-provision broker-config``. Unknown keys and wrong types are refused
with a one-line message naming the key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.models import shipped_model
from maskfl.protocol.errors import ConfigError

T = TypeVar("T")

HOST_PATTERN = re.compile(r"^[A-Za-z0-9*_:.-]{1,253}$")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value):
        raise ProvisionError(f"{what} {value!r} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """How devices and the coordinator reach the broker, and where its files live."""

    host: str = "localhost"
    """What devices connect to (the first --host)."""
    port: int = 8883
    bind: str = "0.0.0.0"
    coordinator_host: str = "mosquitto"
    """What the coordinator connects to: the compose service name by default."""
    san_hosts: tuple[str, ...] = ("localhost", "mosquitto")
    san_ips: tuple[str, ...] = ("127.0.0.1",)
    config_dir: str = "/mosquitto/config"
    """Where the broker sees the files of the fleet's broker/ folder."""
    data_dir: str = "/mosquitto/data"
    dev_port: int = 0
    """A plain anonymous loopback listener for development; 0 = none."""
    user: str = ""
    """mosquitto's ``user`` option; empty keeps its default (``mosquitto``)."""
    reload_command: str = ""
    """Run after a change to the ACL or CRL so the broker applies it (for example
    ``systemctl reload mosquitto`` or ``docker compose kill -s HUP mosquitto``)."""
    pid_file: str = ""
    """Or: a file whose first word is mosquitto's pid; it gets SIGHUP after a change (a
    second word, if any, is the process's start time in /proc/PID/stat, as ``maskfl-fleet``
    writes it; a pid that is not mosquitto's, or started at another time, is not signalled)."""


@dataclass(frozen=True)
class ValiditySettings:
    ca_days: int = 3650
    device_days: int = 825
    tls_days: int = 825


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the coordinator bundle's coordinator.toml is written with.

    ``shipped_model`` names a model of ``maskfl.models`` whose ``.tflite`` and initial
    weights are copied into the bundle (and named in ``[model]``); empty for a model
    of your own, whose files the operator adds.
    """

    model_id: str = "mlp"
    model_length: int = 4810
    state_dir: str = "/var/lib/maskfl-coordinator"
    shipped_model: str = ""


@dataclass(frozen=True)
class FleetSettings:
    name: str
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    validity: ValiditySettings = field(default_factory=ValiditySettings)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)

    def __post_init__(self) -> None:  # noqa: PLR0912 one check per field, each naming it
        check_id(self.name, "fleet name")
        check_id(self.coordinator.model_id, "model id")
        for port_name in ("port", "dev_port"):
            port = getattr(self.broker, port_name)
            if not (0 if port_name == "dev_port" else 1) <= port <= 65535:
                raise ProvisionError(f"broker.{port_name} {port} is not a TCP port")
        for ip in self.broker.san_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ProvisionError(
                    f"broker.san_ips: {ip!r} is not an IP address (check --ip)"
                ) from exc
        for host in (self.broker.host, self.broker.coordinator_host, *self.broker.san_hosts):
            if not HOST_PATTERN.match(host):
                raise ProvisionError(
                    f"broker host name {host!r} is not valid (check --host, --coordinator-host)"
                )
        if self.broker.dev_port and self.broker.dev_port == self.broker.port:
            raise ProvisionError("broker.dev_port must differ from broker.port")
        for name in ("ca_days", "device_days", "tls_days"):
            if getattr(self.validity, name) < 1:
                raise ProvisionError(f"validity.{name} must be at least 1")
        if self.coordinator.model_length < 1:
            raise ProvisionError("coordinator.model_length must be at least 1")
        if self.coordinator.shipped_model:
            try:
                model = shipped_model(self.coordinator.shipped_model)
            except ConfigError as exc:
                raise ProvisionError(f"coordinator.shipped_model: {exc}") from exc
            if self.coordinator.model_length != model.num_params:
                raise ProvisionError(
                    f"coordinator.model_length is {self.coordinator.model_length} but the "
                    f"shipped model {model.name!r} has {model.num_params} weights: fix model_length"
                )

    def to_toml(self) -> str:
        header = (
            f"# maskfl fleet {self.name!r}: settings read by every maskfl-provision command.\n"
            "# After editing [broker], run `maskfl-provision broker-config` (host names and\n"
            "# IPs of the server certificate take effect with `maskfl-provision server-cert`).\n\n"
        )
        data = {"fleet": {"name": self.name}} | {
            "broker": _plain(asdict(self.broker)),
            "validity": asdict(self.validity),
            "coordinator": asdict(self.coordinator),
        }
        return header + tomli_w.dumps(data)

    @classmethod
    def from_toml(cls, path: Path) -> FleetSettings:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ProvisionError(
                f"{path} not found: is --dir a fleet directory? (create one with init)"
            ) from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProvisionError(f"cannot read {path}: {exc}") from exc
        unknown = set(raw) - {"fleet", "broker", "validity", "coordinator"}
        if unknown:
            raise ProvisionError(f"{path}: unknown section [{sorted(unknown)[0]}]")
        fleet = raw.get("fleet", {})
        name = fleet.get("name") if isinstance(fleet, dict) else None
        if not isinstance(name, str):
            raise ProvisionError(f"{path}: [fleet] name is required")
        return cls(
            name=name,
            broker=_section(BrokerSettings, raw.get("broker", {}), path, "broker"),
            validity=_section(ValiditySettings, raw.get("validity", {}), path, "validity"),
            coordinator=_section(
                CoordinatorSettings, raw.get("coordinator", {}), path, "coordinator"
            ),
        )


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _section(kind: type[T], raw: object, path: Path, name: str) -> T:
    if not isinstance(raw, dict):
        raise ProvisionError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(kind)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = known.get(key)
        if spec is None:
            raise ProvisionError(f"{path}: [{name}] {key} is not a known key")
        default = getattr(kind(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProvisionError(f"{path}: [{name}] {key} must be a list of strings")
            values[key] = tuple(value)
            continue
        if type(value) is not type(default):
            raise ProvisionError(
                f"{path}: [{name}] {key} must be a {type(default).__name__}, got {value!r}"
            )
        values[key] = value
    return kind(**values)
