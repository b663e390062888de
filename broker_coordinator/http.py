"""A small HTTP/1.1 server for operations: the status page, metrics, liveness, readiness.

``GET /`` is the status page (HTML; its script, style and the vendored uPlot
charting library under ``/static/``, so it works with no internet access) and
``/api/dashboard`` the JSON it polls. ``/metrics`` (Prometheus text format),
``/healthz`` (200 while the event loop answers, from before the first broker
connect on), ``/readyz`` (200 once the database is open and the broker link is
up, 503 with the reason otherwise, for a container's readiness probe),
``/status`` (JSON: round, phase, counts, model version). Anything else is 404,
any method but GET and HEAD 405.

Everything is read-only and unauthenticated: bind it to loopback (the default)
or put it behind a reverse proxy that authenticates (docs/operations.md).

Why no web framework: six read-only GET routes over asyncio streams fit in
this file, answer before the database and the broker are up, and keep the
coordinator container free of a framework and its dependencies. One request
per connection, bounded request size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from maskfl.broker_coordinator.metrics import Metrics
from maskfl.protocol.errors import MaskflError

log = logging.getLogger("maskfl.coordinator.http")

_MAX_REQUEST = 8192
_TIMEOUT_S = 5.0
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}
_STATIC = {
    "app.js": "app.js",
    "style.css": "style.css",
    "uPlot.iife.min.js": "vendor/uPlot.iife.min.js",
    "uPlot.min.css": "vendor/uPlot.min.css",
    "uPlot.LICENSE": "vendor/uPlot.LICENSE",
}
"""``/static/<name>`` -> file under the package's ``web/`` folder (nothing else is served)."""
_HEADERS = (
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Content-Security-Policy: default-src 'self'; img-src 'self' data:\r\n"
    "Referrer-Policy: no-referrer\r\n"
)

Response = tuple[int, str, bytes]


def _web_file(relative: str) -> bytes:
    return resources.files("maskfl.broker_coordinator").joinpath("web", relative).read_bytes()


def _content_type(name: str) -> str:
    for suffix, ctype in _TYPES.items():
        if name.endswith(suffix):
            return ctype
    return "application/octet-stream"


class OpsServer:
    """Serves the operations endpoints; ``ready``, ``status`` and ``dashboard`` are read
    per request (the dashboard's database reads are cached by its provider)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]],
        dashboard: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._status = status
        self._dashboard = dashboard
        self._server: asyncio.Server | None = None
        self._files: dict[str, Response] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        # Read the page's files once: a missing one is a broken installation, said at start.
        self._files = {"/": (200, _TYPES[".html"], _web_file("index.html"))}
        for name, relative in _STATIC.items():
            self._files[f"/static/{name}"] = (200, _content_type(name), _web_file(relative))
        self._server = await asyncio.start_server(self._handle, host, port)
        log.info(
            "ops http on %s:%d (status page /, /metrics /healthz /readyz /status)",
            host,
            self.port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _respond(self, path: str) -> Response:  # noqa: PLR0911 one return per route
        match path:
            case "/metrics":
                return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
            case "/healthz":
                return 200, "text/plain", b"ok\n"
            case "/readyz":
                ok, why = self._ready()
                return (200 if ok else 503), "text/plain", (why + "\n").encode()
            case "/status":
                return 200, "application/json", _json(self._status())
            case "/api/dashboard" if self._dashboard is not None:
                return 200, "application/json", _json(await self._dashboard())
            case "/index.html":
                return self._files["/"]
            case _ if path in self._files:
                return self._files[path]
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
                try:
                    code, ctype, body = await self._respond(target.split("?", 1)[0])
                except MaskflError as exc:  # the database, mostly: say so, keep serving
                    log.warning("answering GET %s failed: %s", target[:200], exc)
                    code, ctype, body = 503, "text/plain", f"unavailable: {exc}\n".encode()
            header = (
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{_HEADERS}Connection: close\r\n\r\n"
            ).encode()
            writer.write(header + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _finite(value: Any) -> Any:
    """NaN and infinities become null: browsers' JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(_finite(data), indent=1, sort_keys=True, default=str).encode()
