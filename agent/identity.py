"""Loading the device's identity from the files a provisioning bundle holds.

The long-term Ed25519 key is a PKCS#8 PEM file that must not be readable by group or
others (like ssh, the agent refuses a key file with a looser mode and says how to fix
it). The enrollment certificate and a revocation list are files with the protocol's
binary encoding; the fleet CA public key is PEM. Everything is checked at start-up,
so a wrong bundle fails with one clear line instead of a rejected message later.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from maskfl.agent.config import DeviceSection
from maskfl.protocol.errors import ConfigError, CryptoError, RemoteProtocolError
from maskfl.protocol.identity import Certificate, Identity, RevocationList, verify_certificate
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import public_key_from_pem, signing_key_from_pem, signing_key_to_pem

__all__ = ["DeviceIdentity", "generate_key_file", "load_identity", "write_private_file"]


@dataclass(frozen=True)
class DeviceIdentity:
    """What the agent signs with and checks against."""

    identity: Identity
    ca_public_key: bytes
    revocations: RevocationList | None


def _read(path: Path, what: str, field: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{field}: {what} {path} does not exist", field=field) from exc
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot read {what} {path}: {exc.strerror}", field=field
        ) from exc


def check_private_mode(path: Path, field: str) -> None:
    """Refuse a private key file readable by group or others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot stat {path}: {exc.strerror}", field=field) from exc
    if mode & 0o077:
        raise ConfigError(
            f"{field}: {path} has mode {mode:04o}; private keys must be 0600 "
            f"(run: chmod 600 {path})",
            field=field,
        )


def load_identity(device: DeviceSection, *, now: float | None = None) -> DeviceIdentity:
    """Load and cross-check key, certificate, CA key and optional revocation list."""
    now = time.time() if now is None else now
    check_private_mode(device.key_file, "device.key_file")
    passphrase = None
    if device.key_passphrase_file is not None:
        check_private_mode(device.key_passphrase_file, "device.key_passphrase_file")
        passphrase = _read(
            device.key_passphrase_file, "passphrase file", "device.key_passphrase_file"
        ).strip()
    try:
        key = signing_key_from_pem(
            _read(device.key_file, "key file", "device.key_file"), passphrase
        )
    except CryptoError as exc:
        raise ConfigError(f"device.key_file: {exc}", field="device.key_file") from exc
    try:
        ca = public_key_from_pem(
            _read(device.ca_public_key_file, "CA public key", "device.ca_public_key_file")
        )
    except CryptoError as exc:
        raise ConfigError(
            f"device.ca_public_key_file: {exc}", field="device.ca_public_key_file"
        ) from exc
    raw_cert = _read(device.certificate_file, "certificate", "device.certificate_file")
    try:
        cert = Certificate.from_bytes(raw_cert)
    except RemoteProtocolError as exc:
        raise ConfigError(
            f"device.certificate_file: not an enrollment certificate: {exc}",
            field="device.certificate_file",
        ) from exc
    revocations = None
    if device.revocations_file is not None:
        raw = _read(device.revocations_file, "revocation list", "device.revocations_file")
        try:
            revocations = RevocationList.from_bytes(raw)
            revocations.verify(ca_public_key=ca, fleet=device.fleet)
        except RemoteProtocolError as exc:
            raise ConfigError(
                f"device.revocations_file: {exc}", field="device.revocations_file"
            ) from exc
    try:
        verify_certificate(
            cert,
            ca_public_key=ca,
            fleet=device.fleet,
            now=now,
            revocations=revocations,
            role=Role.DEVICE,
        )
    except RemoteProtocolError as exc:
        raise ConfigError(
            f"device.certificate_file: the enrollment certificate is not usable: {exc}",
            field="device.certificate_file",
        ) from exc
    if cert.subject != device.id:
        raise ConfigError(
            f"device.id = {device.id!r} but the certificate is for {cert.subject!r}; "
            "use the id the certificate was issued for",
            field="device.id",
        )
    if bytes(key.verify_key) != cert.public_key:
        raise ConfigError(
            "device.key_file does not match the public key in device.certificate_file; "
            "use the key the certificate was issued for",
            field="device.key_file",
        )
    return DeviceIdentity(Identity(key, cert), ca, revocations)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0600 (atomically: temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def generate_key_file(path: Path, *, overwrite: bool = False) -> nacl.signing.SigningKey:
    """Create a new Ed25519 device key at ``path`` (mode 0600); refuses to overwrite."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; refusing to overwrite a device key", field="--out")
    key = nacl.signing.SigningKey.generate()
    write_private_file(path, signing_key_to_pem(key))
    return key
