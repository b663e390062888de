"""Model graphs from the network: no byte reaches LiteRT before a signed digest vouches for it.

The coordinator retains a model's ``.tflite`` file on ``model/<id>/graph``. That message
is not signed (only the broker ACL guards the topic), and parsing a flatbuffer is
exactly what a forged file would attack. So the graph is trusted only when its SHA-256
equals the ``graph_digest`` of the newest coordinator-signed
:class:`~maskfl.protocol.messages.GlobalModel` of the same model id that the daemon has
verified. :class:`GraphGate` applies that rule:

- a graph that arrives while a digest is stated is passed on if it matches and refused
  otherwise (one log line, counted under ``graph_digest``);
- a graph that arrives before any digest is stated is *held*: one per model id (a newer
  copy replaces it), at most :data:`MAX_HELD_GRAPHS` model ids (the oldest is dropped,
  with a log line) and at most ``limits.max_graph_bytes`` each;
- a newly stated digest checks the held graph (pass or refuse), and forgets a verified
  graph that no longer matches (the coordinator moved to another graph).

An all-zero ``graph_digest`` is the protocol's "not stated" and counts as no statement.
:class:`~maskfl.protocol.messages.RoundParams` names the model only by the digest of
its *weights*, which says nothing about the graph, so it is not a source here.
"""

from __future__ import annotations

import collections
import logging

from maskfl.protocol.crypto import digest

__all__ = ["COUNTER_KEY", "MAX_HELD_GRAPHS", "NOT_STATED", "GraphGate"]

log = logging.getLogger("maskfl.agent")

#: Model ids whose graph may wait for a signed digest at the same time.
MAX_HELD_GRAPHS = 4
#: ``GlobalModel.graph_digest`` when the coordinator states none.
NOT_STATED = bytes(32)
#: The key under which refusals are counted in the daemon's ``ignored`` counter.
COUNTER_KEY = "graph_digest"


class GraphGate:
    """Checks received model graphs against signed digests; see the module docstring.

    ``ignored`` is the daemon's counter of dropped messages; refusals add to it.
    """

    def __init__(self, max_bytes: int, ignored: collections.Counter[str]) -> None:
        self.max_bytes = max_bytes
        self._ignored = ignored
        self._stated: dict[str, bytes] = {}
        self._verified: dict[str, bytes] = {}
        self._held: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def stated(self, model_id: str) -> bytes | None:
        """The graph digest the newest verified global model of ``model_id`` states."""
        return self._stated.get(model_id)

    def verified(self, model_id: str) -> bytes | None:
        """The received graph of ``model_id`` that matches the stated digest, if any."""
        return self._verified.get(model_id)

    def held(self, model_id: str) -> bytes | None:
        """A received graph still waiting for a signed digest."""
        return self._held.get(model_id)

    def offer(self, model_id: str, graph: bytes) -> bytes | None:
        """A graph received on ``model/<id>/graph``: the bytes if verified now, else None."""
        if len(graph) > self.max_bytes:
            self._refuse(
                model_id, graph, f"it is larger than limits.max_graph_bytes ({self.max_bytes})"
            )
            return None
        expected = self._stated.get(model_id)
        if expected is None:
            self._held[model_id] = graph
            self._held.move_to_end(model_id)
            while len(self._held) > MAX_HELD_GRAPHS:
                dropped, data = self._held.popitem(last=False)
                log.info(
                    "dropped the held model graph for %r (%d bytes): more than %d graphs wait "
                    "for a signed digest",
                    dropped,
                    len(data),
                    MAX_HELD_GRAPHS,
                )
            log.info(
                "holding the model graph for %r (%d bytes) until a signed global model states "
                "its digest",
                model_id,
                len(graph),
            )
            return None
        return self._check(model_id, graph, expected)

    def state(self, model_id: str, graph_digest: bytes, *, version: int) -> bytes | None:
        """A verified global model ``version`` states ``graph_digest``; returns a graph
        that became verified by it (a held one), else None."""
        if graph_digest == NOT_STATED:
            self._stated.pop(model_id, None)
            self._verified.pop(model_id, None)
            return None
        if self._stated.get(model_id) == graph_digest:
            return None
        self._stated[model_id] = graph_digest
        verified = self._verified.get(model_id)
        if verified is not None and digest(verified) != graph_digest:
            del self._verified[model_id]
            log.info(
                "global model %s v%d names another graph (%s); the previous one is dropped",
                model_id,
                version,
                graph_digest.hex()[:16],
            )
        held = self._held.pop(model_id, None)
        if held is None:
            return None
        return self._check(model_id, held, graph_digest)

    def _check(self, model_id: str, graph: bytes, expected: bytes) -> bytes | None:
        actual = digest(graph)
        if actual != expected:
            self._refuse(
                model_id,
                graph,
                f"its SHA-256 {actual.hex()[:16]}... is not the signed graph digest "
                f"{expected.hex()[:16]}...",
            )
            return None
        self._verified[model_id] = graph
        return graph

    def _refuse(self, model_id: str, graph: bytes, why: str) -> None:
        self._ignored[COUNTER_KEY] += 1
        log.warning("refused the model graph for %r (%d bytes): %s", model_id, len(graph), why)
