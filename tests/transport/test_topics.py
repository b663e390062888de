"""Topic validation and wildcard matching, checked against paho's matcher as an oracle."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from maskfl.protocol.errors import LocalProtocolError
from maskfl.transport import check_filter, check_topic, topic_matches

LEVEL = st.sampled_from(["a", "b", "round", "7", "", "dev-1", "$SYS"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=400)
@given(filters(), TOPIC)
def test_matches_like_paho(topic_filter: str, topic: str) -> None:
    assume(topic_filter != "")
    check_filter(topic_filter)
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


@settings(max_examples=200)
@given(TOPIC)
def test_a_topic_matches_itself_and_its_wildcard_forms(topic: str) -> None:
    levels = topic.split("/")
    assert topic_matches(topic, topic)
    dollar = topic.startswith("$")
    assert topic_matches("#", topic) is not dollar
    assert topic_matches("/".join(["+"] * len(levels)), topic) is not dollar
    assert topic_matches(f"$share/g/{topic}", topic)
    if len(levels) > 1:
        # a/# matches a itself and everything below it
        assert topic_matches(f"{levels[0]}/#", topic)
        assert topic_matches(f"{levels[0]}/#", levels[0])
        assert not topic_matches(levels[0], topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("maskfl/v1/f/round/+/sum/+", "maskfl/v1/f/round/7/sum/dev-1", True),
        ("maskfl/v1/f/round/+/sum/+", "maskfl/v1/f/round/7/sum", False),
        ("maskfl/v1/f/#", "maskfl/v1/f", True),
        ("+", "/a", False),
        ("+/+", "/a", True),
        ("#", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("$share/workers/jobs/#", "jobs/1", True),
    ],
)
def test_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a", "$share/g", "$share//a", "x\x00"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "x\x00", "a" * 70_000])
def test_bad_topics_are_refused(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_topic(bad)
