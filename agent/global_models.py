"""The verified global models the agent holds, and fetching the one a round trains from.

The agent subscribes to ``model/<id>/latest`` only while a round waits for that model
(see the wire format, section 6), so a device that is not training does not download
every global model. :class:`GlobalModels` keeps the newest verified model per id,
counts who waits for which, and says which subscriptions a fresh link needs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from maskfl.agent.learning import Learner
from maskfl.protocol.errors import Reason, RemoteProtocolError, TransportError
from maskfl.protocol.ids import RoundId
from maskfl.protocol.messages import GlobalModel, weights_digest
from maskfl.protocol.topics import Topics
from maskfl.transport import Transport, off_loop

__all__ = ["GlobalModels"]

log = logging.getLogger("maskfl.agent")


class GlobalModels:
    """Verified global models by id (the newest of each), and the wait for one."""

    def __init__(
        self, topics: Topics, learner: Learner, transport: Callable[[], Transport | None]
    ) -> None:
        self._topics = topics
        self._learner = learner
        self._transport = transport
        self._models: dict[str, tuple[GlobalModel, bytes]] = {}
        self._wanted: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    def get(self, model_id: str) -> GlobalModel | None:
        """The newest verified global model ``model_id`` received, if any."""
        have = self._models.get(model_id)
        return None if have is None else have[0]

    def subscriptions(self) -> tuple[list[str], list[str]]:
        """(stale, wanted) model topics for a fresh link: a persistent session may still
        hold the wildcard of earlier versions, or one a lost link kept us from dropping."""
        stale = [self._topics.model_latest_filter()]
        stale += [self._topics.model_latest(m) for m in self._models if not self._wanted[m]]
        wanted = [self._topics.model_latest(m) for m, n in self._wanted.items() if n]
        return stale, wanted

    async def offer(self, model: GlobalModel) -> bool:
        """Keep a verified model unless an older version; True if it was kept."""
        have = self._models.get(model.model_id)
        if have is not None and have[0].version > model.version:
            return False
        digest = await off_loop(model.weights.nbytes, lambda: model.digest)
        async with self._changed:
            self._models[model.model_id] = (model, digest)
            self._changed.notify_all()
        return True

    async def wait(self, model_id: str, version: int, digest: bytes) -> GlobalModel:
        """The verified global model ``model_id`` with these version and digest (waits).

        It is the one we hold already, or — when the round starts from weights the
        device already has, typically version 0 of a shipped model — the local model's
        own weights, if their digest is the one the signed round parameters name, or
        else the one retained on ``model/<id>/latest`` (coordinator-signed), fetched now.
        """
        have = self._models.get(model_id)
        if have is not None and have[0].version == version and have[1] == digest:
            return have[0]
        if model_id not in self._models:
            weights = await asyncio.to_thread(self._learner.local_weights, model_id)
            if weights is not None and await asyncio.to_thread(weights_digest, weights) == digest:
                log.info(
                    "model %s v%d: the local weights match the round's digest", model_id, version
                )
                return GlobalModel(model_id, version, RoundId(0), bytes(32), weights)
        await self._want(model_id)
        try:
            async with self._changed:
                while True:
                    have = self._models.get(model_id)
                    if have is not None and have[0].version == version and have[1] == digest:
                        return have[0]
                    if have is not None and have[0].version > version:
                        raise RemoteProtocolError(
                            Reason.WRONG_ROUND,
                            f"model {model_id} is at version {have[0].version}, "
                            f"round wants {version}",
                        )
                    await self._changed.wait()
        finally:
            await self._unwant(model_id)

    async def _want(self, model_id: str) -> None:
        """Subscribe to ``model/<id>/latest`` (the broker sends the retained copy)."""
        self._wanted[model_id] += 1
        transport = self._transport()
        if self._wanted[model_id] == 1 and transport is not None:
            log.info("fetching global model %s", model_id)
            with contextlib.suppress(TransportError):  # a fresh link subscribes again
                await transport.subscribe(self._topics.model_latest(model_id), qos=1)

    async def _unwant(self, model_id: str) -> None:
        self._wanted[model_id] -= 1
        transport = self._transport()
        if self._wanted[model_id] <= 0:
            del self._wanted[model_id]
            if transport is not None:
                with contextlib.suppress(TransportError):  # a fresh link drops it
                    await transport.unsubscribe(self._topics.model_latest(model_id))
