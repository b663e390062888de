"""Enrollment: the verified-certificate cache never accepts what the full check would refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.protocol.errors import CertificateError, Reason
from maskfl.protocol.identity import Certificate, issue_certificate, issue_revocation_list
from maskfl.protocol.ids import Role
from maskfl.protocol.messages import Heartbeat, SignedMessage, Sum, decode_message, encode_message

FLEET = "fleet-a"
NOW = 1_000_000.0


def _cert(ca: SigningKey, key: SigningKey, serial: int, role: Role = Role.DEVICE) -> Certificate:
    return issue_certificate(
        ca,
        fleet=FLEET,
        serial=serial,
        subject=f"dev-{serial}",
        role=role,
        public_key=bytes(key.verify_key),
        not_before=int(NOW) - 100,
        not_after=int(NOW) + 100,
    )


def _sum(cert: Certificate, key: SigningKey, nonce: int = 0) -> SignedMessage:
    raw = encode_message(Sum(cert, bytes([nonce]) * 32), fleet=FLEET, round_id=1, signing_key=key)
    return decode_message(raw, max_size=1 << 16)


def _reason(enrollment: Enrollment, message: SignedMessage, now: float = NOW) -> Reason | None:
    try:
        enrollment.verify(message, now)
    except CertificateError as exc:
        return exc.reason
    return None


@pytest.fixture
def ca() -> SigningKey:
    return SigningKey.generate()


def test_second_message_hits_the_cache(ca: SigningKey) -> None:
    e = Enrollment(fleet=FLEET, ca_public_key=bytes(ca.verify_key), revocations_file=None)
    key = SigningKey.generate()
    cert = _cert(ca, key, 1)
    assert e.verify(_sum(cert, key, 1), NOW) == cert
    assert e.cache_hits == 0
    assert e.verify(_sum(cert, key, 2), NOW) == cert
    assert e.cache_hits == 1


def test_cached_certificate_is_still_checked_per_message(ca: SigningKey, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.bin"
    e = Enrollment(fleet=FLEET, ca_public_key=bytes(ca.verify_key), revocations_file=revocations)
    key = SigningKey.generate()
    cert = _cert(ca, key, 7)
    assert _reason(e, _sum(cert, key)) is None
    # Time: expired and not yet valid, though cached.
    assert _reason(e, _sum(cert, key), NOW + 101) is Reason.EXPIRED
    assert _reason(e, _sum(cert, key), NOW - 101) is Reason.EXPIRED
    # The key that signed the message must be the certificate's (encode_message
    # refuses to build such a message; a hostile sender would not).
    signed = _sum(cert, key)
    thief = bytes(SigningKey.generate().verify_key)
    stolen = dataclasses.replace(signed, header=dataclasses.replace(signed.header, sender=thief))
    assert _reason(e, stolen) is Reason.UNENROLLED
    # The role the message type needs (a heartbeat is a device message too: fine).
    raw = encode_message(Heartbeat(cert, "idle", 1.0), fleet=FLEET, round_id=0, signing_key=key)
    assert _reason(e, decode_message(raw, max_size=1 << 16)) is None
    # Revocation after caching: the new list is in force at once.
    lst = issue_revocation_list(ca, fleet=FLEET, version=1, issued_at=int(NOW), serials=[7])
    revocations.write_bytes(lst.to_bytes())
    assert e.reload_if_changed()
    assert _reason(e, _sum(cert, key)) is Reason.REVOKED


def test_a_forged_twin_of_a_cached_certificate_is_refused(ca: SigningKey) -> None:
    e = Enrollment(fleet=FLEET, ca_public_key=bytes(ca.verify_key), revocations_file=None)
    key = SigningKey.generate()
    cert = _cert(ca, key, 3)
    assert _reason(e, _sum(cert, key)) is None
    # Same fields, longer validity, signature copied: a different certificate, not a hit.
    stretched = dataclasses.replace(cert, not_after=cert.not_after + 10**6)
    assert _reason(e, _sum(stretched, key), NOW + 1000) is Reason.UNENROLLED
    other_ca = SigningKey.generate()
    assert _reason(e, _sum(_cert(other_ca, key, 3), key)) is Reason.UNENROLLED
    wrong_fleet = dataclasses.replace(cert, fleet="fleet-b")
    assert _reason(e, _sum(wrong_fleet, key)) is Reason.WRONG_FLEET


def test_wrong_role_from_cache_and_bounded_size(ca: SigningKey) -> None:
    e = Enrollment(
        fleet=FLEET, ca_public_key=bytes(ca.verify_key), revocations_file=None, cache_size=2
    )
    key = SigningKey.generate()
    coordinator = _cert(ca, key, 9, Role.COORDINATOR)
    assert _reason(e, _sum(coordinator, key)) is Reason.WRONG_ROLE
    assert _reason(e, _sum(coordinator, key)) is Reason.WRONG_ROLE
    keys = [SigningKey.generate() for _ in range(4)]
    certs = [_cert(ca, k, 10 + i) for i, k in enumerate(keys)]
    for c, k in zip(certs, keys, strict=True):
        assert _reason(e, _sum(c, k)) is None
    assert len(e._verified) == 2
    assert _reason(e, _sum(certs[-1], keys[-1])) is None
    assert e.cache_hits == 1
