"""A fleet directory and the operations on it: init, add, revoke, rotate.

Layout of a fleet directory (``--dir``)::

    fleet.toml                 the operator's settings (_settings.py)
    registry.json              devices, serials, revocations (machine-managed)
    ca/                        0700: the only place CA private keys ever live
        fleet-ca.key           Ed25519 PKCS#8 PEM, 0600, passphrase-protected if asked
        fleet-ca.pub           its public key (PEM)
        tls-ca.key             ECDSA P-256 PEM, 0600, same passphrase
        tls-ca.crt             the broker CA certificate
    broker/                    what mosquitto reads (mount it at broker.config_dir)
        mosquitto.conf  acl  ca.crt  server.crt  server.key (0640)  crl.pem
    coordinator/               the coordinator bundle (coordinator.toml and its files)
        revocations.bin        the signed revocation list, replaced atomically
    devices/<id>/              one bundle per device, and devices/<id>.tar.gz
    observers/<name>/          one read-only observer's TLS files (add-observer)

The registry is the source of truth: ``revocations.bin``, ``crl.pem`` and the
ACL are derived from it and rewritten (each atomically) after every change, so
re-running a command after a crash repairs them. Private keys of devices exist
only in their bundles; a deleted bundle cannot be recreated, only re-issued
(``rotate``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import grp
import ipaddress
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import nacl.signing
from cryptography.hazmat.primitives.asymmetric import ec

from maskfl.broker_coordinator.provision import _bundle as b
from maskfl.broker_coordinator.provision import _tls
from maskfl.broker_coordinator.provision._broker import (
    ACL_FILE,
    CA_FILE,
    CONF_FILE,
    COORDINATOR_USER,
    CRL_FILE,
    SERVER_CERT,
    SERVER_KEY,
    BrokerFiles,
    render_acl,
    render_mosquitto_conf,
)
from maskfl.broker_coordinator.provision._files import (
    GROUP_READ,
    PRIVATE,
    PRIVATE_DIR,
    PUBLIC,
    make_dir,
    read_bytes,
    write_atomic,
)
from maskfl.broker_coordinator.provision._settings import FleetSettings, check_id
from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.models import shipped_model
from maskfl.protocol.errors import CryptoError
from maskfl.protocol.identity import (
    Certificate,
    RevocationList,
    issue_certificate,
    issue_revocation_list,
)
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import (
    public_key_from_pem,
    public_key_to_pem,
    signing_key_from_pem,
    signing_key_to_pem,
)

REGISTRY_VERSION = 1


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass
class Enrollment:
    """One issued pair of credentials: enrollment certificate and TLS client certificate."""

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
    def from_json(cls, raw: dict[str, Any]) -> Enrollment:
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
    current: Enrollment

    def to_json(self) -> dict[str, Any]:
        return {"status": str(self.status), "current": self.current.to_json()}


@dataclass
class Registry:
    fleet: str
    next_serial: int = 1
    revocations_version: int = 0
    coordinator: Enrollment | None = None
    devices: dict[str, Member] = field(default_factory=dict)
    revoked: list[Revoked] = field(default_factory=list)
    observers: dict[str, Member] = field(default_factory=dict)
    """Read-only identities: a TLS client certificate and an ACL block that only reads;
    no enrollment certificate (their ``Enrollment.serial`` is 0), so no protocol role."""

    def take_serial(self) -> int:
        serial = self.next_serial
        self.next_serial += 1
        return serial

    def active_devices(self) -> list[str]:
        return sorted(d for d, m in self.devices.items() if m.status is Status.ACTIVE)

    def active_observers(self) -> list[str]:
        return sorted(o for o, m in self.observers.items() if m.status is Status.ACTIVE)

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
                coordinator=Enrollment.from_json(coordinator) if coordinator else None,
                devices={
                    name: Member(name, Status(m["status"]), Enrollment.from_json(m["current"]))
                    for name, m in raw["devices"].items()
                },
                revoked=[Revoked.from_json(r) for r in raw["revoked"]],
                observers={
                    name: Member(name, Status(m["status"]), Enrollment.from_json(m["current"]))
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


@dataclass(frozen=True)
class Keys:
    """The unlocked CA keys; only commands that sign need them."""

    fleet_ca: nacl.signing.SigningKey
    tls_ca: _tls.TlsCa


class AddOutcome(StrEnum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    REISSUED = "reissued"


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


def _unix(now: dt.datetime) -> int:
    return int(now.timestamp())


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
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


class Fleet:
    """An open fleet directory. Mutating methods take the CA keys and the time."""

    def __init__(self, layout: Layout, settings: FleetSettings, registry: Registry) -> None:
        self.layout = layout
        self.settings = settings
        self.registry = registry

    # -- creating and opening -------------------------------------------------

    @classmethod
    def init(
        cls,
        root: Path,
        settings: FleetSettings,
        *,
        now: dt.datetime,
        passphrase: bytes | None = None,
        force: bool = False,
    ) -> Fleet:
        """Create the CAs, the broker's server certificate, the coordinator and the files."""
        layout = Layout(root)
        if layout.fleet_toml.exists() or layout.ca_dir.exists():
            if not force:
                raise ProvisionError(
                    f"directory {root} already holds a fleet; use --force to replace it "
                    "(this discards its CA: every device must be provisioned again)"
                )
            for stale in (
                layout.ca_dir,
                layout.broker_dir,
                layout.coordinator_dir,
                layout.devices_dir,
            ):
                shutil.rmtree(stale, ignore_errors=True)
            layout.registry.unlink(missing_ok=True)
        make_dir(root)
        with _locked(layout):
            make_dir(layout.ca_dir, mode=PRIVATE_DIR)
            fleet_ca = nacl.signing.SigningKey.generate()
            tls_ca = _tls.new_ca(settings.name, now=now, days=settings.validity.ca_days)
            write_atomic(
                layout.fleet_ca_key, signing_key_to_pem(fleet_ca, passphrase), mode=PRIVATE
            )
            write_atomic(layout.fleet_ca_pub, public_key_to_pem(fleet_ca.verify_key))
            write_atomic(layout.tls_ca_key, _tls.key_to_pem(tls_ca.key, passphrase), mode=PRIVATE)
            write_atomic(layout.tls_ca_cert, _tls.cert_to_pem(tls_ca.cert))
            write_atomic(layout.fleet_toml, settings.to_toml())
            fleet = cls(layout, settings, Registry(fleet=settings.name))
            keys = Keys(fleet_ca=fleet_ca, tls_ca=tls_ca)
            make_dir(layout.broker_dir)
            make_dir(layout.coordinator_dir, mode=PRIVATE_DIR)
            make_dir(layout.devices_dir, mode=PRIVATE_DIR)
            fleet._write_server_cert(keys, now)
            fleet._issue_coordinator(keys, now)
            fleet._save()
            fleet._publish(keys, now)
            fleet.write_broker_config()
        return fleet

    @classmethod
    def open(cls, root: Path) -> Fleet:
        layout = Layout(root)
        settings = FleetSettings.from_toml(layout.fleet_toml)
        registry = Registry.from_json(
            read_bytes(layout.registry, "registry").decode(), layout.registry
        )
        if registry.fleet != settings.name:
            raise ProvisionError(
                f"{layout.registry} is for fleet {registry.fleet!r} but fleet.toml names "
                f"{settings.name!r}; fix [fleet] name"
            )
        return cls(layout, settings, registry)

    def ca_encrypted(self) -> bool:
        """Whether the fleet CA key is passphrase-protected (False if it cannot be read)."""
        try:
            with self.layout.fleet_ca_key.open("rb") as handle:
                return b"ENCRYPTED" in handle.readline()
        except OSError:
            return False

    def unlock(self, passphrase: bytes | None) -> Keys:
        """Load both CA keys; a missing or wrong passphrase is a one-line ProvisionError."""
        fleet_pem = read_bytes(self.layout.fleet_ca_key, "fleet CA key")
        tls_pem = read_bytes(self.layout.tls_ca_key, "TLS CA key")
        encrypted = b"ENCRYPTED" in fleet_pem.split(b"\n", 1)[0]
        if encrypted and not passphrase:
            raise ProvisionError(
                "the fleet CA key is passphrase-protected: pass --passphrase-file FILE, "
                "set MASKFL_CA_PASSPHRASE, or run the command on a terminal to be asked"
            )
        try:
            fleet_ca = signing_key_from_pem(fleet_pem, passphrase if encrypted else None)
            tls_key = _tls.key_from_pem(tls_pem, passphrase if encrypted else None)
        except CryptoError as exc:
            if encrypted:
                raise ProvisionError("wrong passphrase for the fleet CA key") from exc
            raise ProvisionError(
                f"the CA keys in {self.layout.ca_dir} are unusable: {exc}"
            ) from exc
        tls_cert = _tls.cert_from_pem(read_bytes(self.layout.tls_ca_cert, "TLS CA certificate"))
        if public_key_from_pem(
            read_bytes(self.layout.fleet_ca_pub, "fleet CA public key")
        ) != bytes(fleet_ca.verify_key):
            raise ProvisionError(
                f"{self.layout.fleet_ca_pub} does not match {self.layout.fleet_ca_key}"
            )
        return Keys(fleet_ca=fleet_ca, tls_ca=_tls.TlsCa(key=tls_key, cert=tls_cert))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with _locked(self.layout):
            yield

    # -- devices ----------------------------------------------------------------

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
                member = self.registry.devices.get(device)
                if member is None or member.status is not Status.REVOKED:
                    ids.append(device)
        for device in ids:
            check_id(device, "device id")
            if device == COORDINATOR_USER:
                raise ProvisionError(f"{device!r} is reserved for the coordinator; pick another id")
            if device in self.registry.observers:
                raise ProvisionError(f"{device!r} is an observer's name; pick another id")
        return ids

    def revoked_numbered(self, base: str, ids: list[str]) -> list[str]:
        """The revoked ``BASE-NNN`` ids that :meth:`device_ids` stepped over for ``ids``."""
        if not ids:
            return []
        last = ids[-1]
        return [
            device
            for device, member in sorted(self.registry.devices.items())
            if member.status is Status.REVOKED
            and device.startswith(f"{base}-")
            and device[len(base) + 1 :].isdigit()
            and (len(device), device) < (len(last), last)
        ]

    def add_device(
        self,
        device: str,
        keys: Keys,
        *,
        now: dt.datetime,
        public_key_pem: bytes | None = None,
        tls_csr_pem: bytes | None = None,
        force: bool = False,
    ) -> AddOutcome:
        """Enroll ``device`` and write its bundle; re-running for an active device is a no-op.

        ``force`` re-issues an active device (like rotate) and re-enrolls a revoked one.
        """
        self.device_ids(device, None)
        member = self.registry.devices.get(device)
        if member is not None and not force:
            if member.status is Status.REVOKED:
                raise ProvisionError(
                    f"device {device!r} was revoked; use a new id, or --force to enroll it again"
                )
            return AddOutcome.UNCHANGED
        bundle = self.layout.bundle_dir(device)
        if (
            member is None
            and not force
            and (bundle.exists() or self.layout.bundle_tar(device).exists())
        ):
            raise ProvisionError(
                f"{bundle} exists but {device!r} is not in the registry; "
                "remove it or pass --force to overwrite it"
            )
        outcome = AddOutcome.CREATED if member is None else AddOutcome.REISSUED
        if member is not None and member.status is Status.ACTIVE:
            self._retire(device, member.current, now, why="reissued")
        enrollment = self._issue_device(device, keys, now, public_key_pem, tls_csr_pem)
        self.registry.devices[device] = Member(device, Status.ACTIVE, enrollment)
        self._save()
        self._publish(keys, now)
        self.write_broker_config()
        return outcome

    def revoke(self, device: str, keys: Keys, *, now: dt.datetime) -> bool:
        """Revoke ``device``: revocation list, CRL and ACL; False when it already was."""
        member = self.member(device)
        changed = member.status is Status.ACTIVE
        if changed:
            self._retire(device, member.current, now, why="revoked")
            member.status = Status.REVOKED
            self._save()
        # Derived files are rewritten even when nothing changed: repairs an interrupted run.
        self._publish(keys, now)
        self.write_broker_config()
        return changed

    def add_observer(
        self, name: str, keys: Keys, *, now: dt.datetime, force: bool = False
    ) -> AddOutcome:
        """A read-only identity: TLS client certificate, observers/NAME/, an ACL block that
        reads round, sums, model, status and revocation topics and writes nothing.

        Re-running for an active observer is a no-op; ``force`` re-issues it (the old
        certificate is revoked) or re-enables a revoked one.
        """
        check_id(name, "observer name")
        if name == COORDINATOR_USER:
            raise ProvisionError(f"{name!r} is reserved for the coordinator; pick another name")
        if name in self.registry.devices:
            raise ProvisionError(f"{name!r} is a device's id; pick another name")
        member = self.registry.observers.get(name)
        if member is not None and not force:
            if member.status is Status.REVOKED:
                raise ProvisionError(
                    f"observer {name!r} was revoked; use a new name, or --force to issue it again"
                )
            return AddOutcome.UNCHANGED
        outcome = AddOutcome.CREATED if member is None else AddOutcome.REISSUED
        if member is not None and member.status is Status.ACTIVE:
            self._retire(name, member.current, now, why="reissued")
        enrollment = self._issue_observer(name, keys, now, None)
        self.registry.observers[name] = Member(name, Status.ACTIVE, enrollment)
        self._save()
        self._publish(keys, now)
        self.write_broker_config()
        return outcome

    def rotate(
        self,
        device: str,
        keys: Keys,
        *,
        now: dt.datetime,
        public_key_pem: bytes | None = None,
        tls_csr_pem: bytes | None = None,
    ) -> None:
        """New keys and certificates for one device (or the coordinator); the old are revoked."""
        if device == COORDINATOR_USER:
            old = self.registry.coordinator
            if old is None:
                raise ProvisionError("the registry has no coordinator; re-create the fleet")
            if public_key_pem or tls_csr_pem:
                raise ProvisionError("the coordinator's keys are always generated here")
            self._retire(COORDINATOR_USER, old, now, why="rotated")
            self._issue_coordinator(keys, now)
        else:
            member = self.member(device)
            observer = device in self.registry.observers
            if member.status is Status.REVOKED:
                again = "add-observer" if observer else "add-device"
                raise ProvisionError(f"{device!r} is revoked; enroll it again with {again} --force")
            if observer and public_key_pem:
                raise ProvisionError("an observer has no signing key: drop --public-key")
            self._retire(device, member.current, now, why="rotated")
            if observer:
                member.current = self._issue_observer(device, keys, now, tls_csr_pem)
            else:
                member.current = self._issue_device(device, keys, now, public_key_pem, tls_csr_pem)
        self._save()
        self._publish(keys, now)
        self.write_broker_config()

    def member(self, device: str) -> Member:
        """A device or an observer by name (ProvisionError naming the fix if neither)."""
        if device == COORDINATOR_USER:
            raise ProvisionError(
                "the coordinator cannot be revoked, only rotated: "
                "maskfl-provision rotate coordinator"
            )
        member = self.registry.devices.get(device) or self.registry.observers.get(device)
        if member is None:
            raise ProvisionError(
                f"unknown device {device!r}; `maskfl-provision list` shows the fleet's devices"
            )
        return member

    def _retire(self, subject: str, enrollment: Enrollment, now: dt.datetime, *, why: str) -> None:
        self.registry.revoked.append(
            Revoked(subject, enrollment.serial, enrollment.tls_serial, _unix(now), why)
        )

    # -- issuing ----------------------------------------------------------------

    def _enroll(
        self, keys: Keys, subject: str, role: Role, public_key: bytes, now: dt.datetime
    ) -> Certificate:
        not_after = now + dt.timedelta(days=self.settings.validity.device_days)
        return issue_certificate(
            keys.fleet_ca,
            fleet=self.settings.name,
            serial=self.registry.take_serial(),
            subject=subject,
            role=role,
            public_key=public_key,
            not_before=_unix(now - _tls.CLOCK_SKEW),
            not_after=_unix(not_after),
        )

    def _issue_device(
        self,
        device: str,
        keys: Keys,
        now: dt.datetime,
        public_key_pem: bytes | None,
        tls_csr_pem: bytes | None,
    ) -> Enrollment:
        signing_key: nacl.signing.SigningKey | None = None
        if public_key_pem is None:
            signing_key = nacl.signing.SigningKey.generate()
            public_key = bytes(signing_key.verify_key)
        else:
            try:
                public_key = public_key_from_pem(public_key_pem)
            except CryptoError as exc:
                raise ProvisionError(f"--public-key: {exc}") from exc
        tls_key: ec.EllipticCurvePrivateKey | None = None
        if tls_csr_pem is None:
            tls_key = _tls.new_key()
            tls_public = tls_key.public_key()
        else:
            tls_public = _tls.public_key_from_csr(tls_csr_pem)
        cert = self._enroll(keys, device, Role.DEVICE, public_key, now)
        tls_cert = _tls.issue_client_cert(
            keys.tls_ca,
            common_name=device,
            public_key=tls_public,
            now=now,
            days=self.settings.validity.tls_days,
        )
        broker = self.settings.broker
        files: dict[str, tuple[bytes | str, bool]] = {
            b.AGENT_TOML: (
                b.render_agent_toml(
                    fleet=self.settings.name,
                    device=device,
                    broker_host=broker.host,
                    broker_port=broker.port,
                    own_key=signing_key is None,
                    own_tls_key=tls_key is None,
                ),
                False,
            ),
            b.DEVICE_CERT: (cert.to_bytes(), False),
            b.DEVICE_CA_PUB: (public_key_to_pem(keys.fleet_ca.verify_key), False),
            b.DEVICE_BROKER_CA: (_tls.cert_to_pem(keys.tls_ca.cert), False),
            b.DEVICE_TLS_CERT: (_tls.cert_to_pem(tls_cert), False),
        }
        if signing_key is not None:
            files[b.DEVICE_KEY] = (signing_key_to_pem(signing_key), True)
        if tls_key is not None:
            files[b.DEVICE_TLS_KEY] = (_tls.key_to_pem(tls_key), True)
        self._write_bundle(device, files)
        return Enrollment(
            serial=cert.serial,
            public_key=public_key.hex(),
            tls_serial=tls_cert.serial_number,
            issued_at=_unix(now),
            not_after=cert.not_after,
            own_key=signing_key is None,
            own_tls_key=tls_key is None,
        )

    def _issue_observer(
        self, name: str, keys: Keys, now: dt.datetime, tls_csr_pem: bytes | None
    ) -> Enrollment:
        tls_key: ec.EllipticCurvePrivateKey | None = None
        if tls_csr_pem is None:
            tls_key = _tls.new_key()
            tls_public = tls_key.public_key()
        else:
            tls_public = _tls.public_key_from_csr(tls_csr_pem)
        tls_cert = _tls.issue_client_cert(
            keys.tls_ca,
            common_name=name,
            public_key=tls_public,
            now=now,
            days=self.settings.validity.tls_days,
        )
        broker = self.settings.broker
        directory = self.layout.observer_dir(name)
        make_dir(self.layout.observers_dir, mode=PRIVATE_DIR)
        make_dir(directory, mode=PRIVATE_DIR)
        # The key first, the certificate naming it after (as for the coordinator).
        if tls_key is not None:
            b.write_file(directory, b.OBSERVER_TLS_KEY, _tls.key_to_pem(tls_key), private=True)
        b.write_file(directory, b.OBSERVER_TLS_CERT, _tls.cert_to_pem(tls_cert), private=False)
        b.write_file(
            directory, b.OBSERVER_BROKER_CA, _tls.cert_to_pem(keys.tls_ca.cert), private=False
        )
        b.write_file(
            directory, b.OBSERVER_CA_PUB, public_key_to_pem(keys.fleet_ca.verify_key), private=False
        )
        b.write_file(
            directory,
            b.OBSERVER_README,
            b.render_observer_readme(
                fleet=self.settings.name,
                name=name,
                broker_host=broker.host,
                broker_port=broker.port,
            ),
            private=False,
        )
        return Enrollment(
            serial=0,
            public_key="",
            tls_serial=tls_cert.serial_number,
            issued_at=_unix(now),
            not_after=int(tls_cert.not_valid_after_utc.timestamp()),
            own_tls_key=tls_key is None,
        )

    def _write_bundle(self, device: str, files: dict[str, tuple[bytes | str, bool]]) -> None:
        """Build the bundle in a private temporary folder, then swap it in with renames."""
        devices = self.layout.devices_dir
        make_dir(devices, mode=PRIVATE_DIR)
        staging = Path(tempfile.mkdtemp(prefix=f".{device}.", dir=devices))
        try:
            target = staging / device
            make_dir(target, mode=PRIVATE_DIR)
            for name, (data, private) in files.items():
                b.write_file(target, name, data, private=private)
            b.write_tarball(target, staging / f"{device}.tar.gz")
            final = self.layout.bundle_dir(device)
            if final.exists():
                old = staging / "old"
                final.rename(old)
            target.rename(final)
            (staging / f"{device}.tar.gz").replace(self.layout.bundle_tar(device))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _issue_coordinator(self, keys: Keys, now: dt.datetime) -> None:
        signing_key = nacl.signing.SigningKey.generate()
        cert = self._enroll(
            keys, COORDINATOR_USER, Role.COORDINATOR, bytes(signing_key.verify_key), now
        )
        tls_key = _tls.new_key()
        tls_cert = _tls.issue_client_cert(
            keys.tls_ca,
            common_name=COORDINATOR_USER,
            public_key=tls_key.public_key(),
            now=now,
            days=self.settings.validity.tls_days,
        )
        directory = self.layout.coordinator_dir
        make_dir(directory, mode=PRIVATE_DIR)
        broker = self.settings.broker
        coordinator = self.settings.coordinator
        # Keys first, the certificates that name them after: a crash in between leaves
        # a coordinator whose key and certificate disagree, which it refuses to start.
        b.write_file(directory, b.COORD_KEY, signing_key_to_pem(signing_key), private=True)
        b.write_file(directory, b.COORD_TLS_KEY, _tls.key_to_pem(tls_key), private=True)
        b.write_file(directory, b.COORD_CERT, cert.to_bytes(), private=False)
        b.write_file(directory, b.COORD_TLS_CERT, _tls.cert_to_pem(tls_cert), private=False)
        b.write_file(
            directory, b.COORD_CA_PUB, public_key_to_pem(keys.fleet_ca.verify_key), private=False
        )
        b.write_file(
            directory, b.COORD_BROKER_CA, _tls.cert_to_pem(keys.tls_ca.cert), private=False
        )
        initial_weights = graph_file = None
        if coordinator.shipped_model:
            # The coordinator has no TFLite runtime: it starts from the graph's own
            # initial weights, shipped next to the graph (zeros would never learn).
            model = shipped_model(coordinator.shipped_model)
            model.initial_weights()  # checked against manifest.json before it is copied
            initial_weights, graph_file = model.initial_weights_file, model.file
            b.write_file(directory, graph_file, model.read_bytes(), private=False)
            b.write_file(
                directory, initial_weights, model.initial_weights_path.read_bytes(), private=False
            )
        b.write_file(
            directory,
            b.COORDINATOR_TOML,
            b.render_coordinator_toml(
                fleet=self.settings.name,
                broker_host=broker.coordinator_host,
                broker_port=broker.port,
                model_id=coordinator.model_id,
                model_length=coordinator.model_length,
                state_dir=coordinator.state_dir,
                initial_weights=initial_weights,
                graph_file=graph_file,
            ),
            private=False,
        )
        self.registry.coordinator = Enrollment(
            serial=cert.serial,
            public_key=bytes(signing_key.verify_key).hex(),
            tls_serial=tls_cert.serial_number,
            issued_at=_unix(now),
            not_after=cert.not_after,
        )

    def write_server_cert(self, keys: Keys, now: dt.datetime) -> None:
        """Re-issue the broker's certificate for the host names and IPs in fleet.toml."""
        self._write_server_cert(keys, now)

    def _write_server_cert(self, keys: Keys, now: dt.datetime) -> None:
        broker = self.settings.broker
        hosts = list(dict.fromkeys([broker.host, *broker.san_hosts, broker.coordinator_host]))
        hosts = [h for h in hosts if not _is_ip(h)]
        ips = list(
            dict.fromkeys(
                [*broker.san_ips, *(h for h in (broker.host, broker.coordinator_host) if _is_ip(h))]
            )
        )
        key, cert = _tls.issue_server_cert(
            keys.tls_ca, hosts=hosts, ips=ips, now=now, days=self.settings.validity.tls_days
        )
        make_dir(self.layout.broker_dir)
        write_atomic(self.layout.broker_dir / SERVER_KEY, _tls.key_to_pem(key), mode=GROUP_READ)
        _chgrp_mosquitto(self.layout.broker_dir / SERVER_KEY)
        write_atomic(self.layout.broker_dir / SERVER_CERT, _tls.cert_to_pem(cert))
        write_atomic(self.layout.broker_dir / CA_FILE, _tls.cert_to_pem(keys.tls_ca.cert))

    # -- derived files ------------------------------------------------------------

    def _save(self) -> None:
        write_atomic(self.layout.registry, self.registry.to_json(), mode=PRIVATE)

    def revocation_list(self, keys: Keys, now: dt.datetime) -> RevocationList:
        return issue_revocation_list(
            keys.fleet_ca,
            fleet=self.settings.name,
            version=self.registry.revocations_version,
            issued_at=_unix(now),
            # Observers hold no enrollment certificate (serial 0): the CRL revokes them.
            serials=[r.serial for r in self.registry.revoked if r.serial],
        )

    def _publish(self, keys: Keys, now: dt.datetime) -> None:
        """Sign and atomically replace the revocation list and the CRL."""
        self.registry.revocations_version += 1
        self._save()
        write_atomic(self.layout.revocations, self.revocation_list(keys, now).to_bytes())
        crl = _tls.build_crl(
            keys.tls_ca,
            revoked=[
                (r.tls_serial, dt.datetime.fromtimestamp(r.revoked_at, dt.UTC))
                for r in self.registry.revoked
            ],
            now=now,
            days=max(1, (keys.tls_ca.cert.not_valid_after_utc - now).days),
        )
        write_atomic(self.layout.broker_dir / CRL_FILE, crl)

    def write_broker_config(self) -> None:
        """mosquitto.conf and the ACL, from fleet.toml and the registry (no keys needed)."""
        broker = self.settings.broker
        conf = render_mosquitto_conf(
            fleet=self.settings.name,
            port=broker.port,
            bind=broker.bind,
            files=BrokerFiles(config_dir=broker.config_dir, data_dir=broker.data_dir),
            dev_port=broker.dev_port,
            user=broker.user,
        )
        write_atomic(self.layout.broker_dir / CONF_FILE, conf, mode=PUBLIC)
        acl = render_acl(
            fleet=self.settings.name,
            devices=self.registry.active_devices(),
            observers=self.registry.active_observers(),
        )
        write_atomic(self.layout.broker_dir / ACL_FILE, acl, mode=PUBLIC)

    def save_settings(self, settings: FleetSettings) -> None:
        if settings.name != self.settings.name:
            raise ProvisionError("the fleet name cannot change; create a new fleet instead")
        self.settings = settings
        write_atomic(self.layout.fleet_toml, settings.to_toml())


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _chgrp_mosquitto(path: Path) -> None:
    """Give the broker's key to group mosquitto where that group exists (Debian package)."""
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return
    with contextlib.suppress(OSError):
        shutil.chown(path, group=gid)
