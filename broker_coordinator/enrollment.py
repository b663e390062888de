"""Who may take part: certificates signed by the fleet CA and not revoked.

A device is enrolled when the certificate in its message verifies against the
fleet CA public key and its serial is not on the revocation list. The list is a
file written (atomically replaced) by ``maskfl-provision revoke``; it is
re-read whenever its mtime, size or inode changes, with no restart, and the
coordinator re-publishes it retained on the revocations topic. A list that does
not verify, is for another fleet, or is older than the one in force is refused
with a log line and the current one stays.

Verified certificates are cached (:class:`Enrollment` ``cache_size``): a device
sends the same certificate in every message, and checking the CA's Ed25519
signature on it again costs as much as checking the message itself. The cache
key is the whole certificate (every signed field and the signature), so a hit
means these exact bytes verified under this CA before; what can change since
(the clock, the revocation list, the role the message needs, the key that
signed the message) is checked on every message, and any doubt falls back to
the full check, which gives the reason. The cache is emptied whenever a new
revocation list comes into force. The service sizes it to ``fleet.max_devices``
(a device's certificate is about 500 bytes in it), so a fleet does not cycle
through it; heartbeats no longer go through it at all (see :mod:`.liveness`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from maskfl.protocol.errors import CertificateError, MaskflError, Reason
from maskfl.protocol.identity import Certificate, RevocationList
from maskfl.protocol.messages import SignedMessage, verify_sender

log = logging.getLogger("maskfl.coordinator.enrollment")


class Enrollment:
    """Verifies senders against the fleet CA and the current revocation list."""

    def __init__(
        self,
        *,
        fleet: str,
        ca_public_key: bytes,
        revocations_file: Path | None,
        cache_size: int = 65536,
    ) -> None:
        self.fleet = fleet
        self.ca_public_key = ca_public_key
        self.revocations_file = revocations_file
        self.revocations: RevocationList | None = None
        self.revocations_raw: bytes | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.cache_size = cache_size
        self._verified: dict[Certificate, None] = {}
        self.cache_hits = 0
        self.cache_evictions = 0

    def reload_if_changed(self) -> bool:  # noqa: PLR0911 one early return per unchanged or unreadable file
        """Load the revocation list if its file changed; True when a new list is in force."""
        path = self.revocations_file
        if path is None:
            return False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot stat revocation list %s: %s", path, exc)
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            raw = path.read_bytes()
            fresh = RevocationList.from_bytes(raw)
            fresh.verify(ca_public_key=self.ca_public_key, fleet=self.fleet)
        except (OSError, MaskflError) as exc:
            log.error("revocation list %s refused, keeping the current one: %s", path, exc)
            return False
        if self.revocations is not None and fresh.version < self.revocations.version:
            log.error(
                "revocation list %s has version %d, older than %d in force: ignored",
                path,
                fresh.version,
                self.revocations.version,
            )
            return False
        self.revocations = fresh
        self.revocations_raw = raw
        self._verified.clear()
        log.info(
            "revocation list version %d in force (%d serials)",
            fresh.version,
            len(fresh.serials),
            extra={"revocations_version": fresh.version},
        )
        return True

    def verify(self, message: SignedMessage, now: float) -> Certificate:
        """The sender's certificate, or CertificateError with the receipt's reason.

        A certificate the fleet CA did not sign means the key is not enrolled
        here: ``unenrolled`` (``bad_signature`` is kept for forged messages).
        """
        cert = message.certificate
        if cert is not None and cert in self._verified and self._still_good(cert, message, now):
            self.cache_hits += 1
            return cert
        cert = self._verify_fully(message, now)
        if len(self._verified) >= self.cache_size:
            del self._verified[next(iter(self._verified))]  # the oldest entry
            self.cache_evictions += 1
        self._verified[cert] = None
        return cert

    def _still_good(self, cert: Certificate, message: SignedMessage, now: float) -> bool:
        """The checks of a verified certificate that depend on time, list and message.

        False sends the message through the full check (which names the reason).
        """
        revoked = self.revocations is not None and self.revocations.is_revoked(cert.serial)
        return (
            cert.fleet == self.fleet
            and cert.not_before <= now <= cert.not_after
            and not revoked
            and cert.role == message.header.message_type.sender_role
            and cert.public_key == message.header.sender
        )

    def _verify_fully(self, message: SignedMessage, now: float) -> Certificate:
        try:
            return verify_sender(
                message,
                ca_public_key=self.ca_public_key,
                fleet=self.fleet,
                now=now,
                revocations=self.revocations,
            )
        except CertificateError as exc:
            if exc.reason is Reason.BAD_SIGNATURE:
                raise CertificateError(
                    Reason.UNENROLLED,
                    f"certificate not issued by the fleet CA: {exc.args[0]}",
                    participant=exc.participant,
                ) from exc
            raise
