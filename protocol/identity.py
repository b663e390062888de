"""Enrollment certificates, revocation lists and the identity a node signs with.

The fleet CA (an offline Ed25519 key) signs one :class:`Certificate` per device
and one for the coordinator, and publishes a signed :class:`RevocationList`.
Both are small fixed-layout binary records (docs/wire-format.md), signed over a
domain-separated encoding so that a certificate signature can never be replayed
as a revocation-list or message signature::

    signed bytes = b"maskfl/v1/certificate\\0" ‖ certificate bytes without the signature
    signed bytes = b"maskfl/v1/revocations\\0" ‖ revocation-list bytes without the signature

:func:`verify_certificate` is the one place that decides whether a certificate
is acceptable; it raises :class:`CertificateError` with the reason the receipt
carries (``wrong_fleet``, ``bad_signature``, ``expired``, ``revoked``,
``wrong_role``). Nothing here reads the clock: ``now`` is passed in.

:func:`check_identity` turns the bytes of a provisioning bundle (private key
PEM, certificate, CA public key PEM, optional revocation list) into a checked
:class:`Identity`; the agent and the coordinator read the files and map the
:class:`IdentityPart` of any error to the config key that names the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import nacl.exceptions
import nacl.signing
import numpy as np

from maskfl.protocol._codec import I64_MAX, I64_MIN, U64_MAX, Reader, Writer
from maskfl.protocol.errors import (
    CertificateError,
    CryptoError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
)
from maskfl.protocol.ids import DeviceId, FleetId, Role
from maskfl.protocol.keys import public_key_from_pem, signing_key_from_pem

__all__ = [
    "CERTIFICATE_DOMAIN",
    "CERTIFICATE_VERSION",
    "MAX_CERTIFICATE_SIZE",
    "MAX_REVOKED",
    "REVOCATIONS_DOMAIN",
    "REVOCATION_LIST_VERSION",
    "Certificate",
    "CheckedIdentity",
    "Identity",
    "IdentityCertificateError",
    "IdentityCryptoError",
    "IdentityPart",
    "RevocationList",
    "check_identity",
    "issue_certificate",
    "issue_revocation_list",
    "verify_certificate",
]

CERTIFICATE_VERSION: Final = 1
REVOCATION_LIST_VERSION: Final = 1
CERTIFICATE_DOMAIN: Final = b"maskfl/v1/certificate\x00"
REVOCATIONS_DOMAIN: Final = b"maskfl/v1/revocations\x00"
MAX_CERTIFICATE_SIZE: Final = 1 + 1 + 64 + 8 + 1 + 64 + 1 + 32 + 8 + 8 + 64
"""Largest encoded certificate (both ids 64 characters): 252 bytes."""
MAX_REVOKED: Final = 1_000_000
"""Serials one revocation list may hold (8 MB); a longer list is malformed."""

_ROLE_CODES: Final = {Role.DEVICE: 1, Role.COORDINATOR: 2}
_ROLES_BY_CODE: Final = {code: role for role, code in _ROLE_CODES.items()}


def _verify(public_key: bytes, signed: bytes, signature: bytes) -> bool:
    """Ed25519 verification that never raises: False for any bad key or signature."""
    try:
        nacl.signing.VerifyKey(public_key).verify(signed, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


def _check_i64(value: int, what: str) -> None:
    if not I64_MIN <= value <= I64_MAX:
        raise LocalProtocolError(f"{what} {value} does not fit in an i64")


@dataclass(frozen=True, slots=True)
class Certificate:
    """An enrollment certificate: the CA binds ``public_key`` to ``subject`` and ``role``.

    ``not_before`` and ``not_after`` are unix seconds; the certificate is valid
    for ``not_before <= now <= not_after``. Construct with
    :func:`issue_certificate` or :meth:`from_bytes`; the constructor does not
    check the signature (:func:`verify_certificate` does).
    """

    fleet: FleetId
    serial: int
    subject: str
    role: Role
    public_key: bytes
    not_before: int
    not_after: int
    signature: bytes = field(repr=False)

    @property
    def device_id(self) -> DeviceId:
        """The subject as a device id (topics end with it; the coordinator checks that)."""
        return DeviceId(self.subject)

    def signed_bytes(self) -> bytes:
        """What the CA signs: the domain tag and every field but the signature."""
        return CERTIFICATE_DOMAIN + bytes(self._tbs())

    def _tbs(self) -> bytes:
        w = Writer()
        w.u8(CERTIFICATE_VERSION)
        w.ident(self.fleet, "fleet")
        if not 0 <= self.serial <= U64_MAX:
            raise LocalProtocolError(f"serial {self.serial} does not fit in a u64")
        w.u64(self.serial)
        w.ident(self.subject, "subject")
        w.u8(_ROLE_CODES[Role(self.role)])
        w.fixed(self.public_key, 32, "public key")
        _check_i64(self.not_before, "not_before")
        _check_i64(self.not_after, "not_after")
        w.i64(self.not_before)
        w.i64(self.not_after)
        return w.getvalue()

    def to_bytes(self) -> bytes:
        if len(self.signature) != 64:
            raise LocalProtocolError("a certificate signature is 64 bytes")
        return self._tbs() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Certificate:
        """Parse an encoded certificate; any defect is ``RemoteProtocolError(MALFORMED)``."""
        view = memoryview(data).cast("B")
        if len(view) > MAX_CERTIFICATE_SIZE:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"certificate is {len(view)} bytes, at most 252"
            )
        r = Reader(view)
        cert = cls._read(r)
        r.end("certificate")
        return cert

    @classmethod
    def _read(cls, r: Reader) -> Certificate:
        version = r.u8("certificate version")
        if version != CERTIFICATE_VERSION:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"certificate version {version} is not supported"
            )
        fleet = r.ident("certificate fleet")
        serial = r.u64("certificate serial")
        subject = r.ident("certificate subject")
        role_code = r.u8("certificate role")
        role = _ROLES_BY_CODE.get(role_code)
        if role is None:
            raise RemoteProtocolError(Reason.MALFORMED, f"unknown certificate role {role_code}")
        public_key = r.fixed(32, "certificate public key")
        not_before = r.i64("certificate not_before")
        not_after = r.i64("certificate not_after")
        signature = r.fixed(64, "certificate signature")
        return cls(
            FleetId(fleet),
            serial,
            subject,
            role,
            public_key,
            not_before,
            not_after,
            signature,
        )


def issue_certificate(
    ca_key: nacl.signing.SigningKey,
    *,
    fleet: str,
    serial: int,
    subject: str,
    role: Role,
    public_key: bytes,
    not_before: int,
    not_after: int,
) -> Certificate:
    """Sign a certificate with the fleet CA key (raises LocalProtocolError on bad fields)."""
    if not_after < not_before:
        raise LocalProtocolError("not_after is before not_before")
    unsigned = Certificate(
        FleetId(fleet),
        serial,
        subject,
        Role(role),
        bytes(public_key),
        not_before,
        not_after,
        b"",
    )
    signature = ca_key.sign(unsigned.signed_bytes()).signature
    return Certificate(
        unsigned.fleet,
        serial,
        subject,
        unsigned.role,
        unsigned.public_key,
        not_before,
        not_after,
        signature,
    )


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The serials the CA has revoked, in strictly increasing order, signed by the CA.

    ``version`` increases with every list the CA issues, so a receiver keeps the
    newest; ``issued_at`` is unix seconds. Check the CA signature with
    :meth:`verify` once when a list arrives, then ask :meth:`is_revoked`.
    """

    fleet: FleetId
    version: int
    issued_at: int
    serials: tuple[int, ...]
    signature: bytes = field(repr=False)
    _set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", frozenset(self.serials))

    def is_revoked(self, serial: int) -> bool:
        return serial in self._set

    def signed_bytes(self) -> bytes:
        return REVOCATIONS_DOMAIN + bytes(self._tbs())

    def _tbs(self) -> bytes:
        w = Writer()
        w.u8(REVOCATION_LIST_VERSION)
        w.ident(self.fleet, "fleet")
        if not 0 <= self.version <= U64_MAX:
            raise LocalProtocolError(f"revocation list version {self.version} is not a u64")
        w.u64(self.version)
        _check_i64(self.issued_at, "issued_at")
        w.i64(self.issued_at)
        if len(self.serials) > MAX_REVOKED:
            raise LocalProtocolError(f"more than {MAX_REVOKED} revoked serials")
        w.u32(len(self.serials))
        previous = -1
        for serial in self.serials:
            if not previous < serial <= U64_MAX:
                raise LocalProtocolError("revoked serials must be increasing u64 values")
            w.u64(serial)
            previous = serial
        return w.getvalue()

    def to_bytes(self) -> bytes:
        if len(self.signature) != 64:
            raise LocalProtocolError("a revocation list signature is 64 bytes")
        return self._tbs() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> RevocationList:
        """Parse a list; any defect (also unsorted serials) is ``MALFORMED``."""
        r = Reader(memoryview(data).cast("B"))
        version = r.u8("revocation list format")
        if version != REVOCATION_LIST_VERSION:
            raise RemoteProtocolError(
                Reason.MALFORMED, f"revocation list format {version} is not supported"
            )
        fleet = r.ident("revocation list fleet")
        list_version = r.u64("revocation list version")
        issued_at = r.i64("revocation list issued_at")
        count = r.u32("revoked count")
        if count > MAX_REVOKED or count * 8 + 64 != r.remaining:
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"{count} serials do not match the {r.remaining} bytes that follow",
            )
        array = r.words("<u8", count, "revoked serials")
        if count > 1 and not bool(np.all(array[1:] > array[:-1])):
            raise RemoteProtocolError(Reason.MALFORMED, "revoked serials are not increasing")
        serials = tuple(int(x) for x in array.tolist())
        signature = r.fixed(64, "revocation list signature")
        r.end("revocation list")
        return cls(FleetId(fleet), list_version, issued_at, serials, signature)

    def verify(self, *, ca_public_key: bytes, fleet: str) -> None:
        """Raise CertificateError (wrong_fleet / bad_signature) unless the CA issued it."""
        if self.fleet != fleet:
            raise CertificateError(
                Reason.WRONG_FLEET, f"revocation list is for fleet {self.fleet!r}, not {fleet!r}"
            )
        if not _verify(ca_public_key, self.signed_bytes(), self.signature):
            raise CertificateError(Reason.BAD_SIGNATURE, "revocation list not signed by the CA")


def issue_revocation_list(
    ca_key: nacl.signing.SigningKey,
    *,
    fleet: str,
    version: int,
    issued_at: int,
    serials: Iterable[int],
) -> RevocationList:
    """Sign a revocation list; ``serials`` are sorted and deduplicated here."""
    ordered = tuple(sorted(set(serials)))
    unsigned = RevocationList(FleetId(fleet), version, issued_at, ordered, b"")
    signature = ca_key.sign(unsigned.signed_bytes()).signature
    return RevocationList(unsigned.fleet, version, issued_at, ordered, signature)


def verify_certificate(
    cert: Certificate,
    *,
    ca_public_key: bytes,
    fleet: str,
    now: float,
    revocations: RevocationList | None,
    role: Role | None = None,
) -> None:
    """Accept ``cert`` or raise :class:`CertificateError` with the reason.

    Checks, in this order: fleet (``wrong_fleet``), CA signature
    (``bad_signature``), validity window (``expired``, also when not yet valid),
    revocation (``revoked``) and, when ``role`` is given, the role
    (``wrong_role``). ``revocations`` must already be verified (see
    :meth:`RevocationList.verify`) and be for the same fleet.
    """
    who = cert.subject
    if cert.fleet != fleet:
        raise CertificateError(
            Reason.WRONG_FLEET,
            f"certificate of {who!r} is for fleet {cert.fleet!r}, not {fleet!r}",
            participant=who,
        )
    try:
        signed = cert.signed_bytes()
    except LocalProtocolError as exc:
        raise CertificateError(
            Reason.MALFORMED, f"certificate of {who!r}: {exc}", participant=who
        ) from exc
    if not _verify(ca_public_key, signed, cert.signature):
        raise CertificateError(
            Reason.BAD_SIGNATURE,
            f"certificate of {who!r} is not signed by the fleet CA",
            participant=who,
        )
    _check_window(cert, now)
    if revocations is not None:
        _check_not_revoked(cert, revocations, fleet)
    if role is not None and cert.role != role:
        raise CertificateError(
            Reason.WRONG_ROLE,
            f"certificate of {who!r} has role {cert.role}, {role} required",
            participant=who,
        )


def _check_window(cert: Certificate, now: float) -> None:
    """``expired`` outside ``[not_before, not_after]``."""
    who = cert.subject
    if now < cert.not_before:
        raise CertificateError(
            Reason.EXPIRED,
            f"certificate of {who!r} is not valid before {cert.not_before}",
            participant=who,
        )
    if now > cert.not_after:
        raise CertificateError(
            Reason.EXPIRED,
            f"certificate of {who!r} expired at {cert.not_after}",
            participant=who,
        )


def _check_not_revoked(cert: Certificate, revocations: RevocationList, fleet: str) -> None:
    """``revoked`` when the (verified) list of ``fleet`` names the certificate's serial."""
    if revocations.fleet != fleet:
        raise LocalProtocolError(
            f"revocation list of fleet {revocations.fleet!r} used for fleet {fleet!r}"
        )
    if revocations.is_revoked(cert.serial):
        raise CertificateError(
            Reason.REVOKED,
            f"certificate {cert.serial} of {cert.subject!r} is revoked",
            participant=cert.subject,
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's long-term Ed25519 signing key together with its enrollment certificate."""

    signing_key: nacl.signing.SigningKey = field(repr=False)
    certificate: Certificate

    def __post_init__(self) -> None:
        if bytes(self.signing_key.verify_key) != self.certificate.public_key:
            raise LocalProtocolError(
                f"the signing key does not match the certificate of {self.certificate.subject!r}"
            )

    @property
    def public_key(self) -> bytes:
        return self.certificate.public_key

    @property
    def device_id(self) -> DeviceId:
        return self.certificate.device_id

    @property
    def fleet(self) -> FleetId:
        return self.certificate.fleet

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature


class IdentityPart(StrEnum):
    """Which input of :func:`check_identity` is at fault (the caller names its file)."""

    KEY = "key"
    """The private key: not a PEM Ed25519 key, wrong passphrase, or not the certified key."""
    CA_PUBLIC_KEY = "ca_public_key"
    CERTIFICATE = "certificate"
    REVOCATIONS = "revocations"
    SUBJECT = "subject"
    """The expected subject (device id) is not the one the certificate was issued for."""


class IdentityCryptoError(CryptoError):
    """Key material of an identity bundle does not load or does not fit; ``part`` says which."""

    def __init__(self, part: IdentityPart, message: str) -> None:
        super().__init__(message)
        self.part = part


class IdentityCertificateError(CertificateError):
    """The certificate or revocation list of an identity bundle is not usable."""

    def __init__(
        self, part: IdentityPart, reason: Reason, message: str, *, participant: str | None = None
    ) -> None:
        super().__init__(reason, message, participant=participant)
        self.part = part


@dataclass(frozen=True, slots=True)
class CheckedIdentity:
    """A node's identity, the fleet CA key it trusts and the verified revocation list."""

    identity: Identity
    ca_public_key: bytes
    revocations: RevocationList | None


def check_identity(
    *,
    key_pem: bytes,
    passphrase: bytes | None,
    certificate: bytes,
    ca_public_key_pem: bytes,
    fleet: str,
    role: Role,
    now: float,
    subject: str | None = None,
    revocations: bytes | None = None,
) -> CheckedIdentity:
    """Parse a provisioning bundle's bytes and check them against each other.

    Checks, in this order: the private key loads (with ``passphrase``), the CA
    public key loads, the certificate parses, the revocation list (when given)
    parses and is the CA's for ``fleet``, the certificate passes
    :func:`verify_certificate` for ``fleet``, ``role`` and ``now`` against that
    list, it was issued for ``subject`` (when given), and it certifies the
    private key. Raises :class:`IdentityCryptoError` (key material) or
    :class:`IdentityCertificateError` (certificate, revocation list, subject);
    both carry the :class:`IdentityPart` at fault and a message that reads
    after the name of the file, e.g. ``f"device.key_file: {exc}"``.
    """
    key, ca = _load_keys(key_pem, passphrase, ca_public_key_pem)
    cert = _load_certificate(certificate)
    revocation_list = None if revocations is None else _load_revocations(revocations, ca, fleet)
    try:
        verify_certificate(
            cert, ca_public_key=ca, fleet=fleet, now=now, revocations=revocation_list, role=role
        )
    except CertificateError as exc:
        raise IdentityCertificateError(
            IdentityPart.CERTIFICATE,
            exc.reason,
            f"the {role} certificate is not usable: {exc.args[0]}",
            participant=cert.subject,
        ) from exc
    if subject is not None and cert.subject != subject:
        raise IdentityCertificateError(
            IdentityPart.SUBJECT,
            Reason.UNENROLLED,
            f"{subject!r} is configured but the certificate is for {cert.subject!r}; "
            "use the id the certificate was issued for",
            participant=cert.subject,
        )
    if bytes(key.verify_key) != cert.public_key:
        raise IdentityCryptoError(
            IdentityPart.KEY,
            f"the private key is not the one the certificate of {cert.subject!r} was issued "
            "for; use the key the certificate was issued for",
        )
    return CheckedIdentity(Identity(key, cert), ca, revocation_list)


def _load_keys(
    key_pem: bytes, passphrase: bytes | None, ca_public_key_pem: bytes
) -> tuple[nacl.signing.SigningKey, bytes]:
    """The private key and the CA's public key, or the part that does not load."""
    try:
        key = signing_key_from_pem(key_pem, passphrase)
    except CryptoError as exc:
        raise IdentityCryptoError(
            IdentityPart.KEY, f"{exc} (wrong passphrase, or not an Ed25519 PEM key?)"
        ) from exc
    try:
        ca = public_key_from_pem(ca_public_key_pem)
    except CryptoError as exc:
        raise IdentityCryptoError(IdentityPart.CA_PUBLIC_KEY, str(exc)) from exc
    return key, ca


def _load_certificate(certificate: bytes) -> Certificate:
    try:
        return Certificate.from_bytes(certificate)
    except RemoteProtocolError as exc:
        raise IdentityCertificateError(
            IdentityPart.CERTIFICATE,
            exc.reason,
            f"not an enrollment certificate: {exc.args[0]}",
        ) from exc


def _load_revocations(revocations: bytes, ca: bytes, fleet: str) -> RevocationList:
    """The revocation list, parsed and verified as the CA's for ``fleet``."""
    try:
        revocation_list = RevocationList.from_bytes(revocations)
        revocation_list.verify(ca_public_key=ca, fleet=fleet)
    except RemoteProtocolError as exc:
        raise IdentityCertificateError(
            IdentityPart.REVOCATIONS,
            exc.reason,
            f"not a revocation list of the fleet CA: {exc.args[0]}",
        ) from exc
    return revocation_list
