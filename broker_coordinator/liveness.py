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

Not read while a round's heavy phases run
-----------------------------------------
Heartbeats arrive on the socket the round messages arrive on, and paho's parsing
of one (a quarter of it the MQTT 5 properties) costs about 42 µs: 14 % of a core
for 100k devices at 30 s, and a 1,000-updater round took about that much longer
while the coordinator read them (``maskfl-bench scale --parts idle``). Liveness is
read only when a round starts (sortition) and for the status page, so the
coordinator does not receive them in the update and sum2 phases
(:data:`~maskfl.broker_coordinator.runner.NO_HEARTBEATS_IN`): the runner tells
:class:`StatusSubscription` on every phase change, which
unsubscribes from ``status/+`` and subscribes again (retain handling "do not send":
a device may retain on its own status topic, and each round's re-subscription must
not pull one message per such device). Heartbeats published meanwhile are never
delivered, so none is dropped or counted by us; the broker discards them as it
does any message without a subscriber. So that no device expires for it, the alive
window counts only listening time (:meth:`Liveness.pause`, :meth:`Liveness.horizon`);
round messages still mark their sender seen. Logged once per change at INFO,
``maskfl_coordinator_liveness_listening`` and ``liveness_listening`` in ``/status``.
(A second connection for the status topics would need a broker identity of its own:
the broker binds the client id to the certificate's name.)
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping

from maskfl.broker_coordinator.metrics import Metrics
from maskfl.protocol._codec import is_valid_id
from maskfl.protocol.errors import TransportError
from maskfl.transport import LinkEvent, LinkState, Message, Transport, TransportClosedError

__all__ = ["MAX_HEARTBEAT_BYTES", "Liveness", "StatusSubscription"]

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
        self.listening = True
        """False while the coordinator does not read heartbeats (:meth:`pause`)."""
        self._pauses: deque[tuple[float, float]] = deque()
        """(start, end) of the pauses the window may still reach back over; end is
        infinite while a pause lasts."""

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

    def pause(self, now: float) -> None:
        """Heartbeats are not read from ``now`` on: the alive window stops running, so
        no device expires because we did not listen."""
        if self.listening:
            self.listening = False
            self._pauses.append((now, math.inf))

    def resume(self, now: float) -> float:
        """Heartbeats are read again from ``now``; returns how long the pause lasted."""
        if self.listening:
            return 0.0
        self.listening = True
        start, _ = self._pauses.pop()
        self._pauses.append((start, now))
        return now - start

    def horizon(self, now: float) -> float:
        """When a device must have been heard last to be alive at ``now``: ``window_s``
        of listening time before ``now``, the time paused not counted."""
        remaining, cursor = self.window_s, now
        for start, end in reversed(self._pauses):
            gap = cursor - min(end, cursor)  # listening time between this pause and cursor
            if gap >= remaining:
                break
            remaining -= gap
            cursor = min(start, cursor)
        return cursor - remaining

    def count(self, now: float) -> int:
        """Devices heard from within the window (drops the others)."""
        seen = self._seen
        horizon = self.horizon(now)
        pauses = self._pauses
        while pauses and pauses[0][1] < horizon:  # over before the window reaches back
            pauses.popleft()
        while seen:
            device, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[device]
        return len(seen)


class StatusSubscription:
    """Whether the coordinator reads heartbeats, kept on the broker: subscribed to the
    status topics (QoS 0, no retained messages) while :meth:`want` says so, else not.

    The runner decides (:data:`~maskfl.broker_coordinator.runner.NO_HEARTBEATS_IN`);
    this applies it in a task of its own, so a phase change never waits for a SUBACK,
    and says so once per change (log, gauge, :class:`Liveness` paused or not). A
    reconnect to a session the broker kept unsubscribes again while paused (an
    UNSUBSCRIBE the lost link did not carry); one without a session restores only
    what the transport still holds (not the status topics while paused).
    """

    def __init__(
        self, transport: Transport, topic_filter: str, liveness: Liveness, metrics: Metrics
    ) -> None:
        self.transport = transport
        self.filter = topic_filter
        self.liveness = liveness
        self.metrics = metrics
        self._subscribed: bool | None = None
        """What the broker has, as far as we know (None: not known)."""
        self._task: asyncio.Task[None] | None = None
        self._error: TransportError | None = None
        transport.add_listener(self._on_link)
        metrics.liveness_listening.set(1)

    def want(self, listen: bool, why: str) -> None:
        """Read heartbeats (``listen``) or not, from now; ``why``: for the log line."""
        live = self.liveness
        if listen is not live.listening:
            if listen:
                paused = live.resume(live.clock())
                log.info(
                    "liveness: reading heartbeats again (%s); paused %.1f s, not counted "
                    "against the alive window",
                    why,
                    paused,
                )
            else:
                live.pause(live.clock())
                log.info(
                    "liveness: heartbeats not read (%s): unsubscribed from %s", why, self.filter
                )
            self.metrics.liveness_listening.set(1 if listen else 0)
        if listen is not self._subscribed:
            self._kick()

    async def settled(self) -> None:
        """Wait until the broker has what was wanted; raise what the broker refused."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._apply(), name="status subscription"
            )

    async def _apply(self) -> None:
        self._error = None
        try:
            while self._subscribed is not (listen := self.liveness.listening):
                if listen:
                    await self.transport.subscribe(self.filter, qos=0, retained=False)
                else:
                    await self.transport.unsubscribe(self.filter)
                self._subscribed = listen
        except TransportClosedError:
            return
        except TransportError as exc:
            self._error = exc
            log.error(
                "liveness: %s status topics %s failed: %s",
                "subscribing to" if self.liveness.listening else "unsubscribing from",
                self.filter,
                exc,
            )

    def _on_link(self, event: LinkEvent) -> None:
        if (
            event.state is LinkState.CONNECTED
            and event.session_present
            and not self.liveness.listening
        ):
            self._subscribed = None
            self._kick()
