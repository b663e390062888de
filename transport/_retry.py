"""Reconnecting: one back-off, one diagnosis of why a link failed, one way to log it.

Every loop that reconnects to the broker — the transport after a lost link, the
agent and the coordinator around their first connect — uses these three pieces, so
a fleet behaves alike everywhere:

* :class:`Backoff`: exponential (``min_s`` doubling up to ``max_s``) with *equal
  jitter* (half the delay fixed, half uniformly random), so devices that lost the
  broker together do not come back together, and a refusal that repeats (an ACL not
  loaded, two processes on one identity) is retried ever more slowly, never in a
  tight loop.
* :func:`diagnose`: what a :class:`TransportError` most likely means, as a
  :class:`Cause` and one sentence of advice (reload the broker, install the new
  bundle, stop the second process). A TLS alert from the broker (``certificate
  revoked``, ``unknown ca``) is recognised in the exception chain.
* :class:`LinkReport`: logs one line when the cause changes (and one when the link
  is back), not one per attempt: 189 attempts against an unloaded ACL are one
  warning, not 189.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from enum import StrEnum

from ._errors import RefusedError

__all__ = ["Backoff", "Cause", "Diagnosis", "LinkReport", "diagnose"]


class Backoff:
    """Delays for successive retries: ``min_s``, doubling to ``max_s``, with equal jitter.

    :meth:`next_delay` returns the wait before the next attempt (between half and all
    of the current step) and doubles the step; :meth:`reset` goes back to ``min_s``
    once a link has proven healthy. ``rng`` is for tests.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s (got {min_s}, {max_s})")
        self.min_s = min_s
        self.max_s = max_s
        self._step = min_s
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        step = self._step
        self._step = min(step * 2, self.max_s)
        self.attempts += 1
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        self._step = self.min_s
        self.attempts = 0

    async def wait(self, stop: asyncio.Event | None = None) -> float:
        """Sleep :meth:`next_delay` seconds, or less if ``stop`` is set; returns the delay."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
        return delay


class Cause(StrEnum):
    """Why a connection failed or was lost, as far as the client can tell."""

    UNREACHABLE = "unreachable"
    NOT_AUTHORIZED = "not_authorized"
    BAD_LOGIN = "bad_login"
    REVOKED = "revoked"
    CERTIFICATE_REFUSED = "certificate_refused"
    OTHER_FLEET = "other_fleet"
    BROKER_UNTRUSTED = "broker_untrusted"
    TAKEN_OVER = "taken_over"
    NOT_MQTT_TLS = "not_mqtt_tls"
    LINK_LOST = "link_lost"


_ADVICE = {
    Cause.UNREACHABLE: "the broker is unreachable (not running yet, or a wrong host or port)",
    Cause.NOT_AUTHORIZED: "the broker has not loaded this client's ACL: reload mosquitto "
    "(systemctl reload mosquitto, or SIGHUP) after maskfl-provision add-device; after a "
    "revoke it is gone for good",
    Cause.BAD_LOGIN: "the broker refused the login: check username and password_file",
    Cause.REVOKED: "the broker refuses this certificate as revoked",
    Cause.OTHER_FLEET: "the broker does not accept this client's certificate: it belongs to "
    "another fleet (signed by another TLS CA); install this fleet's bundle",
    Cause.CERTIFICATE_REFUSED: "the broker does not accept this client's certificate "
    "(bad or expired): issue a new bundle",
    Cause.BROKER_UNTRUSTED: "the broker's certificate is not signed by ca_file: use the "
    "bundle's broker-ca.pem",
    Cause.TAKEN_OVER: "another process uses this client's identity (a second agent on the "
    "same bundle, or a second coordinator): stop one",
    Cause.NOT_MQTT_TLS: "nothing speaking MQTT over TLS at this address (is this the "
    "plain or the HTTP port?)",
    Cause.LINK_LOST: "the broker closed the connection",
}

TLS_HANDSHAKE_RESET = "the TLS handshake was cut off without an alert"
"""What the transport adds to a TLS connect that the peer reset or closed without a TLS
alert (a plain MQTT listener does that); :func:`diagnose` reads it as NOT_MQTT_TLS."""

#: Markers in error texts (TLS alert and verification names from OpenSSL, MQTT 5
#: reason names from paho), most specific first.
_MARKERS: tuple[tuple[str, Cause], ...] = (
    ("CERTIFICATE REVOKED", Cause.REVOKED),
    ("CERTIFICATE_REVOKED", Cause.REVOKED),
    ("UNKNOWN CA", Cause.OTHER_FLEET),
    ("UNKNOWN_CA", Cause.OTHER_FLEET),
    ("BAD CERTIFICATE", Cause.CERTIFICATE_REFUSED),
    ("BAD_CERTIFICATE", Cause.CERTIFICATE_REFUSED),
    ("CERTIFICATE EXPIRED", Cause.CERTIFICATE_REFUSED),
    ("CERTIFICATE_EXPIRED", Cause.CERTIFICATE_REFUSED),
    ("CERTIFICATE_VERIFY_FAILED", Cause.BROKER_UNTRUSTED),
    ("SESSION TAKEN OVER", Cause.TAKEN_OVER),
    # A TLS client at a port that does not speak TLS: an HTTP server answers with
    # text (wrong version number); a plain MQTT listener resets or closes the link in
    # the handshake, which the transport marks (an EOF on a link that worked is not this).
    ("WRONG_VERSION_NUMBER", Cause.NOT_MQTT_TLS),
    (TLS_HANDSHAKE_RESET.upper(), Cause.NOT_MQTT_TLS),
    ("CONNECTION REFUSED", Cause.UNREACHABLE),
    ("NAME OR SERVICE NOT KNOWN", Cause.UNREACHABLE),
    ("TEMPORARY FAILURE IN NAME RESOLUTION", Cause.UNREACHABLE),
    ("NO ROUTE TO HOST", Cause.UNREACHABLE),
    ("NETWORK IS UNREACHABLE", Cause.UNREACHABLE),
    ("TIMED OUT", Cause.UNREACHABLE),
    ("SENT NO CONNACK", Cause.UNREACHABLE),
)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A :class:`Cause`, the error text it was read from, and what to do about it."""

    cause: Cause
    detail: str

    @property
    def advice(self) -> str:
        return _ADVICE[self.cause]


def diagnose(exc: BaseException | str) -> Diagnosis:
    """The likely cause of a failed connect, refused packet or lost link.

    MQTT 5 refusals are read from their reason code (135 *Not authorized*: the ACL
    has no block for this name, which after ``add-device`` means the broker has not
    been reloaded; 134 and 140: the login); everything else from the texts of the
    exception chain (a string is a lost link's reason).
    """
    detail = str(exc)
    texts = [detail]
    seen: BaseException | None = exc if isinstance(exc, BaseException) else None
    while seen is not None:
        if isinstance(seen, RefusedError):
            if seen.reason_code == 135:
                return Diagnosis(Cause.NOT_AUTHORIZED, detail)
            if seen.reason_code in (134, 140):
                return Diagnosis(Cause.BAD_LOGIN, detail)
        if isinstance(seen, ConnectionRefusedError | TimeoutError):
            return Diagnosis(Cause.UNREACHABLE, detail)
        texts.append(str(seen))
        texts.append(str(getattr(seen, "reason", "") or ""))
        seen = seen.__cause__ or seen.__context__
    blob = " ".join(texts).upper()
    for marker, cause in _MARKERS:
        if marker in blob:
            return Diagnosis(cause, detail)
    return Diagnosis(Cause.LINK_LOST, detail)


class LinkReport:
    """One log line per change of a link's condition, not one per attempt.

    ``failed(diagnosis, retry_in)`` logs a warning when the cause differs from the
    last one reported (a repeat is logged at DEBUG with its attempt count);
    ``up()`` logs once that the link is back after failures, with how many and for
    how long. ``name`` starts every line (``mqtt broker.example:8883``).
    """

    def __init__(self, log: logging.Logger, name: str) -> None:
        self._log = log
        self.name = name
        self.cause: Cause | None = None
        self.failures = 0
        self._since: float | None = None

    def failed(self, diagnosis: Diagnosis, retry_in: float | None = None) -> bool:
        """Record a failure; True if it was logged (the cause changed)."""
        self.failures += 1
        if self._since is None:
            self._since = time.monotonic()
        retry = "" if retry_in is None else f"; retrying with back-off (next in {retry_in:.1f} s)"
        if diagnosis.cause is self.cause:
            self._log.debug(
                "%s: still failing (%d attempts): %s%s",
                self.name,
                self.failures,
                diagnosis.detail,
                retry,
            )
            return False
        self.cause = diagnosis.cause
        self._log.warning("%s: %s (%s)%s", self.name, diagnosis.advice, diagnosis.detail, retry)
        return True

    def up(self) -> None:
        """The link works again: log it if failures were reported, and start afresh.

        Not after a takeover: the other process takes the link back soon, so that state
        ends only with :meth:`settled` (a link that stayed up)."""
        if self.cause is Cause.TAKEN_OVER:
            return
        if self.failures and self._since is not None:
            self._log.info(
                "%s: connected again after %d failure%s (%.0f s)",
                self.name,
                self.failures,
                "" if self.failures == 1 else "s",
                time.monotonic() - self._since,
            )
        self.cause = None
        self.failures = 0
        self._since = None

    def settled(self) -> None:
        """A link stayed up long enough to count as healthy: forget any takeover."""
        if self.cause is Cause.TAKEN_OVER:
            self._log.info("%s: the connection is stable again", self.name)
        self.cause = None
        self.failures = 0
        self._since = None
