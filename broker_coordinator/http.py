"""A small HTTP/1.1 server for operations: metrics, liveness, readiness, status.

``GET /metrics`` (Prometheus text format), ``/healthz`` (200 while the event
loop answers, from before the first broker connect on), ``/readyz`` (200 once the
database is open and the broker link is up, 503 with the reason otherwise, for a
container's readiness probe), ``/status`` (JSON:
round, phase, counts, model version). Anything else is 404. One request per
connection, bounded request size and time; no dependency beyond asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from maskfl.broker_coordinator.metrics import Metrics

log = logging.getLogger("maskfl.coordinator.http")

_MAX_REQUEST = 8192
_TIMEOUT_S = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class OpsServer:
    """Serves the operations endpoints; ``ready`` and ``status`` are read per request."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._status = status
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        log.info("ops http on %s:%d (/metrics /healthz /readyz /status)", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        match path:
            case "/metrics":
                return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
            case "/healthz":
                return 200, "text/plain", b"ok\n"
            case "/readyz":
                ok, why = self._ready()
                return (200 if ok else 503), "text/plain", (why + "\n").encode()
            case "/status":
                body = json.dumps(self._status(), indent=2, sort_keys=True, default=str)
                return 200, "application/json", body.encode()
            case _:
                return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3:
                return
            method, target, _ = parts
            if method not in ("GET", "HEAD"):
                code, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                code, ctype, body = self._respond(target.split("?", 1)[0])
            header = (
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
