"""MQTT topic names of one fleet, and parsing of a topic a message arrived on.

Every topic lives under ``maskfl/v1/<fleet>/``::

    round                              coordinator → all (retained round parameters)
    revocations                        coordinator → all (retained revocation list)
    round/<round id>/sum/<device>      summer → coordinator
    round/<round id>/update/<device>   updater → coordinator
    round/<round id>/sum2/<device>     summer → coordinator
    round/<round id>/sums              coordinator → updaters (retained sum dictionary)
    round/<round id>/seeds/<summer>    coordinator → one summer (retained seed dictionary)
    model/<model id>/graph             coordinator → all (retained .tflite)
    model/<model id>/latest            coordinator → devices that need it (retained global model)
    receipts/<device>                  coordinator → one device
    status/<device>                    device → coordinator (heartbeat, last will)

Participant topics end with the device id, so the broker ACL can confine a
device with ``%u`` and the coordinator can check that the topic's device is the
certificate's subject. Ids are ``[A-Za-z0-9_-]{1,64}``; round ids are decimal
u64 without leading zeros. :func:`parse_topic` turns a received topic into a
:class:`ParsedTopic` or raises ``RemoteProtocolError(MALFORMED)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from maskfl.protocol._codec import U64_MAX, check_id, is_valid_id
from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from maskfl.protocol.ids import DeviceId, FleetId, RoundId

__all__ = [
    "MAX_TOPIC_LENGTH",
    "ROOT",
    "ParsedTopic",
    "TopicKind",
    "Topics",
    "parse_topic",
]

ROOT: Final = "maskfl/v1"
MAX_TOPIC_LENGTH: Final = 512


class TopicKind(StrEnum):
    ROUND = "round"
    REVOCATIONS = "revocations"
    SUM = "sum"
    UPDATE = "update"
    SUM2 = "sum2"
    SUMS = "sums"
    SEEDS = "seeds"
    MODEL_GRAPH = "model_graph"
    MODEL_LATEST = "model_latest"
    RECEIPTS = "receipts"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a topic names; fields that the kind does not use are None."""

    kind: TopicKind
    fleet: FleetId
    round_id: RoundId | None = None
    device: DeviceId | None = None
    model_id: str | None = None


def _round(round_id: int) -> str:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id <= U64_MAX:
        raise LocalProtocolError(f"round id {round_id!r} is not a u64")
    return str(round_id)


class Topics:
    """The topics of one fleet. Builders validate ids (LocalProtocolError)."""

    __slots__ = ("fleet", "prefix")

    def __init__(self, fleet: str) -> None:
        self.fleet = FleetId(check_id(fleet, "fleet"))
        self.prefix = f"{ROOT}/{self.fleet}/"

    @property
    def round(self) -> str:
        return f"{self.prefix}round"

    @property
    def revocations(self) -> str:
        return f"{self.prefix}revocations"

    def sum(self, round_id: int, device: str) -> str:
        return f"{self.prefix}round/{_round(round_id)}/sum/{check_id(device, 'device')}"

    def update(self, round_id: int, device: str) -> str:
        return f"{self.prefix}round/{_round(round_id)}/update/{check_id(device, 'device')}"

    def sum2(self, round_id: int, device: str) -> str:
        return f"{self.prefix}round/{_round(round_id)}/sum2/{check_id(device, 'device')}"

    def sums(self, round_id: int) -> str:
        return f"{self.prefix}round/{_round(round_id)}/sums"

    def seeds(self, round_id: int, summer: str) -> str:
        return f"{self.prefix}round/{_round(round_id)}/seeds/{check_id(summer, 'summer')}"

    def model_graph(self, model_id: str) -> str:
        return f"{self.prefix}model/{check_id(model_id, 'model id')}/graph"

    def model_latest(self, model_id: str) -> str:
        return f"{self.prefix}model/{check_id(model_id, 'model id')}/latest"

    def model_latest_filter(self) -> str:
        """Every model's ``latest`` topic (observers; agents subscribe per model, on demand)."""
        return f"{self.prefix}model/+/latest"

    def receipts(self, device: str) -> str:
        return f"{self.prefix}receipts/{check_id(device, 'device')}"

    def status(self, device: str) -> str:
        return f"{self.prefix}status/{check_id(device, 'device')}"

    @property
    def status_prefix(self) -> str:
        """The start of every ``status/<device>`` topic."""
        return f"{self.prefix}status/"

    def participant_filters(self) -> tuple[str, ...]:
        """Every device → coordinator round topic (sum, update, sum2)."""
        p = self.prefix
        return (f"{p}round/+/sum/+", f"{p}round/+/update/+", f"{p}round/+/sum2/+")

    def status_filter(self) -> str:
        """Every device's heartbeat and last-will topic."""
        return f"{self.status_prefix}+"

    def coordinator_filters(self) -> tuple[str, ...]:
        """What the coordinator subscribes to: every participant topic and every status."""
        return (*self.participant_filters(), self.status_filter())

    def agent_filters(self, device: str) -> tuple[str, ...]:
        """What a device subscribes to for good: round, revocations, sums, its seeds and
        receipts, model graphs. ``model/<id>/latest`` is subscribed only while the
        device needs that model (see :meth:`model_latest`)."""
        d = check_id(device, "device")
        p = self.prefix
        return (
            f"{p}round",
            f"{p}revocations",
            f"{p}round/+/sums",
            f"{p}round/+/seeds/{d}",
            f"{p}receipts/{d}",
            f"{p}model/+/graph",
        )

    def parse(self, topic: str) -> ParsedTopic:
        """:func:`parse_topic`, and the fleet must be this one (``WRONG_FLEET``)."""
        parsed = parse_topic(topic)
        if parsed.fleet != self.fleet:
            raise RemoteProtocolError(
                Reason.WRONG_FLEET, f"topic of fleet {parsed.fleet!r}, expected {self.fleet!r}"
            )
        return parsed


def _bad(topic: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED, f"topic {topic[:80]!r}: {why}")


def _parse_round(topic: str, text: str) -> RoundId:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise _bad(topic, "round id is not a decimal without leading zeros")
    if len(text) > 20 or int(text) > U64_MAX:
        raise _bad(topic, "round id does not fit in a u64")
    return RoundId(int(text))


def _parse_id(topic: str, text: str, what: str) -> str:
    if not is_valid_id(text):
        raise _bad(topic, f"{what} is not [A-Za-z0-9_-]{{1,64}}")
    return text


def parse_topic(topic: str) -> ParsedTopic:  # noqa: PLR0911 one return per topic shape
    """What ``topic`` names, or ``RemoteProtocolError(MALFORMED)``."""
    if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LENGTH:
        raise _bad(str(topic), "not a topic of at most 512 characters")
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != "maskfl" or levels[1] != "v1":
        raise _bad(topic, f"not under {ROOT}/<fleet>/")
    fleet = FleetId(_parse_id(topic, levels[2], "fleet"))
    rest = levels[3:]
    match rest:
        case ["round"]:
            return ParsedTopic(TopicKind.ROUND, fleet)
        case ["revocations"]:
            return ParsedTopic(TopicKind.REVOCATIONS, fleet)
        case ["round", round_text, ("sum" | "update" | "sum2") as kind, device]:
            return ParsedTopic(
                TopicKind(kind),
                fleet,
                round_id=_parse_round(topic, round_text),
                device=DeviceId(_parse_id(topic, device, "device")),
            )
        case ["round", round_text, "sums"]:
            return ParsedTopic(TopicKind.SUMS, fleet, round_id=_parse_round(topic, round_text))
        case ["round", round_text, "seeds", summer]:
            return ParsedTopic(
                TopicKind.SEEDS,
                fleet,
                round_id=_parse_round(topic, round_text),
                device=DeviceId(_parse_id(topic, summer, "summer")),
            )
        case ["model", model_id, ("graph" | "latest") as what]:
            model_kind = TopicKind.MODEL_GRAPH if what == "graph" else TopicKind.MODEL_LATEST
            return ParsedTopic(model_kind, fleet, model_id=_parse_id(topic, model_id, "model id"))
        case ["receipts" | "status" as what, device]:
            return ParsedTopic(
                TopicKind(what), fleet, device=DeviceId(_parse_id(topic, device, "device"))
            )
        case _:
            raise _bad(topic, "unknown topic")
