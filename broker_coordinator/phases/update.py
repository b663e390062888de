"""update: masked updates are verified, added to the aggregate and made durable.

Admits ``UPDATE`` from devices whose ticket makes them updaters, one per
device, with exactly M + 4 words of the round's word size and a sealed seed for
exactly the summers of the sum dictionary (:mod:`..admission`).

Durability (per group-commit batch, see :mod:`..committer`): the batch's words
are added to the accumulator, appended to the round's update log (fsync), and
the accumulator is checkpointed as generation g + 1 (temp, fsync, rename); then
one transaction records the updates, their seed-dictionary entries and the
round row naming generation g + 1. Only then are the MQTT deliveries acked. So
the checkpoint named by the database holds exactly the updates the database
lists, whatever instant the process dies at.

Once the move to sum2 is committed, the runner publishes one signed seed
dictionary per summer, retained on ``round/<id>/seeds/<summer>`` (the table's
update -> sum2 move produces SEED_DICT; :mod:`..retained`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np

from maskfl.broker_coordinator.context import Contribution
from maskfl.broker_coordinator.phases.base import MessagePhase
from maskfl.broker_coordinator.store import RoundRecord, Transaction, UpdateRecord
from maskfl.protocol.phases import Phase, PhaseWindow

log = logging.getLogger("maskfl.coordinator.update")


class UpdatePhase(MessagePhase):
    phase = Phase.UPDATE

    _next: RoundRecord | None = None

    def limits(self) -> PhaseWindow:
        c = self.s.config.pet.update
        return PhaseWindow(c.count_min, c.count_max, c.time_min_s, c.time_max_s)

    def count(self) -> int:
        return len(self.state.updates)

    async def prepare(self, batch: list[Contribution]) -> None:
        s, state = self.s, self.state
        acc = state.acc
        assert acc is not None
        storage = s.config.storage
        gen = state.record.checkpoint_gen + 1
        start = state.record.update_log_size
        vectors = [item.words for item in batch if item.words is not None]
        # Which words stay in memory (a view of the received message, no copy: its
        # bytes stay counted in the message memory, see ingest) and which go to the
        # update log.
        in_memory: list[bool] = []
        budget = state.words_bytes
        for words in vectors:
            keep = (
                storage.update_words == "memory"
                and budget + words.nbytes <= s.config.words_memory_bytes
            )
            budget += words.nbytes if keep else 0
            in_memory.append(keep)
        blobs = [w.view(np.uint8) for w, keep in zip(vectors, in_memory, strict=True) if not keep]

        def durable() -> list[int]:
            # In a worker thread: numpy, hashlib and file I/O release the GIL, so
            # the event loop keeps reading the next messages meanwhile. Only the
            # committer touches the accumulator during the update phase.
            acc.add_batch(vectors)
            image = acc.checkpoint_image()  # views the sum: written before the next add
            offsets = (
                s.update_log.append(state.round_id, start, blobs, fsync=storage.update_log_fsync)
                if blobs
                else []
            )
            s.checkpoints.write(state.round_id, gen, image)
            return offsets

        offsets = iter(await asyncio.to_thread(durable))
        end = start
        for item, keep in zip(batch, in_memory, strict=True):
            assert isinstance(item.record, UpdateRecord)
            offset = -1 if keep else next(offsets)
            item.record = dataclasses.replace(item.record, generation=gen, log_offset=offset)
            if not keep:
                end = offset + item.record.log_length
        self._next = dataclasses.replace(state.record, checkpoint_gen=gen, update_log_size=end)

    async def write(self, tx: Transaction, batch: list[Contribution]) -> None:
        rid = self.state.round_id
        for item in batch:
            assert isinstance(item.record, UpdateRecord)
            await tx.add_update(rid, item.record, item.seeds)
            await tx.record_message(
                item.record.digest, rid, self.phase, item.incoming.device, item.incoming.received_at
            )
            await tx.touch_device(
                item.incoming.device, item.public_key, item.serial, item.incoming.received_at
            )
        assert self._next is not None
        await tx.put_round(self._next)

    def committed(self, batch: list[Contribution]) -> None:
        state, s = self.state, self.s
        assert self._next is not None
        old_gen = state.record.checkpoint_gen
        state.record = self._next
        self._next = None
        for item in batch:
            assert isinstance(item.record, UpdateRecord)
            state.updates[item.incoming.device] = item.record
            state.update_digests.add(item.record.digest)
            state.accepted_digests.add(item.record.digest)
            state.pending.discard(item.incoming.device)
            if item.record.log_offset < 0 and item.words is not None:
                state.words[item.record.digest] = item.words
                state.words_bytes += item.words.nbytes
            item.words = None
        assert state.window is not None
        state.window.accepted(len(batch))
        state.last_update_commit_at = s.clock()
        s.metrics.participants.labels(role="updaters").set(len(state.updates))
        if old_gen:
            s.checkpoints.path(state.round_id, old_gen).unlink(missing_ok=True)
