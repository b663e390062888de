"""systemd's notify protocol, in a few lines: ``sd_notify`` and the watchdog.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. The service sends newline-separated ``KEY=value`` datagrams:
``READY=1`` once it serves, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
(we ping at half of it), ``STATUS=...`` for ``systemctl status`` and
``STOPPING=1`` on the way out. Outside systemd every call is a no-op.

No dependency on libsystemd or python-systemd: the protocol is one ``sendto``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd if ``NOTIFY_SOCKET`` is set, else does nothing.

    Send errors are logged once and never raised: a broken notify socket must not stop
    the agent (systemd then restarts it through the watchdog, which is the right outcome).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address: str | bytes | None = None
        raw = env.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):
            self._address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self._address = raw
        self._socket: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keyword names upper-cased); False if not sent."""
        if self._address is None:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload.encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(ready=1)
        return self.notify(ready=1, status=status)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def stopping(self) -> bool:
        return self.notify(stopping=1)

    async def watchdog_loop(self) -> None:
        """Ping the watchdog at half of ``WATCHDOG_USEC`` until cancelled.

        It runs on the event loop, so a blocked loop (a hung handler) stops the pings
        and systemd restarts the agent: that is the point of the watchdog.
        """
        if self.watchdog_interval_s is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
