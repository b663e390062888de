"""Transport errors: subclasses of :class:`~maskfl.protocol.errors.TransportError`.

Callers that only care that "the MQTT link failed" catch ``TransportError``;
the subclasses say why, so a caller can tell a refusal by the broker (no point
retrying the same publish) from a link that is down (retry later)::

    TransportError
    ├── RefusedError           the broker answered with a failing MQTT 5 reason code
    ├── PayloadTooLargeError   refused locally: over the broker's maximum packet size
    ├── NotConnectedError      a QoS 0 publish while the link is down
    └── TransportClosedError   disconnect() was called (or the transport was never opened)
"""

from __future__ import annotations

from maskfl.protocol.errors import TransportError


class RefusedError(TransportError):
    """The broker refused a CONNECT, PUBLISH, SUBSCRIBE or UNSUBSCRIBE.

    ``packet`` is the acknowledging packet (``"CONNACK"``, ``"PUBACK"``,
    ``"SUBACK"``, ``"UNSUBACK"``), ``reason_code`` the MQTT 5 reason code
    (for example 135, *Not authorized*) and ``reason`` its name.
    """

    def __init__(self, message: str, *, packet: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.packet = packet
        self.reason_code = reason_code
        self.reason = reason


class PayloadTooLargeError(TransportError):
    """A publish was refused locally: its packet would exceed ``limit`` bytes.

    Mosquitto answers an oversize PUBLISH with a reason code paho cannot parse,
    and paho then reconnects and resends it forever, so the size is checked
    before anything is sent (dependency-facts §2).
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class NotConnectedError(TransportError):
    """A QoS 0 publish (at most once) was attempted while the link is down."""


class TransportClosedError(TransportError):
    """The transport is closed: ``disconnect()`` ran, or ``connect()`` never did."""
