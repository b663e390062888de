"""The broker's X.509 side: TLS CA, server certificate, client certificates, CRL.

This PKI is separate from the fleet CA (Ed25519 enrollment certificates): it
only decides who may open a TLS connection to the broker, and the client
certificate's common name is the MQTT username (``use_identity_as_username``)
that the ACL confines. Keys are ECDSA P-256, which every TLS stack on a
Raspberry Pi and every managed broker accepts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from maskfl.broker_coordinator.provision.errors import ProvisionError
from maskfl.protocol.errors import CryptoError

CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this much in the past, so a device whose clock lags still accepts them."""


@dataclass(frozen=True)
class TlsCa:
    """The TLS CA's key and self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def key_from_pem(data: bytes, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key; a wrong or missing passphrase is a CryptoError."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot load the TLS private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError("the TLS private key is not an EC key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ProvisionError(f"not a PEM certificate: {exc}") from exc


def new_ca(fleet: str, *, now: dt.datetime, days: int) -> TlsCa:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maskfl"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"maskfl {fleet} broker CA"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TlsCa(key=key, cert=cert)


def issue_server_cert(
    ca: TlsCa,
    *,
    hosts: Sequence[str],
    ips: Sequence[str],
    now: dt.datetime,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's key and certificate, valid for every host name and IP in the SAN."""
    if not hosts and not ips:
        raise ProvisionError("the broker certificate needs at least one --host or --ip")
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise ProvisionError(f"--ip {ip!r} is not an IP address") from exc
    key = new_key()
    common_name = hosts[0] if hosts else ips[0]
    cert = _end_entity(
        ca,
        common_name=common_name,
        public_key=key.public_key(),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        days=days,
        san=names,
    )
    return key, cert


def issue_client_cert(
    ca: TlsCa,
    *,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    """A client certificate whose CN becomes the MQTT username at the broker."""
    return _end_entity(
        ca,
        common_name=common_name,
        public_key=public_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        days=days,
        san=None,
    )


def public_key_from_csr(data: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a device-made CSR, after checking the CSR's own signature.

    Only the key is taken: the subject is always set by us to the device id.
    """
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise ProvisionError(f"--tls-csr: not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise ProvisionError("--tls-csr: the request's signature does not verify")
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise ProvisionError(f"--tls-csr: its key cannot be used: {exc}") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ProvisionError(
            "--tls-csr: the request must carry an EC P-256 key "
            "(openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256)"
        )
    return public


def build_crl(
    ca: TlsCa,
    *,
    revoked: Iterable[tuple[int, dt.datetime]],
    now: dt.datetime,
    days: int,
) -> bytes:
    """A PEM CRL of ``(serial, revoked at)`` pairs, valid for ``days``.

    OpenSSL rejects every client once a CRL's nextUpdate has passed, so the CRL
    is made valid as long as the CA itself.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial, when in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def _end_entity(
    ca: TlsCa,
    *,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    days: int,
    san: list[x509.GeneralName] | None,
) -> x509.Certificate:
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
