"""update: masked updates are verified, added to the aggregate and made durable.

Accepts ``UPDATE`` from devices whose ticket makes them updaters, one per
device, with exactly M + 1 words of the round's word size and a sealed seed for
exactly the summers of the sum dictionary.

Durability (per group-commit batch, see :mod:`..committer`): the batch's words
are added to the accumulator, appended to the round's update log (fsync), and
the accumulator is checkpointed as generation g + 1 (temp, fsync, rename); then
one transaction records the updates, their seed-dictionary entries and the
round row naming generation g + 1. Only then are the MQTT deliveries acked. So
the checkpoint named by the database holds exactly the updates the database
lists, whatever instant the process dies at.

Once the move to sum2 is committed, the sum2 phase publishes one signed seed
dictionary per summer, retained on ``round/<id>/seeds/<summer>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np

from maskfl.broker_coordinator.context import Contribution, Incoming, RoundState, Services
from maskfl.broker_coordinator.phases.base import MessagePhase
from maskfl.broker_coordinator.phases.sum import check_once, check_task
from maskfl.broker_coordinator.store import RoundRecord, Transaction, UpdateRecord
from maskfl.protocol.errors import Reason, RemoteProtocolError
from maskfl.protocol.messages import SeedDict, Update
from maskfl.protocol.phases import Phase, PhaseWindow
from maskfl.protocol.sortition import Task

log = logging.getLogger("maskfl.coordinator.update")


async def publish_seed_dicts(s: Services, state: RoundState) -> None:
    """One signed, retained seed dictionary per accepted summer (deterministic bytes),
    naming the summer's mask group."""
    for summer in state.summers.values():
        entries = await s.store.seeds_for(state.round_id, summer.public_key)
        group = state.params.group_of(summer.public_key)
        raw = s.sign(SeedDict(summer.public_key, dict(entries), group), state.round_id)
        await s.outbox.state(s.topics.seeds(state.round_id, summer.device_id), raw)


class UpdatePhase(MessagePhase):
    phase = Phase.UPDATE

    _next: RoundRecord | None = None

    def window(self) -> PhaseWindow:
        c = self.s.config.pet.update
        return PhaseWindow(c.count_min, c.count_max, c.time_min_s, c.time_max_s)

    async def enter(self, resumed: bool) -> None:
        # The sum dictionary was committed with the move to this phase: publish it
        # (again, when resumed: a kill may have come before the broker had it).
        if self.state.record.sum_dict is not None:
            await self.s.outbox.state(
                self.s.topics.sums(self.state.round_id), self.state.record.sum_dict
            )

    async def admit(self, incoming: Incoming) -> Contribution:
        body = incoming.message.body
        assert isinstance(body, Update)
        state, s = self.state, self.s
        check_once(self, incoming.device, incoming.device in state.updates)
        check_task(self, incoming.message.header.sender, Task.UPDATE)
        words = body.words
        if words.dtype != np.dtype(s.mask.dtype) or words.shape != (s.vector_words,):
            raise RemoteProtocolError(
                Reason.WRONG_LENGTH,
                f"update has {words.size} words of {words.dtype.itemsize * 8} bits, expected "
                f"{s.vector_words} of {s.mask.word_bits}",
            )
        expected = set(state.summer_devices)
        given = set(body.sealed_seeds)
        if given - expected:
            raise RemoteProtocolError(
                Reason.UNKNOWN_SUMMER,
                f"seeds sealed to {len(given - expected)} keys that are not summers this round",
            )
        if given != expected:
            raise RemoteProtocolError(
                Reason.WRONG_LENGTH,
                f"seeds for {len(given)} of the {len(expected)} summers; seal to every summer",
            )
        record = UpdateRecord(incoming.device, incoming.message.digest, 0, 0, words.nbytes)
        return Contribution(
            incoming,
            record,
            words=words,
            seeds=tuple(sorted(body.sealed_seeds.items())),
            public_key=body.certificate.public_key,
            serial=body.certificate.serial,
        )

    async def prepare(self, batch: list[Contribution]) -> None:
        s, state = self.s, self.state
        acc = state.acc
        assert acc is not None
        storage = s.config.storage
        gen = state.record.checkpoint_gen + 1
        start = state.record.update_log_size
        vectors = [item.words for item in batch if item.words is not None]
        # Which words stay in memory (a view of the received message: no copy)
        # and which go to the update log.
        in_memory: list[bool] = []
        budget = state.words_bytes
        for words in vectors:
            keep = (
                storage.update_words == "memory"
                and budget + words.nbytes <= storage.update_memory_max_bytes
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
                item.record.digest, rid, "update", item.incoming.device, item.incoming.received_at
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
        assert state.timer is not None
        state.timer.accepted(len(batch))
        state.last_update_commit_at = s.clock()
        s.metrics.participants.labels(role="updaters").set(len(state.updates))
        if old_gen:
            s.checkpoints.path(state.round_id, old_gen).unlink(missing_ok=True)

    async def close(self) -> Phase:
        # The seed dictionaries are made from committed rows; the sum2 phase
        # publishes them once the runner has committed the move to it.
        return Phase.SUM2
