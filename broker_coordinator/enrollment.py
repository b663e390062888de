"""Who may take part: certificates signed by the fleet CA and not revoked.

A device is enrolled when the certificate in its message verifies against the
fleet CA public key and its serial is not on the revocation list. The list is a
file written (atomically replaced) by ``maskfl-provision revoke``; it is
re-read whenever its mtime, size or inode changes, with no restart, and the
coordinator re-publishes it retained on the revocations topic. A list that does
not verify, is for another fleet, or is older than the one in force is refused
with a log line and the current one stays.
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

    def __init__(self, *, fleet: str, ca_public_key: bytes, revocations_file: Path | None) -> None:
        self.fleet = fleet
        self.ca_public_key = ca_public_key
        self.revocations_file = revocations_file
        self.revocations: RevocationList | None = None
        self.revocations_raw: bytes | None = None
        self._stamp: tuple[int, int, int] | None = None

    def reload_if_changed(self) -> bool:
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
