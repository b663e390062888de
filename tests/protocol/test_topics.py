"""Topic names and parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from maskfl.protocol.topics import ParsedTopic, TopicKind, Topics, parse_topic

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
rounds = st.integers(0, 2**64 - 1)

T = Topics("fleet-1")


def test_topic_names() -> None:
    assert T.round == "maskfl/v1/fleet-1/round"
    assert T.revocations == "maskfl/v1/fleet-1/revocations"
    assert T.sum(7, "dev-1") == "maskfl/v1/fleet-1/round/7/sum/dev-1"
    assert T.update(7, "dev-1") == "maskfl/v1/fleet-1/round/7/update/dev-1"
    assert T.sum2(7, "dev-1") == "maskfl/v1/fleet-1/round/7/sum2/dev-1"
    assert T.sums(7) == "maskfl/v1/fleet-1/round/7/sums"
    assert T.seeds(7, "dev-2") == "maskfl/v1/fleet-1/round/7/seeds/dev-2"
    assert T.model_graph("mlp") == "maskfl/v1/fleet-1/model/mlp/graph"
    assert T.model_latest("mlp") == "maskfl/v1/fleet-1/model/mlp/latest"
    assert T.receipts("dev-1") == "maskfl/v1/fleet-1/receipts/dev-1"
    assert T.status("dev-1") == "maskfl/v1/fleet-1/status/dev-1"


def test_participant_topics_end_with_the_device() -> None:
    for build in (T.sum, T.update, T.sum2):
        assert build(1, "dev_9").rsplit("/", 1)[1] == "dev_9"


def test_filters() -> None:
    assert "maskfl/v1/fleet-1/round/+/update/+" in T.coordinator_filters()
    assert "maskfl/v1/fleet-1/round/+/seeds/dev-1" in T.agent_filters("dev-1")
    assert all(f.startswith(T.prefix) for f in T.agent_filters("dev-1"))


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "é", "x" * 65, "dev.1", "dev\x00"])
def test_builders_reject_bad_ids(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        Topics(bad)
    with pytest.raises(LocalProtocolError):
        T.update(1, bad)
    with pytest.raises(LocalProtocolError):
        T.model_latest(bad)


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.0, "1"])
def test_builders_reject_bad_round_ids(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        T.sums(bad)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(fleet=ids, round_id=rounds, device=ids, model=ids)
def test_every_topic_parses_back(fleet: str, round_id: int, device: str, model: str) -> None:
    t = Topics(fleet)
    cases = {
        t.round: ParsedTopic(TopicKind.ROUND, t.fleet),
        t.revocations: ParsedTopic(TopicKind.REVOCATIONS, t.fleet),
        t.sum(round_id, device): ParsedTopic(TopicKind.SUM, t.fleet, round_id, device),  # type: ignore[arg-type]
        t.update(round_id, device): ParsedTopic(TopicKind.UPDATE, t.fleet, round_id, device),  # type: ignore[arg-type]
        t.sum2(round_id, device): ParsedTopic(TopicKind.SUM2, t.fleet, round_id, device),  # type: ignore[arg-type]
        t.sums(round_id): ParsedTopic(TopicKind.SUMS, t.fleet, round_id),  # type: ignore[arg-type]
        t.seeds(round_id, device): ParsedTopic(TopicKind.SEEDS, t.fleet, round_id, device),  # type: ignore[arg-type]
        t.model_graph(model): ParsedTopic(TopicKind.MODEL_GRAPH, t.fleet, model_id=model),
        t.model_latest(model): ParsedTopic(TopicKind.MODEL_LATEST, t.fleet, model_id=model),
        t.receipts(device): ParsedTopic(TopicKind.RECEIPTS, t.fleet, device=device),  # type: ignore[arg-type]
        t.status(device): ParsedTopic(TopicKind.STATUS, t.fleet, device=device),  # type: ignore[arg-type]
    }
    for topic, expected in cases.items():
        assert parse_topic(topic) == expected
        assert t.parse(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "maskfl",
        "maskfl/v1/fleet-1",
        "maskfl/v2/fleet-1/round",
        "other/v1/fleet-1/round",
        "maskfl/v1/fleet 1/round",
        "maskfl/v1/fleet-1/round/",
        "maskfl/v1/fleet-1/rounds",
        "maskfl/v1/fleet-1/round/07/sum/dev",
        "maskfl/v1/fleet-1/round/-1/sum/dev",
        "maskfl/v1/fleet-1/round/+/sum/dev",
        "maskfl/v1/fleet-1/round/18446744073709551616/sum/dev",
        "maskfl/v1/fleet-1/round/1/sum",
        "maskfl/v1/fleet-1/round/1/sum/dev/extra",
        "maskfl/v1/fleet-1/round/1/sum/+",
        "maskfl/v1/fleet-1/round/1/vote/dev",
        "maskfl/v1/fleet-1/round/1/seeds",
        "maskfl/v1/fleet-1/round/١/sums",
        "maskfl/v1/fleet-1/model/m/weights",
        "maskfl/v1/fleet-1/receipts",
        "maskfl/v1/fleet-1/status/a/b",
        "maskfl/v1/fleet-1/status/" + "x" * 65,
        "maskfl/v1/fleet-1/status/" + "x" * 600,
    ],
)
def test_bad_topics_are_malformed(topic: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_topic(topic)
    assert info.value.reason == Reason.MALFORMED


def test_topic_of_another_fleet() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        T.parse(Topics("fleet-2").round)
    assert info.value.reason == Reason.WRONG_FLEET


@settings(max_examples=300, deadline=None)
@given(
    topic=st.one_of(
        st.text(max_size=100),
        st.lists(
            st.one_of(st.sampled_from(["maskfl", "v1", "f", "round", "7", "sum", "d"]), st.text()),
            max_size=8,
        ).map("/".join),
    )
)
def test_random_topics_parse_or_are_malformed(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except RemoteProtocolError as exc:
        assert exc.reason == Reason.MALFORMED
    else:
        assert topic.startswith(f"maskfl/v1/{parsed.fleet}/")
