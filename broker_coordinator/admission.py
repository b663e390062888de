"""Every admission rule for a participant message, in one pure function.

:func:`admit` takes what the coordinator is configured with (:class:`Admission`),
where the round stands (:class:`RoundView`), one decoded, signature-checked
message (:class:`~maskfl.broker_coordinator.context.Incoming`) and the time, and
returns either the :class:`~maskfl.broker_coordinator.context.Contribution` to
commit or a :class:`Refusal` naming the receipt's reason. It writes nothing,
reads no clock and touches no store, so each reason is unit-tested directly
(tests/broker_coordinator/test_admission.py). The checks, in order (the first
that fails is the answer):

==================  ==============================================================
reason              when
==================  ==============================================================
wrong_fleet et al.  the header names another fleet (``SignedMessage.expect``)
malformed           the header's type is not the topic's kind
wrong_round         the header's round is not the topic's round
duplicate           this exact message was accepted this round
unenrolled et al.   the certificate does not check out (fleet CA, validity, revocation,
                    role, key); ``unenrolled`` also when it names another device
phase_closed        the round just ended (its id is the finished round's)
wrong_round         no round is open, or another one is
phase_closed        its phase is over (or closing, or full)
wrong_phase         its phase has not come yet
duplicate           the device already sent this phase's message (or one is pending)
unknown_summer      sum2 from a device that is not an accepted summer (or another key)
not_eligible        sum/update: the key's ticket draws another task
wrong_length        update/sum2: not M + 4 words of the round's width; update: seeds
                    sealed to fewer than every summer
unknown_summer      update: a seed sealed to a key that is not a summer
malformed           sum2: a failed digest that names no accepted update
==================  ==============================================================

What the caller does with a refusal that is not this function's to decide: a
*late* one (:attr:`Refusal.late`: wrong_round, phase_closed or wrong_phase from
the round checks, revoked or expired from the certificate) of a message the store
already counted is answered ``duplicate`` (ingest asks the store). A header that
disagrees with its topic is never late: it is refused whatever the store holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from maskfl.broker_coordinator.context import Contribution, Incoming, OpenRound
from maskfl.broker_coordinator.enrollment import Enrollment
from maskfl.broker_coordinator.store import Sum2Record, SummerRecord, UpdateRecord
from maskfl.protocol.errors import Reason, RemoteProtocolError
from maskfl.protocol.messages import Sum, Sum2, Update
from maskfl.protocol.phases import Phase, precedes
from maskfl.protocol.sortition import Task, select_task

__all__ = ["Admission", "Refusal", "RoundView", "admit"]

_LATE: Final = frozenset({Reason.WRONG_ROUND, Reason.PHASE_CLOSED, Reason.WRONG_PHASE})
"""Round refusals that a redelivery of a message accepted earlier would get."""
_LAPSED: Final = frozenset({Reason.REVOKED, Reason.EXPIRED})
"""Certificate refusals that may have come about after a message was accepted."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission needs of the coordinator's configuration (fixed per process)."""

    fleet: str
    enrollment: Enrollment


@dataclass(frozen=True, slots=True)
class RoundView:
    """Where the round stands when a message arrives: the runner's phase, the open
    round (None between rounds) and the id of the round that ended last."""

    phase: Phase
    round: OpenRound | None
    finished_round: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message turned away: the receipt's reason and words.

    ``authenticated``: its certificate checked out (the sender counts as seen for
    liveness). ``late``: a message accepted earlier would get this refusal when it
    comes back after its phase or round, or after its certificate lapsed (a
    redelivery after a restart); the caller answers ``duplicate`` instead if the
    store counted it."""

    reason: Reason
    detail: str
    authenticated: bool
    late: bool = False


def admit(
    params: Admission, state: RoundView, message: Incoming, now: float
) -> Contribution | Refusal:
    """The message's :class:`Contribution`, or the :class:`Refusal` it gets (see above)."""
    try:
        _check_sender(params, state, message, now)
    except RemoteProtocolError as exc:
        return Refusal(exc.reason, str(exc.args[0]), False, late=exc.reason in _LAPSED)
    try:
        return _check_round(params, state, message)
    except RemoteProtocolError as exc:
        return Refusal(exc.reason, str(exc.args[0]), True, late=exc.reason in _LATE)


def _check_sender(params: Admission, state: RoundView, message: Incoming, now: float) -> None:
    signed, header = message.message, message.message.header
    signed.expect(fleet=params.fleet)
    if header.message_type.topic_kind != message.topic:
        raise RemoteProtocolError(
            Reason.MALFORMED, f"{header.message_type.name} message on a {message.topic} topic"
        )
    if header.round_id != message.topic_round:
        # The signed header says where it belongs: an earlier round's message
        # replayed on this round's topic is for another round.
        raise RemoteProtocolError(
            Reason.WRONG_ROUND,
            f"message for round {header.round_id} on a topic of round {message.topic_round}",
        )
    if state.round is not None and signed.digest in state.round.accepted_digests:
        raise RemoteProtocolError(
            Reason.DUPLICATE, "this message was already accepted (it counts once)"
        )
    cert = params.enrollment.verify(signed, now)
    if cert.subject != message.device:
        raise RemoteProtocolError(
            Reason.UNENROLLED,
            f"certificate is enrolled as {cert.subject!r}, the topic names {message.device!r}",
        )


def _check_round(params: Admission, view: RoundView, message: Incoming) -> Contribution:
    header = message.message.header
    state = view.round
    if state is None and header.round_id == view.finished_round:
        raise RemoteProtocolError(Reason.PHASE_CLOSED, f"round {header.round_id} is over")
    if state is None or header.round_id != state.round_id:
        current = "none" if state is None else str(state.round_id)
        raise RemoteProtocolError(
            Reason.WRONG_ROUND,
            f"message for round {header.round_id}, current round is {current}",
        )
    wanted = header.message_type.phase
    assert wanted is not None  # the topic check let only participant types through
    if wanted != view.phase or state.closing or state.window is None:
        if precedes(wanted, view.phase) or (wanted == view.phase and state.closing):
            raise RemoteProtocolError(
                Reason.PHASE_CLOSED, f"the {wanted} phase of round {state.round_id} closed"
            )
        raise RemoteProtocolError(
            Reason.WRONG_PHASE, f"{header.message_type.name} not accepted in the {view.phase} phase"
        )
    match wanted:
        case Phase.SUM:
            return _sum(state, message)
        case Phase.UPDATE:
            return _update(state, message)
        case _:
            return _sum2(state, message)


def _once(state: OpenRound, phase: Phase, device: str, done: bool) -> None:
    """DUPLICATE for a second message of a device; PHASE_CLOSED once the phase is full."""
    if done or device in state.pending:
        raise RemoteProtocolError(
            Reason.DUPLICATE, f"{device} already sent its {phase} message this round"
        )
    window = state.window
    assert window is not None
    if not window.has_room(len(state.pending)):
        raise RemoteProtocolError(
            Reason.PHASE_CLOSED, f"{phase} phase is full ({window.limits.count_max})"
        )


def _task(state: OpenRound, public_key: bytes, wanted: Task) -> None:
    params = state.params
    task = select_task(params.seed, public_key, params.p_sum, params.p_update)
    if task is not wanted:
        raise RemoteProtocolError(
            Reason.NOT_ELIGIBLE, f"this key's ticket makes it {task}, not {wanted}, this round"
        )


def _sum(state: OpenRound, incoming: Incoming) -> Contribution:
    body = incoming.message.body
    assert isinstance(body, Sum)
    _once(state, Phase.SUM, incoming.device, incoming.device in state.summers)
    _task(state, incoming.message.header.sender, Task.SUM)
    record = SummerRecord(
        device_id=incoming.device,
        public_key=incoming.message.header.sender,
        ephemeral_pk=body.ephemeral_pk,
        digest=incoming.message.digest,
        message=incoming.message.raw,
    )
    return Contribution(
        incoming, record, public_key=body.certificate.public_key, serial=body.certificate.serial
    )


def _update(state: OpenRound, incoming: Incoming) -> Contribution:
    body = incoming.message.body
    assert isinstance(body, Update)
    _once(state, Phase.UPDATE, incoming.device, incoming.device in state.updates)
    _task(state, incoming.message.header.sender, Task.UPDATE)
    state.params.check_words(body.words, "update")
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
    record = UpdateRecord(incoming.device, incoming.message.digest, 0, 0, body.words.nbytes)
    return Contribution(
        incoming,
        record,
        words=body.words,
        seeds=tuple(sorted(body.sealed_seeds.items())),
        public_key=body.certificate.public_key,
        serial=body.certificate.serial,
    )


def _sum2(state: OpenRound, incoming: Incoming) -> Contribution:
    body = incoming.message.body
    assert isinstance(body, Sum2)
    summer = state.summers.get(incoming.device)
    if summer is None or summer.public_key != incoming.message.header.sender:
        raise RemoteProtocolError(
            Reason.UNKNOWN_SUMMER, f"{incoming.device} is not an accepted summer this round"
        )
    _once(state, Phase.SUM2, incoming.device, incoming.device in state.sum2)
    state.params.check_words(body.words, "aggregate mask")
    unknown = [d for d in body.failed if d not in state.update_digests]
    if unknown:
        raise RemoteProtocolError(
            Reason.MALFORMED, f"{len(unknown)} failed digests name no accepted update"
        )
    record = Sum2Record(incoming.device, incoming.message.digest, b"", tuple(body.failed))
    return Contribution(incoming, record, words=body.words)
