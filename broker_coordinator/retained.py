"""The round's retained outputs on the broker: what each table move publishes or clears.

The round table (:mod:`maskfl.protocol.round`) says which coordinator messages a
move publishes (``Move.publishes``), which a round that ended clears
(``Move.clears``) and which must be on the broker in each phase
(:func:`~maskfl.protocol.round.retained`). This module is the one place that turns
those message kinds into topics and signed bytes, for every site that needs them:
after a committed move, on resume, after the broker lost its retained state, at
the end of a round and at a start that finds the last round over.

``GLOBAL_MODEL`` is not built here: unmask publishes the model it made once its
commit is durable (the move's output, produced by the phase).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from maskfl.broker_coordinator.context import OpenRound, Services
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.messages import MessageType, SeedDict

log = logging.getLogger("maskfl.coordinator.retained")


async def outputs(
    s: Services, state: OpenRound, kinds: Iterable[MessageType]
) -> list[tuple[str, bytes]]:
    """``(topic, signed bytes)`` of each of ``kinds`` for the open round (deterministic:
    the same bytes each time, so publishing again changes nothing)."""
    out: list[tuple[str, bytes]] = []
    rid = state.round_id
    for kind in kinds:
        match kind:
            case MessageType.ROUND_PARAMS:
                out.append((s.topics.round, state.record.params))
            case MessageType.SUM_DICT if state.record.sum_dict is not None:
                out.append((s.topics.sums(rid), state.record.sum_dict))
            case MessageType.SEED_DICT:
                # One per accepted summer, naming its mask group, from the committed rows.
                for summer in state.summers.values():
                    entries = await s.store.seeds_for(rid, summer.public_key)
                    group = state.params.group_of(summer.public_key)
                    raw = s.sign(SeedDict(summer.public_key, dict(entries), group), rid)
                    out.append((s.topics.seeds(rid, summer.device_id), raw))
            case _:
                pass
    return out


async def publish(s: Services, state: OpenRound, kinds: Iterable[MessageType]) -> None:
    """Publish ``kinds`` of the open round, retained."""
    for topic, raw in await outputs(s, state, kinds):
        await s.outbox.state(topic, raw)


async def clear(
    s: Services, round_id: int, summers: Iterable[str], kinds: Iterable[MessageType]
) -> None:
    """Remove a finished round's retained ``kinds`` (its sum and seed dictionaries; the
    seed dictionaries are one per summer device), so that devices do not act on them.
    A broker error is logged: the next start clears them again."""
    topics: list[str] = []
    for kind in kinds:
        match kind:
            case MessageType.SUM_DICT:
                topics.append(s.topics.sums(round_id))
            case MessageType.SEED_DICT:
                topics.extend(s.topics.seeds(round_id, device) for device in summers)
            case _:
                pass
    try:
        for topic in topics:
            await s.outbox.clear(topic)
    except MaskflError as exc:
        log.warning("could not clear retained round topics: %s", exc)
