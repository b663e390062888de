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

The registry's records and the layout are in _registry.py; issuing keys and
certificates, and writing the files they go into, in _issue.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import nacl.signing

from maskfl.broker_coordinator.provision import _tls
from maskfl.broker_coordinator.provision._broker import (
    ACL_FILE,
    CONF_FILE,
    COORDINATOR_USER,
    CRL_FILE,
    BrokerFiles,
    render_acl,
    render_mosquitto_conf,
)
from maskfl.broker_coordinator.provision._files import (
    PRIVATE,
    PRIVATE_DIR,
    PUBLIC,
    make_dir,
    read_bytes,
    write_atomic,
)
from maskfl.broker_coordinator.provision._issue import Issuer, Keys
from maskfl.broker_coordinator.provision._registry import (
    Credentials,
    Layout,
    Member,
    Registry,
    Revoked,
    Status,
    lock_fleet,
    unix_time,
)
from maskfl.broker_coordinator.provision._settings import FleetSettings, check_id
from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.protocol.errors import CryptoError
from maskfl.protocol.identity import RevocationList, issue_revocation_list
from maskfl.protocol.keys import (
    public_key_from_pem,
    public_key_to_pem,
    signing_key_from_pem,
    signing_key_to_pem,
)

__all__ = ["AddOutcome", "Fleet"]


class AddOutcome(StrEnum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    REISSUED = "reissued"


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
        with lock_fleet(layout):
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
            issuer = fleet._issuer(keys, now)
            issuer.server_cert()
            fleet.registry.coordinator = issuer.coordinator()
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
        with lock_fleet(self.layout):
            yield

    # -- devices ----------------------------------------------------------------

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
        self.registry.device_ids(device, None)
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
        enrollment = self._issuer(keys, now).device(device, public_key_pem, tls_csr_pem)
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
        enrollment = self._issuer(keys, now).observer(name, None)
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
            self.registry.coordinator = self._issuer(keys, now).coordinator()
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
                member.current = self._issuer(keys, now).observer(device, tls_csr_pem)
            else:
                member.current = self._issuer(keys, now).device(device, public_key_pem, tls_csr_pem)
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

    def _retire(self, subject: str, enrollment: Credentials, now: dt.datetime, *, why: str) -> None:
        self.registry.revoked.append(
            Revoked(subject, enrollment.serial, enrollment.tls_serial, unix_time(now), why)
        )

    # -- issuing ----------------------------------------------------------------

    def _issuer(self, keys: Keys, now: dt.datetime) -> Issuer:
        return Issuer(self.settings, self.layout, self.registry, keys, now)

    def write_server_cert(self, keys: Keys, now: dt.datetime) -> None:
        """Re-issue the broker's certificate for the host names and IPs in fleet.toml."""
        self._issuer(keys, now).server_cert()

    # -- derived files ------------------------------------------------------------

    def _save(self) -> None:
        write_atomic(self.layout.registry, self.registry.to_json(), mode=PRIVATE)

    def revocation_list(self, keys: Keys, now: dt.datetime) -> RevocationList:
        return issue_revocation_list(
            keys.fleet_ca,
            fleet=self.settings.name,
            version=self.registry.revocations_version,
            issued_at=unix_time(now),
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
