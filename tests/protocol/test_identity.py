"""Enrollment certificates, revocation lists and identities."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from maskfl.protocol.errors import (
    CertificateError,
    CryptoError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
)
from maskfl.protocol.identity import (
    Certificate,
    Identity,
    IdentityCertificateError,
    IdentityCryptoError,
    IdentityPart,
    RevocationList,
    check_identity,
    issue_certificate,
    issue_revocation_list,
    verify_certificate,
)
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import public_key_to_pem, signing_key_to_pem
from tests.protocol.wire_samples import (
    CA_KEY,
    CA_PUBLIC,
    COORDINATOR,
    DEVICE,
    FLEET,
    NOT_AFTER,
    NOT_BEFORE,
    NOW,
    identity,
    revocations,
)

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
i64 = st.integers(-(2**63), 2**63 - 1)


def verify(cert: Certificate, **kwargs: object) -> None:
    args: dict[str, object] = {
        "ca_public_key": CA_PUBLIC,
        "fleet": FLEET,
        "now": NOW,
        "revocations": None,
    }
    args.update(kwargs)
    verify_certificate(cert, **args)  # type: ignore[arg-type]


def reason_of(cert: Certificate, **kwargs: object) -> Reason:
    with pytest.raises(CertificateError) as info:
        verify(cert, **kwargs)
    return info.value.reason


@settings(max_examples=50, deadline=None)
@given(
    fleet=ids,
    subject=ids,
    serial=st.integers(0, 2**64 - 1),
    role=st.sampled_from(Role),
    public_key=st.binary(min_size=32, max_size=32),
    times=st.tuples(i64, i64).map(sorted),
)
def test_certificate_round_trip(
    *, fleet: str, subject: str, serial: int, role: Role, public_key: bytes, times: list[int]
) -> None:
    cert = issue_certificate(
        CA_KEY,
        fleet=fleet,
        serial=serial,
        subject=subject,
        role=role,
        public_key=public_key,
        not_before=times[0],
        not_after=times[1],
    )
    raw = cert.to_bytes()
    assert len(raw) == 124 + len(fleet) + len(subject)
    again = Certificate.from_bytes(raw)
    assert again == cert
    assert again.to_bytes() == raw
    verify(again, fleet=fleet, now=times[0], role=role)


def test_valid_certificates_pass() -> None:
    verify(DEVICE.certificate, role=Role.DEVICE)
    verify(COORDINATOR.certificate, role=Role.COORDINATOR)
    verify(DEVICE.certificate, now=NOT_BEFORE)
    verify(DEVICE.certificate, now=NOT_AFTER)
    verify(DEVICE.certificate, revocations=revocations(99, 100))


def test_forged_certificate_is_bad_signature() -> None:
    rogue_ca = SigningKey(bytes([0x66]) * 32)
    forged = identity(bytes([0x77]) * 32, "device-0001", 2, ca_key=rogue_ca).certificate
    assert reason_of(forged) == Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        {"serial": 3},
        {"subject": "device-0009"},
        {"role": Role.COORDINATOR},
        {"public_key": bytes(32)},
        {"not_before": NOT_BEFORE - 1},
        {"not_after": NOT_AFTER + 1},
        {"signature": bytes(64)},
    ],
)
def test_tampered_certificate_is_bad_signature(change: dict[str, object]) -> None:
    tampered = dataclasses.replace(DEVICE.certificate, **change)  # type: ignore[arg-type]
    assert reason_of(tampered) == Reason.BAD_SIGNATURE


def test_every_flipped_bit_of_a_certificate_is_rejected() -> None:
    raw = DEVICE.certificate.to_bytes()
    for bit in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            cert = Certificate.from_bytes(bytes(mutated))
        except RemoteProtocolError as exc:
            assert exc.reason == Reason.MALFORMED
            continue
        with pytest.raises(CertificateError):
            verify(cert)


def test_expired_and_not_yet_valid() -> None:
    assert reason_of(DEVICE.certificate, now=NOT_AFTER + 1) == Reason.EXPIRED
    assert reason_of(DEVICE.certificate, now=NOT_BEFORE - 0.5) == Reason.EXPIRED


def test_revoked() -> None:
    crl = revocations(1, DEVICE.certificate.serial, 40)
    assert crl.is_revoked(DEVICE.certificate.serial)
    assert not crl.is_revoked(41)
    assert reason_of(DEVICE.certificate, revocations=crl) == Reason.REVOKED


def test_wrong_fleet_and_role() -> None:
    assert reason_of(DEVICE.certificate, fleet="other") == Reason.WRONG_FLEET
    other = identity(bytes([0x42]) * 32, "device-0001", 2, fleet="other").certificate
    assert reason_of(other) == Reason.WRONG_FLEET
    assert reason_of(DEVICE.certificate, role=Role.COORDINATOR) == Reason.WRONG_ROLE
    assert reason_of(COORDINATOR.certificate, role=Role.DEVICE) == Reason.WRONG_ROLE


def test_revocation_list_of_another_fleet_is_a_local_error() -> None:
    crl = issue_revocation_list(CA_KEY, fleet="other", version=1, issued_at=0, serials=[])
    with pytest.raises(LocalProtocolError):
        verify(DEVICE.certificate, revocations=crl)


@settings(max_examples=50, deadline=None)
@given(
    fleet=ids,
    version=st.integers(0, 2**64 - 1),
    issued_at=i64,
    serials=st.lists(st.integers(0, 2**64 - 1), max_size=50),
)
def test_revocation_list_round_trip(
    fleet: str, version: int, issued_at: int, serials: list[int]
) -> None:
    crl = issue_revocation_list(
        CA_KEY, fleet=fleet, version=version, issued_at=issued_at, serials=serials
    )
    assert crl.serials == tuple(sorted(set(serials)))
    again = RevocationList.from_bytes(crl.to_bytes())
    assert again == crl
    again.verify(ca_public_key=CA_PUBLIC, fleet=fleet)
    for serial in serials:
        assert again.is_revoked(serial)


def test_revocation_list_signature_and_fleet_checked() -> None:
    crl = revocations(5, 9)
    crl.verify(ca_public_key=CA_PUBLIC, fleet=FLEET)
    with pytest.raises(CertificateError) as info:
        crl.verify(ca_public_key=CA_PUBLIC, fleet="other")
    assert info.value.reason == Reason.WRONG_FLEET
    with pytest.raises(CertificateError) as info:
        crl.verify(ca_public_key=bytes(SigningKey(bytes(32)).verify_key), fleet=FLEET)
    assert info.value.reason == Reason.BAD_SIGNATURE
    # Dropping a serial (un-revoking a device) breaks the signature.
    shortened = dataclasses.replace(crl, serials=(9,))
    with pytest.raises(CertificateError) as info:
        shortened.verify(ca_public_key=CA_PUBLIC, fleet=FLEET)
    assert info.value.reason == Reason.BAD_SIGNATURE


def test_revocation_list_rejects_unsorted_serials() -> None:
    raw = bytearray(revocations(5, 9).to_bytes())
    start = 1 + 1 + len(FLEET) + 8 + 8 + 4
    raw[start : start + 16] = raw[start + 8 : start + 16] + raw[start : start + 8]
    with pytest.raises(RemoteProtocolError) as info:
        RevocationList.from_bytes(bytes(raw))
    assert info.value.reason == Reason.MALFORMED


def test_certificate_and_revocation_signatures_are_domain_separated() -> None:
    """A CA signature over one kind of record never verifies as the other kind."""
    cert = DEVICE.certificate
    assert cert.signed_bytes().startswith(b"maskfl/v1/certificate\x00")
    assert revocations().signed_bytes().startswith(b"maskfl/v1/revocations\x00")


def test_identity() -> None:
    assert DEVICE.public_key == bytes(DEVICE.signing_key.verify_key)
    assert DEVICE.device_id == "device-0001"
    assert DEVICE.fleet == FLEET
    signature = DEVICE.sign(b"hello")
    DEVICE.signing_key.verify_key.verify(b"hello", signature)
    with pytest.raises(LocalProtocolError):
        Identity(SigningKey(bytes(32)), DEVICE.certificate)


@pytest.mark.parametrize(
    "change",
    [
        {"fleet": "bad fleet"},
        {"subject": ""},
        {"subject": "x" * 65},
        {"serial": -1},
        {"serial": 2**64},
        {"public_key": bytes(31)},
        {"not_after": NOT_BEFORE - 1},
        {"not_before": -(2**63) - 1},
    ],
)
def test_issue_rejects_bad_fields(change: dict[str, object]) -> None:
    args: dict[str, object] = {
        "fleet": FLEET,
        "serial": 1,
        "subject": "device-1",
        "role": Role.DEVICE,
        "public_key": bytes(32),
        "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER,
    }
    args.update(change)
    with pytest.raises(LocalProtocolError):
        issue_certificate(CA_KEY, **args)  # type: ignore[arg-type]


def test_certificate_from_bytes_rejects_wrong_version_role_and_size() -> None:
    raw = DEVICE.certificate.to_bytes()
    for mutated in (
        b"\x02" + raw[1:],
        raw + b"\x00",
        raw[:-1],
        b"\x00" * 300,
        b"",
    ):
        with pytest.raises(RemoteProtocolError) as info:
            Certificate.from_bytes(mutated)
        assert info.value.reason == Reason.MALFORMED
    role_at = 1 + 1 + len(FLEET) + 8 + 1 + len("device-0001")
    bad_role = bytearray(raw)
    bad_role[role_at] = 9
    with pytest.raises(RemoteProtocolError):
        Certificate.from_bytes(bytes(bad_role))


def bundle(**change: object) -> dict[str, Any]:
    """The bytes of DEVICE's provisioning bundle as check_identity takes them, changed."""
    args: dict[str, Any] = {
        "key_pem": signing_key_to_pem(DEVICE.signing_key),
        "passphrase": None,
        "certificate": DEVICE.certificate.to_bytes(),
        "ca_public_key_pem": public_key_to_pem(CA_PUBLIC),
        "fleet": FLEET,
        "role": Role.DEVICE,
        "now": NOW,
        "subject": DEVICE.certificate.subject,
        "revocations": revocations(99).to_bytes(),
    }
    args.update(change)
    return args


def test_check_identity_accepts_a_consistent_bundle() -> None:
    checked = check_identity(**bundle())
    assert checked.identity.certificate == DEVICE.certificate
    assert bytes(checked.identity.signing_key) == bytes(DEVICE.signing_key)
    assert checked.ca_public_key == CA_PUBLIC
    assert checked.revocations == revocations(99)
    coordinator = check_identity(
        **bundle(
            key_pem=signing_key_to_pem(COORDINATOR.signing_key, b"secret"),
            passphrase=b"secret",
            certificate=COORDINATOR.certificate.to_bytes(),
            role=Role.COORDINATOR,
            subject=None,
            revocations=None,
        )
    )
    assert coordinator.identity.certificate == COORDINATOR.certificate
    assert coordinator.revocations is None


OTHER_CA = SigningKey(bytes([0x0C]) * 32)
OTHER_KEY = SigningKey(bytes([0x0E]) * 32)


@pytest.mark.parametrize(
    ("change", "part", "reason", "words"),
    [
        ({"key_pem": b"not a key"}, IdentityPart.KEY, None, "wrong passphrase"),
        (
            {"key_pem": signing_key_to_pem(DEVICE.signing_key, b"right"), "passphrase": b"wrong"},
            IdentityPart.KEY,
            None,
            "wrong passphrase",
        ),
        (
            {"key_pem": signing_key_to_pem(OTHER_KEY)},
            IdentityPart.KEY,
            None,
            "use the key the certificate was issued for",
        ),
        ({"ca_public_key_pem": b"junk"}, IdentityPart.CA_PUBLIC_KEY, None, "public key"),
        (
            {"certificate": b"\x01" * 10},
            IdentityPart.CERTIFICATE,
            Reason.MALFORMED,
            "not an enrollment certificate",
        ),
        (
            {"ca_public_key_pem": public_key_to_pem(OTHER_CA.verify_key), "revocations": None},
            IdentityPart.CERTIFICATE,
            Reason.BAD_SIGNATURE,
            "not signed by the fleet CA",
        ),
        ({"now": NOT_AFTER + 1}, IdentityPart.CERTIFICATE, Reason.EXPIRED, "expired"),
        ({"role": Role.COORDINATOR}, IdentityPart.CERTIFICATE, Reason.WRONG_ROLE, "required"),
        (
            {"fleet": "other", "revocations": None},
            IdentityPart.CERTIFICATE,
            Reason.WRONG_FLEET,
            "for fleet 'demo'",
        ),
        (
            {"revocations": revocations(DEVICE.certificate.serial).to_bytes()},
            IdentityPart.CERTIFICATE,
            Reason.REVOKED,
            "revoked",
        ),
        (
            {"revocations": b"\x01garbage"},
            IdentityPart.REVOCATIONS,
            Reason.MALFORMED,
            "not a revocation list",
        ),
        (
            {"fleet": "other"},
            IdentityPart.REVOCATIONS,
            Reason.WRONG_FLEET,
            "not a revocation list",
        ),
        (
            {"subject": "device-0009"},
            IdentityPart.SUBJECT,
            Reason.UNENROLLED,
            "certificate is for 'device-0001'",
        ),
    ],
)
def test_check_identity_names_the_part_at_fault(
    change: dict[str, object], part: IdentityPart, reason: Reason | None, words: str
) -> None:
    with pytest.raises((IdentityCryptoError, IdentityCertificateError)) as info:
        check_identity(**bundle(**change))
    error = info.value
    assert isinstance(error, IdentityCryptoError | IdentityCertificateError)
    assert error.part == part
    assert words in str(error)
    if reason is None:
        assert isinstance(error, CryptoError)
    else:
        assert isinstance(error, CertificateError)
        assert error.reason == reason


def test_check_identity_with_a_forged_revocation_list() -> None:
    forged = issue_revocation_list(OTHER_CA, fleet=FLEET, version=2, issued_at=NOW, serials=[])
    with pytest.raises(IdentityCertificateError) as info:
        check_identity(**bundle(revocations=forged.to_bytes()))
    assert info.value.part == IdentityPart.REVOCATIONS
    assert info.value.reason == Reason.BAD_SIGNATURE
