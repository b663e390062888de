"""The values the transport hands out and the :class:`Transport` protocol both
implementations (paho over a real broker, and the in-memory twin) satisfy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from ._config import MqttConfig
from ._retry import Cause


@dataclass(frozen=True, slots=True)
class Message:
    """One received PUBLISH.

    ``mid`` is the broker's packet id (0 for QoS 0). ``dup`` is set on a
    redelivery. ``retain`` is True only for a retained message sent because we
    subscribed, not for live deliveries. ``link`` numbers the connection that
    delivered the message: an ack for a message from an earlier connection is
    ignored (the broker redelivers it on the new one, and its packet id may by
    then name another message).
    """

    topic: str
    payload: bytes = field(repr=False)
    qos: int = 0
    retain: bool = False
    dup: bool = False
    mid: int = 0
    link: int = field(default=0, compare=False)


class LinkState(StrEnum):
    """Where the connection stands."""

    NEW = "new"  # connect() not called yet
    CONNECTING = "connecting"
    CONNECTED = "connected"  # CONNACK success, subscriptions restored
    DISCONNECTED = "disconnected"  # link lost; reconnecting in the background
    CLOSED = "closed"  # disconnect() called; final


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A change of :class:`LinkState`, passed to the listeners (readiness, metrics)."""

    state: LinkState
    reason: str = ""
    session_present: bool = False
    cause: Cause | None = None
    """For DISCONNECTED: the likely cause of the loss or of the latest failed reconnect
    (:func:`~maskfl.transport.diagnose`); a new event comes each time it changes."""


@dataclass(slots=True)
class TransportStats:
    """Counters since the transport was made; the services export them as metrics."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    publish_refused: int = 0
    received: int = 0
    redelivered: int = 0
    dropped_oversize: int = 0
    dropped_malformed: int = 0
    dropped_queue_full: int = 0
    backpressure_pauses: int = 0


LinkListener = Callable[[LinkEvent], None]


@runtime_checkable
class Transport(Protocol):
    """What the coordinator and the agent use; :class:`MqttTransport` and
    :class:`MemoryTransport` both implement it."""

    @property
    def state(self) -> LinkState: ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def stats(self) -> TransportStats: ...

    @property
    def max_packet_size(self) -> int: ...

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def wait_connected(self) -> None: ...

    async def publish(
        self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False
    ) -> None: ...

    async def subscribe(
        self, filters: str | Iterable[str], *, qos: int = 1, retained: bool = True
    ) -> list[int]: ...

    async def unsubscribe(self, filters: str | Iterable[str]) -> None: ...

    async def receive(self) -> Message: ...

    def messages(self) -> AsyncIterator[Message]: ...

    def ack(self, message: Message) -> None: ...

    def tap(self, prefix: str, handler: Callable[[Message], None]) -> None: ...

    def add_listener(self, listener: LinkListener) -> Callable[[], None]: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


TransportFactory = Callable[[MqttConfig], Transport]
"""Makes a service's broker link from its settings: :class:`MqttTransport` in
production, a :class:`MemoryBroker`'s clients in tests (the agent and the
coordinator take one)."""
