"""Issuing credentials: one issuer for the coordinator, devices and observers, and the files
they go into (the coordinator bundle, device bundles, observer folders, the broker's server
certificate).

Every identity gets a TLS client certificate for a key made here or for the one in the
holder's certificate request; the coordinator and devices also get an Ed25519 signing key
(or bring their own public key) and an enrollment certificate with the next serial.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from maskfl.broker_coordinator.provision import _bundle as b
from maskfl.broker_coordinator.provision import _tls
from maskfl.broker_coordinator.provision._broker import (
    CA_FILE,
    COORDINATOR_USER,
    SERVER_CERT,
    SERVER_KEY,
)
from maskfl.broker_coordinator.provision._files import (
    GROUP_READ,
    PRIVATE_DIR,
    make_dir,
    write_atomic,
)
from maskfl.broker_coordinator.provision._registry import (
    Credentials,
    Layout,
    Registry,
    unix_time,
)
from maskfl.broker_coordinator.provision._settings import FleetSettings
from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.models import shipped_model
from maskfl.protocol.errors import CryptoError
from maskfl.protocol.identity import Certificate, issue_certificate
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import public_key_from_pem, public_key_to_pem, signing_key_to_pem

_Files = dict[str, tuple[bytes | str, bool]]
"""A bundle's files: name -> (contents, private)."""


@dataclass(frozen=True)
class Keys:
    """The unlocked CA keys; only commands that sign need them."""

    fleet_ca: nacl.signing.SigningKey
    tls_ca: _tls.TlsCa


@dataclass(frozen=True)
class Issued:
    """One identity's new credentials. A key is None where the holder sent its own public
    key or certificate request; an observer has no signing key nor enrollment certificate."""

    tls_cert: x509.Certificate
    tls_key: ec.EllipticCurvePrivateKey | None
    cert: Certificate | None = None
    public_key: bytes = b""
    signing_key: nacl.signing.SigningKey | None = None

    def enrollment(self, now: dt.datetime) -> Credentials:
        """What the registry keeps of it (an observer's serial is 0: the CRL revokes it)."""
        if self.cert is None:
            return Credentials(
                serial=0,
                public_key="",
                tls_serial=self.tls_cert.serial_number,
                issued_at=unix_time(now),
                not_after=int(self.tls_cert.not_valid_after_utc.timestamp()),
                own_tls_key=self.tls_key is None,
            )
        return Credentials(
            serial=self.cert.serial,
            public_key=self.public_key.hex(),
            tls_serial=self.tls_cert.serial_number,
            issued_at=unix_time(now),
            not_after=self.cert.not_after,
            own_key=self.signing_key is None,
            own_tls_key=self.tls_key is None,
        )


@dataclass(frozen=True)
class Issuer:
    """Signs with the fleet's CA keys at ``now``; enrollment serials come from ``registry``."""

    settings: FleetSettings
    layout: Layout
    registry: Registry
    keys: Keys
    now: dt.datetime

    def issue(
        self,
        subject: str,
        role: Role | None,
        *,
        public_key_pem: bytes | None = None,
        tls_csr_pem: bytes | None = None,
    ) -> Issued:
        """TLS client certificate for ``subject``; with a ``role``, a signing key (or the
        given public key) and its enrollment certificate too."""
        signing_key: nacl.signing.SigningKey | None = None
        public_key = b""
        if role is not None and public_key_pem is None:
            signing_key = nacl.signing.SigningKey.generate()
            public_key = bytes(signing_key.verify_key)
        elif role is not None and public_key_pem is not None:
            public_key = _public_key(public_key_pem)
        tls_key: ec.EllipticCurvePrivateKey | None = None
        if tls_csr_pem is None:
            tls_key = _tls.new_key()
            tls_public = tls_key.public_key()
        else:
            tls_public = _tls.public_key_from_csr(tls_csr_pem)
        cert = None if role is None else self._enroll(subject, role, public_key)
        tls_cert = _tls.issue_client_cert(
            self.keys.tls_ca,
            common_name=subject,
            public_key=tls_public,
            now=self.now,
            days=self.settings.validity.tls_days,
        )
        return Issued(tls_cert, tls_key, cert, public_key, signing_key)

    def _enroll(self, subject: str, role: Role, public_key: bytes) -> Certificate:
        not_after = self.now + dt.timedelta(days=self.settings.validity.device_days)
        return issue_certificate(
            self.keys.fleet_ca,
            fleet=self.settings.name,
            serial=self.registry.take_serial(),
            subject=subject,
            role=role,
            public_key=public_key,
            not_before=unix_time(self.now - _tls.CLOCK_SKEW),
            not_after=unix_time(not_after),
        )

    # -- what the credentials go into --------------------------------------------

    def device(
        self, device: str, public_key_pem: bytes | None, tls_csr_pem: bytes | None
    ) -> Credentials:
        """A device's bundle: devices/ID/ and devices/ID.tar.gz."""
        issued = self.issue(
            device, Role.DEVICE, public_key_pem=public_key_pem, tls_csr_pem=tls_csr_pem
        )
        assert issued.cert is not None
        broker = self.settings.broker
        files: _Files = {
            b.AGENT_TOML: (
                b.render_agent_toml(
                    fleet=self.settings.name,
                    device=device,
                    broker_host=broker.host,
                    broker_port=broker.port,
                    own_key=issued.signing_key is None,
                    own_tls_key=issued.tls_key is None,
                ),
                False,
            ),
            b.DEVICE_CERT: (issued.cert.to_bytes(), False),
            b.DEVICE_CA_PUB: (public_key_to_pem(self.keys.fleet_ca.verify_key), False),
            b.DEVICE_BROKER_CA: (_tls.cert_to_pem(self.keys.tls_ca.cert), False),
            b.DEVICE_TLS_CERT: (_tls.cert_to_pem(issued.tls_cert), False),
        }
        if issued.signing_key is not None:
            files[b.DEVICE_KEY] = (signing_key_to_pem(issued.signing_key), True)
        if issued.tls_key is not None:
            files[b.DEVICE_TLS_KEY] = (_tls.key_to_pem(issued.tls_key), True)
        self._write_bundle(device, files)
        return issued.enrollment(self.now)

    def observer(self, name: str, tls_csr_pem: bytes | None) -> Credentials:
        """A read-only identity's folder, observers/NAME/, with a README."""
        issued = self.issue(name, None, tls_csr_pem=tls_csr_pem)
        broker = self.settings.broker
        directory = self.layout.observer_dir(name)
        make_dir(self.layout.observers_dir, mode=PRIVATE_DIR)
        make_dir(directory, mode=PRIVATE_DIR)
        # The key first, the certificate naming it after (as for the coordinator).
        # With --tls-csr the key stays with the observer: a key left from before would no
        # longer match the certificate (a device's bundle is replaced whole, likewise).
        if issued.tls_key is not None:
            b.write_file(
                directory, b.OBSERVER_TLS_KEY, _tls.key_to_pem(issued.tls_key), private=True
            )
        else:
            (directory / b.OBSERVER_TLS_KEY).unlink(missing_ok=True)
        b.write_file(
            directory, b.OBSERVER_TLS_CERT, _tls.cert_to_pem(issued.tls_cert), private=False
        )
        self._write_trust(directory, b.OBSERVER_CA_PUB, b.OBSERVER_BROKER_CA)
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
        return issued.enrollment(self.now)

    def _write_trust(self, directory: Path, ca_pub: str, broker_ca: str) -> None:
        """What the holder trusts: the fleet CA's public key and the broker's CA certificate."""
        b.write_file(
            directory, ca_pub, public_key_to_pem(self.keys.fleet_ca.verify_key), private=False
        )
        b.write_file(directory, broker_ca, _tls.cert_to_pem(self.keys.tls_ca.cert), private=False)

    def _write_bundle(self, device: str, files: _Files) -> None:
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

    def coordinator(self) -> Credentials:
        """The coordinator bundle: keys, certificates, the shipped model and coordinator.toml."""
        issued = self.issue(COORDINATOR_USER, Role.COORDINATOR)
        assert issued.cert is not None and issued.signing_key is not None
        assert issued.tls_key is not None
        directory = self.layout.coordinator_dir
        make_dir(directory, mode=PRIVATE_DIR)
        # Keys first, the certificates that name them after: a crash in between leaves
        # a coordinator whose key and certificate disagree, which it refuses to start.
        b.write_file(directory, b.COORD_KEY, signing_key_to_pem(issued.signing_key), private=True)
        b.write_file(directory, b.COORD_TLS_KEY, _tls.key_to_pem(issued.tls_key), private=True)
        b.write_file(directory, b.COORD_CERT, issued.cert.to_bytes(), private=False)
        b.write_file(directory, b.COORD_TLS_CERT, _tls.cert_to_pem(issued.tls_cert), private=False)
        self._write_trust(directory, b.COORD_CA_PUB, b.COORD_BROKER_CA)
        self._write_coordinator_config(directory)
        return issued.enrollment(self.now)

    def _write_coordinator_config(self, directory: Path) -> None:
        """coordinator.toml, and the shipped model's graph and initial weights beside it."""
        broker = self.settings.broker
        coordinator = self.settings.coordinator
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

    def server_cert(self) -> None:
        """The broker's certificate for the host names and IPs in fleet.toml."""
        broker = self.settings.broker
        hosts = list(dict.fromkeys([broker.host, *broker.san_hosts, broker.coordinator_host]))
        hosts = [h for h in hosts if not _is_ip(h)]
        ips = list(
            dict.fromkeys(
                [*broker.san_ips, *(h for h in (broker.host, broker.coordinator_host) if _is_ip(h))]
            )
        )
        key, cert = _tls.issue_server_cert(
            self.keys.tls_ca,
            hosts=hosts,
            ips=ips,
            now=self.now,
            days=self.settings.validity.tls_days,
        )
        broker_dir = self.layout.broker_dir
        make_dir(broker_dir)
        write_atomic(broker_dir / SERVER_KEY, _tls.key_to_pem(key), mode=GROUP_READ)
        _chgrp_mosquitto(broker_dir / SERVER_KEY)
        write_atomic(broker_dir / SERVER_CERT, _tls.cert_to_pem(cert))
        write_atomic(broker_dir / CA_FILE, _tls.cert_to_pem(self.keys.tls_ca.cert))


def _public_key(pem: bytes) -> bytes:
    try:
        return public_key_from_pem(pem)
    except CryptoError as exc:
        raise ProvisionError(f"--public-key: {exc}") from exc


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
