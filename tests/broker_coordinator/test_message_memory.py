"""The coordinator's message memory (issue 13, item 5): one bound on received messages
held in memory, ``pet.message_memory_max_bytes`` (partial uploads, whole messages until
settled, updates' words kept), kept under a flood of concurrent uploads, and the words
let go once the unmask no longer needs them.

Memory is counted by the ingest (:attr:`Ingest.held`); these tests check the
admission rules against that count and that what it counts is really let go (weak
references to the kept words). The RSS these bounds give is measured by
``maskfl-bench coordinator``, not asserted here.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.store import add_from_file
from maskfl.protocol.errors import StorageError
from maskfl.protocol.phases import Phase
from maskfl.protocol.topics import Topics
from tests.broker_coordinator.support import trained
from tests.broker_coordinator.test_round_harness import check_mean, phase, reasons
from tests.support.harness import harness

pytestmark = pytest.mark.timeout(120)

#: The smallest message memory the config allows; at chunk_size 4096 the transport's
#: queue takes 4 deliveries of 4096 + 64 KiB of it, messages get the rest (752 KiB).
SMALL = 1 << 20


async def test_a_flood_of_uploads_stays_within_the_message_memory(tmp_path: Path) -> None:
    """40 updates of 64 kB (16 frames each) against room for about 11, half of it open
    to kept words, in two waves of 20 uploads at once (the second once the first is
    in, its words kept): every update counts, and the memory held never passed the
    bound by more than the one message the spool may read back beyond it. Counting
    only the partials against the bound (not the kept words and whole messages) let
    the second wave's partials take the whole bound beside the words."""
    n = 40
    pet = {
        "chunk_size": 4096,
        "message_memory_max_bytes": SMALL,
        "round_pause_s": 600.0,
        "update": {"time_min_s": 0.0},
    }
    extra = {"storage": {"dir": "state", "update_words": "memory"}}
    async with harness(tmp_path, summers=2, updaters=n, length=16_000, pet=pet, extra=extra) as h:
        summers, updaters = h.fleet()
        first, second = updaters[: n // 2], updaters[n // 2 :]
        await h.start(summers + first)
        coordinator = await h.start_coordinator()
        await h.until(lambda: all(p.receipts for p in first), "the first wave's receipts")
        await h.start(second)
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model", 60)
        assert all(reasons(p) == [None] for p in updaters)
        model = trained(summers[0])[0]
        assert dict(model.metrics)["updates"] == n
        check_mean(h, updaters, model)
        ingest, services = coordinator.ingest, coordinator.services
        assert ingest is not None and services is not None
        config = services.config
        bound, message = config.message_bytes, services.max_message_size()
        assert bound < n * message / 2  # a flood: most uploads cannot be in memory at once
        assert ingest.chunks.spooled_peak > 0  # so some waited in the spool
        assert 0 < ingest.held_peak <= bound + message
        assert ingest.held == 0  # all let go after the round


async def test_kept_words_are_let_go_at_the_unmask(tmp_path: Path) -> None:
    """With ``storage.update_words = "memory"`` the accepted updates' words stay in
    memory through the sum2 phase (a summer may name an update it could not open);
    once the unmask has added the dropped ones' words to the mask nothing reads them
    again, and the round lets them go. They went only with the round object, which
    the runner's loop kept referenced through the pause before the next round (600 s
    here; in ``maskfl-bench coordinator`` 200 MB at M = 2.5e7); this test holds it
    too."""
    pet = {"round_pause_s": 600.0}
    extra = {"storage": {"dir": "state", "update_words": "memory"}}
    async with harness(tmp_path, summers=2, updaters=4, pet=pet, extra=extra) as h:
        summers, updaters = h.fleet()
        topics = Topics(h.setup.fleet.fleet)
        held = [h.broker.hold(topics.sum2(1, s.device_id)) for s in h.setup.summers]
        await h.start(summers + updaters)
        coordinator = await h.start_coordinator()
        await h.until(lambda: all(len(hold.held) == 1 for hold in held), "both SUM2s, held")
        assert phase(h) is Phase.SUM2
        runner, ingest = coordinator.runner, coordinator.ingest
        assert runner is not None and ingest is not None
        state = runner.state
        assert state is not None and len(state.words) == 4
        refs = [weakref.ref(words) for words in state.words.values()]
        assert ingest.held == state.words_bytes > 0  # the kept words are what is held
        for hold in held:
            hold.release()
        await h.until(lambda: all(trained(p) for p in h.participants), "the global model")
        gc.collect()
        assert [r() for r in refs] == [None] * 4
        assert state.words_bytes == 0 and ingest.held == 0


@pytest.mark.parametrize("offset", [0, 12])
def test_stored_words_are_added_in_slices(
    tmp_path: Path, offset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unmask adds the groups' masks and dropped updates' words from disk into one
    mask buffer a slice at a time (no second model-sized buffer, mapped or not),
    wrapping modulo 2^w as the aggregate does; a mask file of the wrong size or a short
    update log is a storage error."""
    monkeypatch.setattr("maskfl.broker_coordinator.store._SLICE_BYTES", 40)
    rng = np.random.default_rng(3)
    out = rng.integers(0, 2**32, 103, dtype=np.uint32)
    stored = rng.integers(0, 2**32, 103, dtype=np.uint32)
    path = tmp_path / "words"
    path.write_bytes(bytes(offset) + stored.tobytes() + b"tail")
    expected = out + stored  # uint32 wraps
    add_from_file(out, path, offset, "test words")
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(StorageError, match="is not 412 bytes long"):  # a mask file: exact
        add_from_file(out, path, 0, "sum2 mask", whole=True)
    with pytest.raises(StorageError, match="shorter than the round says"):
        add_from_file(out, path, len(stored.tobytes()), "update log")
