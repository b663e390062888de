"""The ops HTTP server on its own: the page's files, the dashboard route, bad answers."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from pathlib import Path
from typing import Any

from maskfl.broker_coordinator.http import OpsServer
from maskfl.broker_coordinator.metrics import Metrics
from maskfl.protocol.errors import StorageError

ROOT = Path(__file__).resolve().parents[2]


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_page_files_dashboard_and_errors() -> None:
    calls: list[int] = []

    async def dashboard() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            raise StorageError("database is locked")
        return {"value": float("nan"), "nested": [float("inf"), 1.5]}

    server = OpsServer(
        Metrics(), ready=lambda: (True, "ready"), status=lambda: {}, dashboard=dashboard
    )
    await server.start("127.0.0.1", 0)
    try:
        code, headers, body = await _get(server.port, "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        # Every script and style the page names is served from here (works offline).
        for ref in re.findall(rb'(?:src|href)="(/static/[^"]+)"', body):
            code, headers, asset = await _get(server.port, ref.decode())
            assert code == 200 and asset, ref
            assert headers["X-Content-Type-Options"] == "nosniff"
        assert (await _get(server.port, "/static/uPlot.iife.min.js"))[1]["Content-Type"].startswith(
            "text/javascript"
        )
        assert b"MIT License" in (await _get(server.port, "/static/uPlot.LICENSE"))[2]
        assert (await _get(server.port, "/static/../http.py"))[0] == 404
        assert (await _get(server.port, "/static/vendor/README"))[0] == 404
        code, _, body = await _get(server.port, "/api/dashboard")
        assert code == 200
        assert json.loads(body) == {"value": None, "nested": [None, 1.5]}  # strict JSON
        code, _, body = await _get(server.port, "/api/dashboard")
        assert code == 503 and b"database is locked" in body
        assert (await _get(server.port, "/api/dashboard"))[0] == 200  # still serving
        assert (await _get(server.port, "/", "POST"))[0] == 405
        code, _, body = await _get(server.port, "/", "HEAD")
        assert code == 200 and body == b""
    finally:
        await server.stop()


async def test_no_dashboard_route_without_a_provider() -> None:
    server = OpsServer(Metrics(), ready=lambda: (False, "starting"), status=lambda: {})
    await server.start("127.0.0.1", 0)
    try:
        assert (await _get(server.port, "/api/dashboard"))[0] == 404
        assert (await _get(server.port, "/"))[0] == 200
    finally:
        await server.stop()


def test_every_page_file_is_package_data() -> None:
    """setup.py's globs cover every file under web/, so the wheel carries the page."""
    setup_py = (ROOT / "setup.py").read_text()
    match = re.search(r'"maskfl\.broker_coordinator": \[([^\]]*)\]', setup_py)
    assert match, "setup.py names no package data for maskfl.broker_coordinator"
    globs = re.findall(r'"([^"]+)"', match.group(1))
    web = ROOT / "broker_coordinator" / "web"
    files = [p.relative_to(web.parent).as_posix() for p in web.rglob("*") if p.is_file()]
    assert len(files) >= 7
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in the wheel: {missing}"
