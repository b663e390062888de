"""A throwaway PKI for TLS tests, made with the ``cryptography`` library.

``TestPki(directory)`` writes a CA; ``server_cert()`` issues a broker
certificate for 127.0.0.1 and localhost, ``client_cert(cn)`` a client
certificate whose common name mosquitto's ``use_identity_as_username`` turns
into the MQTT username. Keys are EC P-256 (fast to make); files are PEM.
``mosquitto_tls_listener()`` writes the matching listener block for
:class:`tests.support.mosquitto.Mosquitto`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path


class TestPki:
    """A CA in ``directory`` that issues server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, *, name: str = "maskfl test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = CertFiles(self.directory / "ca.crt", self.directory / "ca.key")
        self.ca.cert.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca.key.write_bytes(_key_pem(self._ca_key))

    def server_cert(
        self, name: str = "server", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> CertFiles:
        """A TLS server certificate with ``hosts`` (IPs and DNS names) as SANs."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def client_cert(self, common_name: str) -> CertFiles:
        """A TLS client certificate; ``common_name`` becomes the MQTT username."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def mosquitto_tls_listener(
        self, server: CertFiles, *, require_certificate: bool = False
    ) -> list[str]:
        """Config lines for a TLS listener on ``{port}`` (anonymous unless client certs)."""
        lines = [
            "listener {port} 127.0.0.1",
            f"cafile {self.ca.cert}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
        ]
        if require_certificate:
            lines += [
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        else:
            lines.append("allow_anonymous true")
        return lines

    def _issue(
        self, name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        files = CertFiles(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(_key_pem(key))
        return files


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
