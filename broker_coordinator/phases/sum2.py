"""sum2: summers return the sum of the masks they could open.

Admits ``SUM2`` from the round's accepted summers, once each, with M + 4 words
and a list of update digests whose seed did not open (each must name an
accepted update; :mod:`..admission`). The window's ``count_max`` is narrowed to the number of
summers, so the phase closes as soon as every summer has answered. With mask
groups it does not close at ``time_min`` before every group has answered (it
waits until ``time_max``).
"""

from __future__ import annotations

import asyncio
import dataclasses

from maskfl.aggregator_gpu import mask_digest
from maskfl.broker_coordinator.context import Contribution
from maskfl.broker_coordinator.phases.base import MessagePhase
from maskfl.broker_coordinator.store import Sum2Record, Transaction
from maskfl.protocol.phases import Phase, PhaseWindow


class Sum2Phase(MessagePhase):
    phase = Phase.SUM2

    def limits(self) -> PhaseWindow:
        c = self.s.config.pet.sum2
        summers = len(self.state.summers)
        return PhaseWindow(
            c.count_min, max(c.count_min, min(c.count_max, summers)), c.time_min_s, c.time_max_s
        )

    async def prepare(self, batch: list[Contribution]) -> None:
        """Each mask to a file named by its digest, before the batch's commit: the
        coordinator then holds no mask in memory (S copies of the model) and votes on
        the digests; honest summers' identical masks are one file."""
        s, rid = self.s, self.state.round_id

        def durable() -> list[bytes]:
            # In a worker thread: hashing and writing 4·M bytes release the GIL.
            s.checkpoints.prune_masks(keep_round=rid)
            digests = []
            for item in batch:
                assert item.words is not None
                digest = mask_digest(item.words)
                s.checkpoints.write_mask(rid, digest, item.words.data.cast("B"))
                digests.append(digest)
            return digests

        digests = await asyncio.to_thread(durable)
        for item, digest in zip(batch, digests, strict=True):
            assert isinstance(item.record, Sum2Record)
            item.record = dataclasses.replace(item.record, mask_digest=digest)
            item.words = None

    async def write(self, tx: Transaction, batch: list[Contribution]) -> None:
        rid = self.state.round_id
        for item in batch:
            assert isinstance(item.record, Sum2Record)
            await tx.add_sum2(rid, item.record)
            await tx.record_message(
                item.record.digest, rid, self.phase, item.incoming.device, item.incoming.received_at
            )

    def committed(self, batch: list[Contribution]) -> None:
        state = self.state
        for item in batch:
            assert isinstance(item.record, Sum2Record)
            state.sum2[item.incoming.device] = item.record
            state.accepted_digests.add(item.record.digest)
            state.pending.discard(item.incoming.device)
        assert state.window is not None
        state.window.accepted(len(batch))
        self.s.metrics.participants.labels(role="sum2").set(len(state.sum2))

    def count(self) -> int:
        return len(self.state.sum2)

    def complete(self) -> bool:
        return len(self.state.sum2) >= len(self.state.summers)

    def ready(self) -> bool:
        """Every mask group has at least one answer (the unmask needs one mask per group)."""
        params, state = self.state.params, self.state
        if params.groups == 1:
            return True
        answered = {params.group_of(state.summers[d].public_key) for d in state.sum2}
        return len(answered) == params.groups
