"""Loading the device's identity from the files a provisioning bundle holds.

The long-term Ed25519 key is a PKCS#8 PEM file that must not be readable by group or
others (like ssh, the agent refuses a key file with a looser mode and says how to fix
it). The enrollment certificate and a revocation list are files with the protocol's
binary encoding; the fleet CA public key is PEM. Everything is checked at start-up,
so a wrong bundle fails with one clear line instead of a rejected message later.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

import nacl.signing

from maskfl.agent.config import DeviceSection
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.identity import (
    CheckedIdentity,
    IdentityCertificateError,
    IdentityCryptoError,
    IdentityPart,
    check_identity,
)
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import signing_key_to_pem
from maskfl.transport import check_private_mode

__all__ = ["DeviceIdentity", "generate_key_file", "load_identity", "write_private_file"]


DeviceIdentity = CheckedIdentity
"""What the agent signs with and checks against (identity, CA public key, revocations)."""

_FIELDS: Final = {
    IdentityPart.KEY: "device.key_file",
    IdentityPart.CA_PUBLIC_KEY: "device.ca_public_key_file",
    IdentityPart.CERTIFICATE: "device.certificate_file",
    IdentityPart.REVOCATIONS: "device.revocations_file",
    IdentityPart.SUBJECT: "device.id",
}


def _read(path: Path, what: str, field: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{field}: {what} {path} does not exist", field=field) from exc
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot read {what} {path}: {exc.strerror}", field=field
        ) from exc


def load_identity(device: DeviceSection, *, now: float | None = None) -> DeviceIdentity:
    """Read the bundle's files and cross-check key, certificate, CA key and revocation list.

    The files are read here (the key and passphrase files only with mode 0600);
    :func:`~maskfl.protocol.identity.check_identity` does the checking, and its
    errors become a :class:`ConfigError` naming the config key of the file at fault.
    """
    now = time.time() if now is None else now
    check_private_mode(device.key_file, "device.key_file")
    passphrase = None
    if device.key_passphrase_file is not None:
        check_private_mode(device.key_passphrase_file, "device.key_passphrase_file")
        passphrase = _read(
            device.key_passphrase_file, "passphrase file", "device.key_passphrase_file"
        ).strip()
    key_pem = _read(device.key_file, "key file", "device.key_file")
    ca_pem = _read(device.ca_public_key_file, "CA public key", "device.ca_public_key_file")
    certificate = _read(device.certificate_file, "certificate", "device.certificate_file")
    revocations = None
    if device.revocations_file is not None:
        revocations = _read(device.revocations_file, "revocation list", "device.revocations_file")
    try:
        return check_identity(
            key_pem=key_pem,
            passphrase=passphrase,
            certificate=certificate,
            ca_public_key_pem=ca_pem,
            fleet=device.fleet,
            role=Role.DEVICE,
            now=now,
            subject=device.id,
            revocations=revocations,
        )
    except (IdentityCryptoError, IdentityCertificateError) as exc:
        field = _FIELDS[exc.part]
        raise ConfigError(f"{field}: {exc}", field=field) from exc


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
