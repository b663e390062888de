"""Every reason :func:`admit` returns, one pure call each: no broker, no store, no clock.

Real signed messages (PyNaCl), a real fleet CA and :class:`Enrollment`, the round
state built by hand; each test changes one thing about an admissible message.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.admission import Admission, Refusal, RoundView, admit
from maskfl.broker_coordinator.context import Contribution, Incoming, OpenRound
from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.broker_coordinator.store import RoundRecord, SummerRecord, UpdateRecord
from maskfl.protocol.crypto import EphemeralKeyPair
from maskfl.protocol.errors import Reason
from maskfl.protocol.identity import Identity
from maskfl.protocol.ids import Role, RoundId
from maskfl.protocol.masking import MaskConfig, update_words
from maskfl.protocol.messages import (
    Body,
    RoundParams,
    Sum,
    Sum2,
    Update,
    decode_message,
    encode_message,
)
from maskfl.protocol.phases import Phase, PhaseWindow, Window
from maskfl.protocol.topics import TopicKind
from maskfl.testing.fleet import SimFleet

FLEET = "simfleet"
M = 6
ROUND = 4
NOW = float(int(time.time()))
MASK = MaskConfig(bound=0.5, n_max=100, word_bits=32)
SEED = bytes(range(32))
TOPIC = {Sum: TopicKind.SUM, Update: TopicKind.UPDATE, Sum2: TopicKind.SUM2}


@dataclasses.dataclass
class World:
    fleet: SimFleet
    params: Admission
    summers: list[Identity]
    updaters: list[Identity]
    state: OpenRound

    def view(self, phase: Phase, finished: int | None = None) -> RoundView:
        return RoundView(phase, self.state, finished)

    def incoming(
        self,
        who: Identity,
        body: Body,
        *,
        round_id: int = ROUND,
        topic: TopicKind | None = None,
        topic_round: int | None = None,
        device: str | None = None,
        fleet: str = FLEET,
    ) -> Incoming:
        raw = encode_message(body, fleet=fleet, round_id=round_id, signing_key=who.signing_key)
        signed = decode_message(raw, max_size=len(raw))
        return Incoming(
            signed,
            device or who.device_id,
            [],
            len(raw),
            NOW,
            topic or TOPIC[type(body)],
            round_id if topic_round is None else topic_round,
        )

    def sum(self, who: Identity, **kw: object) -> Incoming:
        body = Sum(who.certificate, EphemeralKeyPair.generate().public_key)
        return self.incoming(who, body, **kw)  # type: ignore[arg-type]

    def update(
        self, who: Identity, *, words: int | None = None, seeds: int | None = None
    ) -> Incoming:
        keys = [s.public_key for s in self.summers]
        sealed = {k: bytes(80) for k in keys[: len(keys) if seeds is None else seeds]}
        vector = np.zeros(update_words(M) if words is None else words, dtype=MASK.dtype)
        return self.incoming(who, Update(who.certificate, sealed, vector))

    def sum2(
        self, who: Identity, *, words: int | None = None, failed: tuple[bytes, ...] = ()
    ) -> Incoming:
        vector = np.zeros(update_words(M) if words is None else words, dtype=MASK.dtype)
        return self.incoming(who, Sum2(who.certificate, vector, failed))

    def open(self, phase: Phase, count_max: int = 3) -> None:
        self.state.window = Window(PhaseWindow(1, count_max, 0.0, 60.0), NOW)
        self.state.closing = False

    def accept_summers(self) -> None:
        for s in self.summers:
            record = SummerRecord(s.device_id, s.public_key, bytes(32), bytes(32), b"")
            self.state.summers[s.device_id] = record
            self.state.summer_devices[s.public_key] = s.device_id


@pytest.fixture(scope="module")
def world() -> World:
    fleet = SimFleet(FLEET)
    coordinator = fleet.identity("coordinator", role=Role.COORDINATOR)
    summers, updaters = fleet.identities_for_roles(
        SEED, p_sum=0.5, p_update=1.0, summers=2, updaters=2
    )
    params = RoundParams(
        round_id=RoundId(ROUND),
        seed=SEED,
        previous_seed=bytes(32),
        p_sum=0.5,
        p_update=1.0,
        sum_time_max_s=60.0,
        update_time_max_s=60.0,
        sum2_time_max_s=60.0,
        model_id="m",
        model_version=0,
        model_digest=bytes(32),
        mask=MASK,
        vector_length=M,
        chunk_size=1 << 20,
        certificate=coordinator.certificate,
    )
    record = RoundRecord(ROUND, Phase.SUM, SEED, bytes(32), 0.5, 1.0, b"", NOW, NOW)
    enrollment = Enrollment(fleet=FLEET, ca_public_key=fleet.ca_public_key, revocations_file=None)
    admission = Admission(FLEET, enrollment)
    return World(fleet, admission, summers, updaters, OpenRound(record, params))


@pytest.fixture
def w(world: World) -> World:
    """A fresh round (round 4, in sum) for each test, on the module's keys."""
    state = OpenRound(world.state.record, world.state.params)
    fresh = dataclasses.replace(world, state=state)
    fresh.open(Phase.SUM)
    return fresh


def refused(result: Contribution | Refusal) -> tuple[Reason, bool]:
    assert isinstance(result, Refusal), result
    return result.reason, result.authenticated


def late(result: Contribution | Refusal) -> bool:
    assert isinstance(result, Refusal), result
    return result.late


# --- admitted ----------------------------------------------------------------------------


def test_a_sum_update_and_sum2_are_admitted_with_their_records(w: World) -> None:
    s0, u0 = w.summers[0], w.updaters[0]
    got = admit(w.params, w.view(Phase.SUM), w.sum(s0), NOW)
    assert isinstance(got, Contribution) and isinstance(got.record, SummerRecord)
    assert got.record.public_key == s0.public_key and got.serial == s0.certificate.serial
    w.accept_summers()
    got = admit(w.params, w.view(Phase.UPDATE), w.update(u0), NOW)
    assert isinstance(got, Contribution) and isinstance(got.record, UpdateRecord)
    assert got.words is not None and got.words.shape == (update_words(M),)
    assert [k for k, _ in got.seeds] == sorted(s.public_key for s in w.summers)
    w.state.update_digests.add(bytes(32))
    got = admit(w.params, w.view(Phase.SUM2), w.sum2(s0, failed=(bytes(32),)), NOW)
    assert isinstance(got, Contribution) and got.record.failed == (bytes(32),)  # type: ignore[union-attr]


# --- the sender ---------------------------------------------------------------------------


def test_another_fleet_is_wrong_fleet(w: World) -> None:
    other = SimFleet("otherfleet").identity("dev-x")
    got = admit(w.params, w.view(Phase.SUM), w.sum(other, fleet="otherfleet"), NOW)
    assert refused(got) == (Reason.WRONG_FLEET, False)


def test_a_type_on_another_kind_of_topic_is_malformed(w: World) -> None:
    got = admit(w.params, w.view(Phase.SUM), w.sum(w.summers[0], topic=TopicKind.UPDATE), NOW)
    assert refused(got) == (Reason.MALFORMED, False)


def test_a_header_round_that_is_not_the_topic_round_is_wrong_round(w: World) -> None:
    got = admit(w.params, w.view(Phase.SUM), w.sum(w.summers[0], topic_round=ROUND + 1), NOW)
    assert refused(got) == (Reason.WRONG_ROUND, False)
    assert not late(got)  # a replay on another round's topic, whatever the store holds


def test_an_accepted_message_again_is_duplicate(w: World) -> None:
    message = w.sum(w.summers[0])
    w.state.accepted_digests.add(message.message.digest)
    assert refused(admit(w.params, w.view(Phase.UPDATE), message, NOW)) == (Reason.DUPLICATE, False)


def test_a_foreign_ca_or_another_devices_certificate_is_unenrolled(w: World) -> None:
    foreign = SimFleet(FLEET).identity(w.summers[0].device_id)
    assert refused(admit(w.params, w.view(Phase.SUM), w.sum(foreign), NOW)) == (
        Reason.UNENROLLED,
        False,
    )
    got = admit(w.params, w.view(Phase.SUM), w.sum(w.summers[0], device="dev-other"), NOW)
    assert refused(got) == (Reason.UNENROLLED, False)


def test_an_expired_or_revoked_certificate_is_refused_and_late(w: World, tmp_path: Path) -> None:
    expired = w.fleet.identity("dev-old", not_after=int(NOW) - 10)
    got = admit(w.params, w.view(Phase.SUM), w.sum(expired), NOW)
    assert refused(got) == (Reason.EXPIRED, False)
    assert late(got)
    path = tmp_path / "revoked.bin"
    w.fleet.revocations(path, [w.summers[1].certificate.serial], version=1)
    enrollment = Enrollment(fleet=FLEET, ca_public_key=w.fleet.ca_public_key, revocations_file=path)
    assert enrollment.reload_if_changed()
    params = dataclasses.replace(w.params, enrollment=enrollment)
    got = admit(params, w.view(Phase.SUM), w.sum(w.summers[1]), NOW)
    assert refused(got) == (Reason.REVOKED, False)
    assert late(got)  # the caller asks the store whether it counted


# --- the round ----------------------------------------------------------------------------


def test_the_round_that_just_ended_is_phase_closed_and_none_open_is_wrong_round(
    w: World,
) -> None:
    message = w.sum(w.summers[0])
    assert refused(admit(w.params, RoundView(Phase.IDLE, None, ROUND), message, NOW)) == (
        Reason.PHASE_CLOSED,
        True,
    )
    assert refused(admit(w.params, RoundView(Phase.IDLE, None, ROUND - 1), message, NOW)) == (
        Reason.WRONG_ROUND,
        True,
    )
    old = admit(w.params, w.view(Phase.SUM), w.sum(w.summers[0], round_id=ROUND - 1), NOW)
    assert refused(old) == (Reason.WRONG_ROUND, True)
    assert late(old)


def test_an_earlier_phase_or_a_closing_one_is_phase_closed_a_later_one_wrong_phase(
    w: World,
) -> None:
    s0 = w.summers[0]
    got = admit(w.params, w.view(Phase.UPDATE), w.sum(s0), NOW)
    assert refused(got)[0] is Reason.PHASE_CLOSED
    assert late(got)
    assert refused(admit(w.params, w.view(Phase.SUM), w.update(w.updaters[0]), NOW))[0] is (
        Reason.WRONG_PHASE
    )
    w.state.closing = True
    assert refused(admit(w.params, w.view(Phase.SUM), w.sum(s0), NOW))[0] is Reason.PHASE_CLOSED
    assert refused(admit(w.params, w.view(Phase.FAILURE), w.sum(s0), NOW))[0] is (
        Reason.PHASE_CLOSED
    )


def test_a_second_message_of_a_device_is_duplicate_even_while_pending(w: World) -> None:
    s0 = w.summers[0]
    w.state.pending.add(s0.device_id)
    got = admit(w.params, w.view(Phase.SUM), w.sum(s0), NOW)
    assert refused(got)[0] is Reason.DUPLICATE
    assert not late(got)
    w.state.pending.clear()
    w.accept_summers()
    assert refused(admit(w.params, w.view(Phase.SUM), w.sum(s0), NOW))[0] is Reason.DUPLICATE


def test_a_full_window_counting_pending_messages_is_phase_closed(w: World) -> None:
    w.open(Phase.SUM, count_max=2)
    assert w.state.window is not None
    w.state.window.accepted(1)
    w.state.pending.add("dev-elsewhere")
    got = admit(w.params, w.view(Phase.SUM), w.sum(w.summers[0]), NOW)
    assert refused(got) == (Reason.PHASE_CLOSED, True)
    assert isinstance(got, Refusal) and "full (2)" in got.detail


def test_a_key_whose_ticket_draws_another_task_is_not_eligible(w: World) -> None:
    got = admit(w.params, w.view(Phase.SUM), w.sum(w.updaters[0]), NOW)
    assert refused(got) == (Reason.NOT_ELIGIBLE, True)
    w.accept_summers()
    got = admit(w.params, w.view(Phase.UPDATE), w.update(w.summers[0]), NOW)
    assert refused(got) == (Reason.NOT_ELIGIBLE, True)


def test_an_update_of_the_wrong_size_or_seeds_for_too_few_summers_is_wrong_length(
    w: World,
) -> None:
    w.accept_summers()
    u0 = w.updaters[0]
    got = admit(w.params, w.view(Phase.UPDATE), w.update(u0, words=update_words(M) - 1), NOW)
    assert refused(got)[0] is Reason.WRONG_LENGTH
    assert isinstance(got, Refusal) and "update has 9 words of 32 bits" in got.detail
    got = admit(w.params, w.view(Phase.UPDATE), w.update(u0, seeds=1), NOW)
    assert refused(got)[0] is Reason.WRONG_LENGTH
    assert isinstance(got, Refusal) and "seeds for 1 of the 2 summers" in got.detail


def test_a_seed_sealed_to_a_key_that_is_no_summer_is_unknown_summer(w: World) -> None:
    w.accept_summers()
    del w.state.summer_devices[w.summers[1].public_key]
    got = admit(w.params, w.view(Phase.UPDATE), w.update(w.updaters[0]), NOW)
    assert refused(got) == (Reason.UNKNOWN_SUMMER, True)


def test_a_sum2_from_no_summer_or_another_key_is_unknown_summer(w: World) -> None:
    w.open(Phase.SUM2)
    got = admit(w.params, w.view(Phase.SUM2), w.sum2(w.summers[0]), NOW)
    assert refused(got) == (Reason.UNKNOWN_SUMMER, True)
    w.accept_summers()
    s0 = w.summers[0]
    w.state.summers[s0.device_id] = dataclasses.replace(
        w.state.summers[s0.device_id], public_key=w.summers[1].public_key
    )
    got = admit(w.params, w.view(Phase.SUM2), w.sum2(s0), NOW)
    assert refused(got) == (Reason.UNKNOWN_SUMMER, True)


def test_a_sum2_of_the_wrong_size_is_wrong_length_and_an_unknown_failed_digest_malformed(
    w: World,
) -> None:
    w.accept_summers()
    s0 = w.summers[0]
    got = admit(w.params, w.view(Phase.SUM2), w.sum2(s0, words=3), NOW)
    assert refused(got)[0] is Reason.WRONG_LENGTH
    assert isinstance(got, Refusal) and got.detail.startswith("aggregate mask has 3 words")
    got = admit(w.params, w.view(Phase.SUM2), w.sum2(s0, failed=(bytes(32),)), NOW)
    assert refused(got) == (Reason.MALFORMED, True)
