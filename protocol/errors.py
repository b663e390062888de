"""The one exception tree of maskfl.

Every error maskfl raises on purpose is a :class:`MaskflError`. Foreign errors
(PyNaCl, paho, sqlite, pydantic) are translated where they happen, with
``raise ... from exc``, so callers only ever catch ours. This is the whole tree,
every subclass in every maskfl package (a class defined outside this module names
its module in brackets; tests/protocol/test_errors.py checks the drawing against
the classes, so a new one is drawn here or the test fails)::

    MaskflError
    ├── ProtocolError                  a protocol rule was broken
    │   ├── RemoteProtocolError        ... by a peer: drop, receipt, count, go on
    │   │   └── CertificateError       ... its enrollment certificate is not acceptable
    │   │       └── IdentityCertificateError [protocol.identity]  ... in a local identity bundle
    │   └── LocalProtocolError         ... by us: a bug or a misuse of the API
    ├── CryptoError                    a key, seal or signature operation failed locally
    │   └── IdentityCryptoError [protocol.identity]  key material of an identity bundle
    ├── TransportError                 the MQTT link failed (connect, publish, subscribe)
    │   ├── NotConnectedError [transport._errors]      a QoS 0 publish while the link is down
    │   ├── PayloadTooLargeError [transport._errors]   a packet above the broker's maximum
    │   ├── RefusedError [transport._errors]           a failing MQTT 5 reason code
    │   └── TransportClosedError [transport._errors]   disconnect() ran, or connect() never did
    ├── StorageError                   SQLite or the checkpoint files failed (sqlite_errors)
    ├── ConfigError                    a configuration value is wrong; names field and fix
    │   ├── DataSourceError [agent.datasources._base]     the device's data do not load or fit
    │   ├── GraphPendingError [agent.learning]            a signed graph digest not yet here
    │   ├── ModelContractError [agent.training._errors]   the model breaks its signature contract
    │   ├── RuntimeUnavailableError [agent.training._errors]  no LiteRT / tflite-runtime
    │   ├── TrainingError [agent.training._errors]        training cannot run or diverged
    │   └── ProvisionError [broker_coordinator.provision.errors]  a fleet directory or argument
    ├── AggregationError               the aggregate cannot be formed (shape, word size, backend)
    │   ├── BackendUnavailableError [aggregator_gpu._base]  no CuPy, no device, kernel failed
    │   └── MaskVoteTieError [aggregator_gpu._base]         different masks share the top vote
    ├── TaskFailedError [agent.duties]                 this device cannot complete its task
    ├── SatOutError [agent.duties]                     this device sits this round out
    ├── RoundFailedError [broker_coordinator.errors]   the coordinator's round cannot go on
    ├── ChildExitedError [tools._supervise]            a child process a tool needs exited
    └── CheckFailedError [tools._arm_root]             a check of maskfl-arm-check failed

A :class:`RemoteProtocolError` carries a machine-readable :class:`Reason`; the
coordinator puts that reason into the receipt it sends back and counts it.

sqlite's errors become :class:`StorageError` in one place, :func:`sqlite_errors`,
which every database access of the agent and the coordinator runs under.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from os import PathLike

__all__ = [
    "AggregationError",
    "CertificateError",
    "ConfigError",
    "CryptoError",
    "LocalProtocolError",
    "MaskflError",
    "ProtocolError",
    "Reason",
    "RemoteProtocolError",
    "StorageError",
    "TransportError",
    "sqlite_errors",
]


class Reason(StrEnum):
    """Why a message from the network was rejected (sent in receipts, counted in metrics)."""

    MALFORMED = "malformed"
    WRONG_FLEET = "wrong_fleet"
    WRONG_ROUND = "wrong_round"
    WRONG_PHASE = "wrong_phase"
    BAD_SIGNATURE = "bad_signature"
    UNENROLLED = "unenrolled"
    REVOKED = "revoked"
    EXPIRED = "expired"
    DUPLICATE = "duplicate"
    OVERSIZE = "oversize"
    WRONG_LENGTH = "wrong_length"
    NOT_ELIGIBLE = "not_eligible"
    PHASE_CLOSED = "phase_closed"
    WRONG_ROLE = "wrong_role"
    UNKNOWN_SUMMER = "unknown_summer"


class MaskflError(Exception):
    """Root of every error maskfl raises on purpose."""


class ProtocolError(MaskflError):
    """A rule of the PET protocol was broken.

    The optional fields locate the problem; they are also what the logs show.
    """

    def __init__(
        self,
        message: str,
        *,
        round_id: int | None = None,
        phase: str | None = None,
        participant: str | None = None,
    ) -> None:
        super().__init__(message)
        self.round_id = round_id
        self.phase = phase
        self.participant = participant


class RemoteProtocolError(ProtocolError):
    """A peer sent something that breaks the protocol. Never fatal to the receiver."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        round_id: int | None = None,
        phase: str | None = None,
        participant: str | None = None,
    ) -> None:
        super().__init__(message, round_id=round_id, phase=phase, participant=participant)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


class CertificateError(RemoteProtocolError):
    """An enrollment certificate is forged, expired, revoked, for another fleet or role."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow (a bug in the caller)."""


class CryptoError(MaskflError):
    """A local cryptographic operation failed (bad key material, seal that cannot open)."""


class TransportError(MaskflError):
    """The MQTT connection, a publish or a subscribe failed."""


class StorageError(MaskflError):
    """Reading or writing durable state failed.

    ``path`` names the file and ``operation`` what was being done, when known.
    """

    def __init__(
        self, message: str, *, path: str | None = None, operation: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.operation = operation


@contextmanager
def sqlite_errors(path: str | PathLike[str], operation: str) -> Iterator[None]:
    """Run the block; a :class:`sqlite3.Error` it raises becomes a :class:`StorageError`
    ``"<operation> (<path>): <sqlite's words>"``, chained with ``raise ... from``.

    Works around awaited code too (``with sqlite_errors(...): await db.execute(...)``).
    Whatever the block changed is as the block left it: rolling back is the caller's
    business (a transaction that failed has been rolled back by then).
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(
            f"{operation} ({path}): {exc}", path=str(path), operation=operation
        ) from exc


class ConfigError(MaskflError):
    """A configuration value is wrong. The message names the field and the fix."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AggregationError(MaskflError):
    """The aggregate cannot be formed: shape or word size mismatch, backend unavailable."""
