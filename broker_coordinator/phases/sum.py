"""sum: summers announce their ephemeral keys; at the end, the signed sum dictionary.

Admits ``SUM`` from devices whose ticket makes them summers this round, one
per device (:mod:`..admission`). Closing builds the :class:`~maskfl.protocol.messages.SumDict`
(every summer's own signed Sum message, so updaters verify each entry); the
runner stores it in the round row in the transaction that moves the round to
``update``, and only then does does the runner publish it, retained on ``round/<id>/sums``.
"""

from __future__ import annotations

import dataclasses

from maskfl.broker_coordinator.context import Contribution
from maskfl.broker_coordinator.errors import RoundFailedError
from maskfl.broker_coordinator.phases.base import MessagePhase
from maskfl.broker_coordinator.store import SummerRecord, Transaction
from maskfl.protocol.messages import SumDict
from maskfl.protocol.phases import Phase, PhaseWindow


class SumPhase(MessagePhase):
    phase = Phase.SUM

    def limits(self) -> PhaseWindow:
        c = self.s.config.pet.sum
        return PhaseWindow(c.count_min, c.count_max, c.time_min_s, c.time_max_s)

    async def write(self, tx: Transaction, batch: list[Contribution]) -> None:
        rid = self.state.round_id
        for item in batch:
            assert isinstance(item.record, SummerRecord)
            await tx.add_summer(rid, item.record)
            await tx.record_message(
                item.record.digest, rid, self.phase, item.incoming.device, item.incoming.received_at
            )
            await tx.touch_device(
                item.incoming.device, item.public_key, item.serial, item.incoming.received_at
            )

    def committed(self, batch: list[Contribution]) -> None:
        state = self.state
        for item in batch:
            assert isinstance(item.record, SummerRecord)
            state.summers[item.incoming.device] = item.record
            state.summer_devices[item.record.public_key] = item.incoming.device
            state.accepted_digests.add(item.record.digest)
            state.pending.discard(item.incoming.device)
        assert state.window is not None
        state.window.accepted(len(batch))
        self.s.metrics.participants.labels(role="summers").set(len(state.summers))

    def count(self) -> int:
        return len(self.state.summers)

    def ready(self) -> bool:
        """Every mask group has a summer: until then the phase waits past time_min (a
        slow summer may still come), and at time_max :meth:`close` fails the round."""
        params, state = self.state.params, self.state
        if params.groups == 1:
            return True
        drawn = {params.group_of(r.public_key) for r in state.summers.values()}
        return len(drawn) == params.groups

    async def close(self) -> None:
        s, state = self.s, self.state
        summers = sorted(state.summers.values(), key=lambda r: r.device_id)
        groups = tuple(state.params.group_of(r.public_key) for r in summers)
        g = state.params.groups
        empty = sorted(set(range(g)) - set(groups))
        if empty:
            # Merging an empty group into another would be unsound: the coordinator
            # decides which sums it accepts, so it could empty a group of honest
            # summers on purpose and have its seeds go to a group where it has one.
            counts = ", ".join(f"{j}: {groups.count(j)}" for j in range(g))
            raise RoundFailedError(
                f"mask group(s) {', '.join(map(str, empty))} of {g} drew no summer this round "
                f"(summers per group {counts}); an updater's seed for that group could be "
                "opened by nobody. Raise pet.sum.target or lower masking.groups",
                round_id=state.round_id,
            )
        raw = s.sign(SumDict(tuple(r.message for r in summers), groups), state.round_id)
        # Not published here: the runner commits it with the phase change, then
        # publishes it (the table's sum -> update move produces SUM_DICT).
        state.record = dataclasses.replace(state.record, sum_dict=raw)
