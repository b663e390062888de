"""A throwaway PKI for TLS tests, made by the provisioning tool's own X.509 code.

``TestPki(directory)`` writes a CA; ``server_cert()`` issues a broker
certificate for 127.0.0.1 and localhost, ``client_cert(cn)`` a client
certificate whose common name mosquitto's ``use_identity_as_username`` turns
into the MQTT username. The certificates come from
:mod:`maskfl.broker_coordinator.provision._tls` (EC P-256 keys, PEM files), so
the transport is tested against the certificates a provisioned fleet really uses.
``mosquitto_tls_listener()`` writes the matching listener block (with client
certificates: the common name as username and client id, as provisioning does) for
:class:`maskfl.testing.broker.Mosquitto`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from maskfl.broker_coordinator.provision import _tls

__all__ = ["CertFiles", "TestPki"]


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path


class TestPki:
    """A CA in ``directory`` that issues server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, *, name: str = "test") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca = _tls.new_ca(name, now=dt.datetime.now(dt.UTC), days=2)
        self.ca = CertFiles(self.directory / "ca.crt", self.directory / "ca.key")
        self.ca.cert.write_bytes(_tls.cert_to_pem(self._ca.cert))
        self.ca.key.write_bytes(_tls.key_to_pem(self._ca.key))

    def server_cert(
        self, name: str = "server", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> CertFiles:
        """A TLS server certificate with ``hosts`` (IPs and DNS names) as SANs."""
        ips = [host for host in hosts if _is_ip(host)]
        names = [host for host in hosts if not _is_ip(host)]
        key, cert = _tls.issue_server_cert(
            self._ca, hosts=names, ips=ips, now=dt.datetime.now(dt.UTC), days=1
        )
        return self._write(name, key, cert)

    def client_cert(self, common_name: str) -> CertFiles:
        """A TLS client certificate; ``common_name`` becomes the MQTT username."""
        key = _tls.new_key()
        cert = _tls.issue_client_cert(
            self._ca,
            common_name=common_name,
            public_key=key.public_key(),
            now=dt.datetime.now(dt.UTC),
            days=1,
        )
        return self._write(common_name, key, cert)

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
                "use_username_as_clientid true",  # as provisioning writes it
                "allow_anonymous false",
            ]
        else:
            lines.append("allow_anonymous true")
        return lines

    def _write(
        self, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> CertFiles:
        files = CertFiles(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        files.cert.write_bytes(_tls.cert_to_pem(cert))
        files.key.write_bytes(_tls.key_to_pem(key))
        return files


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
