"""A TCP proxy in front of a test broker that can cut one direction on demand.

``hold()`` drops every byte a client sends to the broker from then on, while
the broker's bytes still reach the client: the client keeps receiving (MQTT
deliveries, PUBACKs of what went out before) and everything it answers or
publishes is lost, as if the process died with those bytes unsent.
``release()`` closes every connection and forwards normally again. Used to
hold a coordinator's acknowledgements and receipts for as long as a test
needs the worst instant of a crash (committed, nothing sent) to last.
"""

from __future__ import annotations

import asyncio
import contextlib


class HoldingProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.held = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hold(self) -> None:
        self.held = True

    async def release(self) -> None:
        """Close every connection (dropping what was held); forward normally again."""
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.held = False

    async def stop(self) -> None:
        await self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and self.held:
                    self.dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
