"""Which devices are alive: read from ``status/<device>`` at almost no cost per heartbeat.

What a heartbeat proves, and what it takes from the broker
----------------------------------------------------------
Liveness only feeds the sortition targets (``p = target / alive``). Who may
publish on ``status/<device>`` is decided by the broker: it authenticates every
client by its TLS certificate (CRL-checked) and the ACL lets only ``<device>``
write that topic; provisioning removes a revoked device's ACL block. So a message
on ``status/<device>`` already says "``<device>`` is connected", and the
coordinator takes exactly that from the topic. It does **not** decode or verify
the payload (the agent's signed :class:`~maskfl.protocol.messages.Heartbeat`,
kept on the wire for operators and tools): checking the message and certificate
signatures cost 289 µs per heartbeat, a whole core for 100k devices at 30 s.
A non-empty payload of at most :data:`MAX_HEARTBEAT_BYTES` means alive; an empty
one (the MQTT last will, or the agent's goodbye) means gone at once. Round
messages are still verified in full; the threat model says what a forged
heartbeat can do (move the sortition probabilities, nothing else).

Cost and bounds
---------------
The service taps the status topics off the transport (:meth:`Transport.tap`):
they never enter the queue the round messages wait in, and the subscription is
QoS 0 (no PUBACK per heartbeat; an offline coordinator's session does not pile
up heartbeats in the broker). Per heartbeat: one prefix strip, one id check and
one move to the end of an ordered dict. :meth:`count` drops entries older than
the alive window from the front (they are in the order last heard), so it costs
the number of expired devices, not the fleet. At most ``max_devices`` are
tracked: a heartbeat from one more device is counted as ``fleet_full`` and
logged (once per minute), never evicting a live device.

What remains is reading them: they arrive on the socket the round messages arrive
on, and paho's parsing of one (a quarter of it the MQTT 5 properties) costs about
42 µs, 14 % of a core for 100k devices at 30 s, during rounds as at any other time
(``maskfl-bench scale --parts idle``: a 1,000-updater round takes about 14 % longer
than with no fleet, and costs no more CPU beyond the heartbeats' own). Reading them
off a second, low-priority connection would need a broker identity of its own (the
broker binds the client id to the certificate's name).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

from maskfl.protocol._codec import is_valid_id
from maskfl.transport import Message

__all__ = ["MAX_HEARTBEAT_BYTES", "Liveness"]

log = logging.getLogger("maskfl.coordinator.liveness")

MAX_HEARTBEAT_BYTES = 4096
"""A larger payload on a status topic is not a heartbeat: counted ``oversize``, ignored."""
_WARN_EVERY_S = 60.0


class Liveness:
    """Devices heard from within ``window_s``, in the order last heard."""

    def __init__(
        self,
        status_prefix: str,
        *,
        window_s: float,
        max_devices: int,
        clock: Callable[[], float],
    ) -> None:
        self.prefix = status_prefix
        self.window_s = window_s
        self.max_devices = max_devices
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self.counts: Counter[str] = Counter()
        """Heartbeats by outcome: alive, gone, malformed, oversize, fleet_full."""
        self._warned_at = -_WARN_EVERY_S

    @property
    def last_heard(self) -> Mapping[str, float]:
        """Device → when last heard, oldest first (may still hold expired entries)."""
        return self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, device: object) -> bool:
        return device in self._seen

    def on_status(self, message: Message) -> None:
        """The transport tap: one message on ``status/<device>``."""
        device = message.topic[len(self.prefix) :]
        if not is_valid_id(device):
            self.counts["malformed"] += 1
            return
        payload = message.payload
        if not payload:
            self.gone(device)
            self.counts["gone"] += 1
        elif len(payload) > MAX_HEARTBEAT_BYTES:
            self.counts["oversize"] += 1
        elif self.seen(device, self.clock()):
            self.counts["alive"] += 1

    def seen(self, device: str, now: float) -> bool:
        """``device`` showed a sign of life; False (counted, logged) when the table is full."""
        seen = self._seen
        if device in seen:
            seen[device] = now
            seen.move_to_end(device)
            return True
        if len(seen) >= self.max_devices:
            self.count(now)  # make room from expired entries first
            if len(seen) >= self.max_devices:
                self.counts["fleet_full"] += 1
                if now - self._warned_at >= _WARN_EVERY_S:
                    self._warned_at = now
                    log.warning(
                        "liveness: %d devices alive, the most fleet.max_devices allows; %s and "
                        "others not counted (raise fleet.max_devices)",
                        len(seen),
                        device,
                    )
                return False
        seen[device] = now
        return True

    def gone(self, device: str) -> None:
        self._seen.pop(device, None)

    def count(self, now: float) -> int:
        """Devices heard from within the window (drops the others)."""
        seen = self._seen
        horizon = now - self.window_s
        while seen:
            device, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[device]
        return len(seen)
