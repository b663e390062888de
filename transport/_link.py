"""What both transports share: link state, counters, listeners, iteration, ``async with``.

:class:`~maskfl.transport.MqttTransport` and :class:`~maskfl.transport.MemoryTransport`
differ in how they connect, publish and receive; everything around that is here once.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Self

from ._errors import TransportClosedError
from ._types import LinkEvent, LinkListener, LinkState, Message, TransportStats


class LinkBase(abc.ABC):
    """State, stats and listeners of one client; subclasses implement the link itself."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._state = LinkState.NEW
        self._stats = TransportStats()
        self._listeners: list[LinkListener] = []

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

    def _notify(self, event: LinkEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener must not break the transport
                self._log.exception("link listener %r failed", listener)
