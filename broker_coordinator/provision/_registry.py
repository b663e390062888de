"""The fleet's registry (registry.json: devices, serials, revocations) and its directory layout."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from maskfl.broker_coordinator.provision import _bundle as b
from maskfl.broker_coordinator.provision._broker import COORDINATOR_USER
from maskfl.broker_coordinator.provision._settings import check_id
from maskfl.broker_coordinator.provision.errors import ProvisionError

REGISTRY_VERSION = 1


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass
class Credentials:
    """One issued pair of credentials: enrollment certificate and TLS client certificate.

    (Was ``Enrollment``; that name is the coordinator's check of senders,
    :class:`maskfl.broker_coordinator.enrollment.Enrollment`. The registry file's
    JSON is unchanged.)"""

    serial: int
    public_key: str
    tls_serial: int
    issued_at: int
    not_after: int
    own_key: bool = False
    own_tls_key: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "public_key": self.public_key,
            "tls_serial": str(self.tls_serial),
            "issued_at": self.issued_at,
            "not_after": self.not_after,
            "own_key": self.own_key,
            "own_tls_key": self.own_tls_key,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Credentials:
        return cls(
            serial=int(raw["serial"]),
            public_key=str(raw["public_key"]),
            tls_serial=int(raw["tls_serial"]),
            issued_at=int(raw["issued_at"]),
            not_after=int(raw["not_after"]),
            own_key=bool(raw.get("own_key", False)),
            own_tls_key=bool(raw.get("own_tls_key", False)),
        )


@dataclass
class Revoked:
    subject: str
    serial: int
    tls_serial: int
    revoked_at: int
    why: str

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "serial": self.serial,
            "tls_serial": str(self.tls_serial),
            "revoked_at": self.revoked_at,
            "why": self.why,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Revoked:
        return cls(
            subject=str(raw["subject"]),
            serial=int(raw["serial"]),
            tls_serial=int(raw["tls_serial"]),
            revoked_at=int(raw["revoked_at"]),
            why=str(raw["why"]),
        )


@dataclass
class Member:
    """A device (or the coordinator) and its current enrollment."""

    id: str
    status: Status
    current: Credentials

    def to_json(self) -> dict[str, Any]:
        return {"status": str(self.status), "current": self.current.to_json()}


@dataclass
class Registry:
    fleet: str
    next_serial: int = 1
    revocations_version: int = 0
    coordinator: Credentials | None = None
    devices: dict[str, Member] = field(default_factory=dict)
    revoked: list[Revoked] = field(default_factory=list)
    observers: dict[str, Member] = field(default_factory=dict)
    """Read-only identities: a TLS client certificate and an ACL block that only reads;
    no enrollment certificate (their ``Credentials.serial`` is 0), so no protocol role."""

    def take_serial(self) -> int:
        serial = self.next_serial
        self.next_serial += 1
        return serial

    def active_devices(self) -> list[str]:
        return sorted(d for d, m in self.devices.items() if m.status is Status.ACTIVE)

    def active_observers(self) -> list[str]:
        return sorted(o for o, m in self.observers.items() if m.status is Status.ACTIVE)

    def device_ids(self, base: str, count: int | None, *, force: bool = False) -> list[str]:
        """The ids ``add-device BASE [--count N]`` works on.

        Without ``count``: ``base`` itself. With ``count`` (1 included): the first
        ``count`` of ``BASE-001``, ``BASE-002`` ... that are not revoked, so a fleet
        grows past a revoked device (``pi-004`` revoked: ``--count 6`` is pi-001 ..
        pi-003 and pi-005 .. pi-007) instead of stopping at it. ``force`` takes the
        first ``count`` ids as they are (it re-enrolls revoked ones).
        """
        if count is None:
            ids = [base]
        elif count < 1:
            raise ProvisionError("--count must be at least 1")
        elif force:
            ids = numbered_device_ids(base, count)
        else:
            ids = []
            number = 0
            while len(ids) < count:
                number += 1
                device = numbered_device_id(base, number)
                member = self.devices.get(device)
                if member is None or member.status is not Status.REVOKED:
                    ids.append(device)
        for device in ids:
            check_id(device, "device id")
            if device == COORDINATOR_USER:
                raise ProvisionError(f"{device!r} is reserved for the coordinator; pick another id")
            if device in self.observers:
                raise ProvisionError(f"{device!r} is an observer's name; pick another id")
        return ids

    def revoked_numbered(self, base: str, ids: list[str]) -> list[str]:
        """The revoked ``BASE-NNN`` ids that :meth:`device_ids` stepped over for ``ids``."""
        if not ids:
            return []
        last = ids[-1]
        return [
            device
            for device, member in sorted(self.devices.items())
            if member.status is Status.REVOKED
            and device.startswith(f"{base}-")
            and device[len(base) + 1 :].isdigit()
            and (len(device), device) < (len(last), last)
        ]

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": REGISTRY_VERSION,
                    "fleet": self.fleet,
                    "next_serial": self.next_serial,
                    "revocations_version": self.revocations_version,
                    "coordinator": self.coordinator.to_json() if self.coordinator else None,
                    "devices": {k: self.devices[k].to_json() for k in sorted(self.devices)},
                    "revoked": [r.to_json() for r in self.revoked],
                    "observers": {k: self.observers[k].to_json() for k in sorted(self.observers)},
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str, path: Path) -> Registry:
        try:
            raw = json.loads(text)
            if raw.get("format") != REGISTRY_VERSION:
                raise ProvisionError(f"{path}: unsupported registry format {raw.get('format')!r}")
            coordinator = raw.get("coordinator")
            return cls(
                fleet=str(raw["fleet"]),
                next_serial=int(raw["next_serial"]),
                revocations_version=int(raw["revocations_version"]),
                coordinator=Credentials.from_json(coordinator) if coordinator else None,
                devices={
                    name: Member(name, Status(m["status"]), Credentials.from_json(m["current"]))
                    for name, m in raw["devices"].items()
                },
                revoked=[Revoked.from_json(r) for r in raw["revoked"]],
                observers={
                    name: Member(name, Status(m["status"]), Credentials.from_json(m["current"]))
                    for name, m in raw.get("observers", {}).items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProvisionError(f"{path} is damaged ({exc}); restore it from a backup") from exc


@dataclass(frozen=True)
class Layout:
    """Every path of a fleet directory."""

    root: Path

    @property
    def fleet_toml(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def fleet_ca_key(self) -> Path:
        return self.ca_dir / "fleet-ca.key"

    @property
    def fleet_ca_pub(self) -> Path:
        return self.ca_dir / "fleet-ca.pub"

    @property
    def tls_ca_key(self) -> Path:
        return self.ca_dir / "tls-ca.key"

    @property
    def tls_ca_cert(self) -> Path:
        return self.ca_dir / "tls-ca.crt"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def revocations(self) -> Path:
        """The signed revocation list the running coordinator watches (by mtime)."""
        return self.coordinator_dir / b.COORD_REVOCATIONS

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    def bundle_dir(self, device: str) -> Path:
        return self.devices_dir / device

    def bundle_tar(self, device: str) -> Path:
        return self.devices_dir / f"{device}.tar.gz"

    @property
    def observers_dir(self) -> Path:
        return self.root / "observers"

    def observer_dir(self, name: str) -> Path:
        return self.observers_dir / name


def unix_time(now: dt.datetime) -> int:
    return int(now.timestamp())


def numbered_device_ids(base: str, count: int) -> list[str]:
    """The ids ``add-device BASE --count COUNT`` enrolls: ``BASE-001`` ... ``BASE-COUNT``.

    At least three digits, more only where the number needs them (``dev-999``,
    ``dev-1000``), so an id never changes when a fleet grows. Everything that
    names numbered devices (the demo, benchmarks) calls this one function.
    """
    return [numbered_device_id(base, i) for i in range(1, count + 1)]


def numbered_device_id(base: str, number: int) -> str:
    """The ``number``-th numbered id: ``BASE-001``, ..., ``BASE-999``, ``BASE-1000``."""
    return f"{base}-{number:03d}"


@contextlib.contextmanager
def lock_fleet(layout: Layout) -> Iterator[None]:
    """One provisioning command at a time per fleet directory."""
    try:
        handle = layout.lock.open("a")
    except OSError as exc:
        raise ProvisionError(f"cannot lock {layout.lock}: {exc.strerror or exc}") from exc
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ProvisionError(
                f"another maskfl-provision is working on {layout.root}; retry when it is done"
            ) from exc
        yield
