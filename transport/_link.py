"""What both transports share: link state, counters, listeners, iteration, ``async with``.

:class:`~maskfl.transport.MqttTransport` and :class:`~maskfl.transport.MemoryTransport`
differ in how they connect, publish and receive; everything around that is here once.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Self

from maskfl.protocol.errors import LocalProtocolError

from ._errors import TransportClosedError
from ._topics import check_filter, check_topic
from ._types import LinkEvent, LinkListener, LinkState, Message, TransportStats


class LinkBase(abc.ABC):
    """State, stats and listeners of one client; subclasses implement the link itself."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._state = LinkState.NEW
        self._stats = TransportStats()
        self._listeners: list[LinkListener] = []
        self._taps: list[tuple[str, Callable[[Message], None]]] = []

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def is_connected(self) -> bool:
        return self._state is LinkState.CONNECTED

    @property
    def stats(self) -> TransportStats:
        return self._stats

    def add_listener(self, listener: LinkListener) -> Callable[[], None]:
        """Call ``listener`` on every :class:`LinkEvent`; returns a function that removes it.

        Listeners run on the event loop and must not block; an exception in one
        is logged and ignored.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def tap(self, prefix: str, handler: Callable[[Message], None]) -> None:
        """Hand every message whose topic starts with ``prefix`` to ``handler`` at once.

        Such messages never enter the incoming queue, so a flood of them (heartbeats
        of a large fleet) neither waits behind nor delays the messages the consumer
        reads with :meth:`receive`. ``handler`` runs on the event loop while the
        socket is read and must be quick and must not block; with ``manual_ack`` a
        tapped QoS 1 message is acked before the handler runs (nothing durable
        depends on it). An exception in the handler is logged and ignored.
        """
        self._taps.append((prefix, handler))

    def _tapped(self, message: Message) -> bool:
        """True when a tap took ``message`` (the caller then neither queues nor holds it)."""
        for prefix, handler in self._taps:
            if message.topic.startswith(prefix):
                try:
                    handler(message)
                except Exception:  # a tap must not break the transport
                    self._log.exception("tap for %r failed on %s", prefix, message.topic)
                return True
        return False

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def disconnect(self) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> Message: ...

    async def messages(self) -> AsyncIterator[Message]:
        """Received messages until the transport is closed."""
        while True:
            try:
                yield await self.receive()
            except TransportClosedError:
                return

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    @staticmethod
    def _check_publish(topic: str, qos: int) -> None:
        """A bad topic or QoS is the caller's bug: :class:`LocalProtocolError`, nothing sent."""
        check_topic(topic)
        _check_qos(qos)

    @staticmethod
    def _check_subscribe(filters: str | Iterable[str], qos: int) -> list[str]:
        """The filters as a list, each checked, and the QoS (``LocalProtocolError``)."""
        wanted = _as_list(filters)
        if not wanted:
            raise LocalProtocolError("subscribe() needs at least one filter")
        for topic_filter in wanted:
            check_filter(topic_filter)
        _check_qos(qos)
        return wanted

    def _notify(self, event: LinkEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener must not break the transport
                self._log.exception("link listener %r failed", listener)


def _as_list(filters: str | Iterable[str]) -> list[str]:
    return [filters] if isinstance(filters, str) else list(filters)


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise LocalProtocolError(f"QoS {qos} is not supported (use 0 or 1)")
