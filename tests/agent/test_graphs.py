"""The graph gate: a received model graph passes only under a matching signed digest."""

from __future__ import annotations

import collections
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.agent.graphs import COUNTER_KEY, MAX_HELD_GRAPHS, NOT_STATED, GraphGate
from maskfl.protocol.crypto import digest

GENUINE = b"genuine tflite bytes" * 10
FORGED = b"forged tflite bytes!" * 10


def gate(max_bytes: int = 1 << 20) -> tuple[GraphGate, collections.Counter[str]]:
    ignored: collections.Counter[str] = collections.Counter()
    return GraphGate(max_bytes, ignored), ignored


def test_a_graph_under_a_stated_digest_passes_only_if_it_matches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g, ignored = gate()
    assert g.state("m", digest(GENUINE), version=1) is None
    caplog.set_level(logging.INFO, logger="maskfl.agent")
    assert g.offer("m", FORGED) is None
    refusals = [r for r in caplog.records if "refused the model graph" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert ignored[COUNTER_KEY] == 1
    assert g.verified("m") is None
    assert g.offer("m", GENUINE) == GENUINE
    assert g.verified("m") == GENUINE
    assert ignored[COUNTER_KEY] == 1


def test_a_graph_before_its_digest_is_held_then_checked() -> None:
    g, ignored = gate()
    assert g.offer("m", FORGED) is None
    assert g.held("m") == FORGED and ignored[COUNTER_KEY] == 0
    # The statement refuses the held forgery; the genuine copy then passes.
    assert g.state("m", digest(GENUINE), version=1) is None
    assert g.held("m") is None and ignored[COUNTER_KEY] == 1
    assert g.offer("m", GENUINE) == GENUINE
    # Held first, then vouched for.
    g2, ignored2 = gate()
    assert g2.offer("m", GENUINE) is None
    assert g2.state("m", digest(GENUINE), version=1) == GENUINE
    assert g2.verified("m") == GENUINE and ignored2[COUNTER_KEY] == 0


def test_held_graphs_are_bounded() -> None:
    g, _ = gate()
    for i in range(MAX_HELD_GRAPHS + 2):
        g.offer(f"m{i}", GENUINE)
    assert g.held("m0") is None and g.held("m1") is None
    assert all(g.held(f"m{i}") == GENUINE for i in range(2, MAX_HELD_GRAPHS + 2))
    # A newer copy for the same id replaces the held one rather than adding to it.
    g.offer("m2", FORGED)
    assert g.held("m2") == FORGED and g.held("m3") == GENUINE


def test_an_oversize_graph_is_refused_without_holding_it() -> None:
    g, ignored = gate(max_bytes=100)
    assert g.offer("m", GENUINE) is None
    assert g.held("m") is None and ignored[COUNTER_KEY] == 1


def test_a_new_or_withdrawn_digest_forgets_the_old_graph() -> None:
    g, _ = gate()
    g.state("m", digest(GENUINE), version=1)
    assert g.offer("m", GENUINE) == GENUINE
    g.state("m", digest(FORGED), version=2)  # the coordinator moved to another graph
    assert g.verified("m") is None
    g.state("m", NOT_STATED, version=3)
    assert g.stated("m") is None
    assert g.offer("m", FORGED) is None  # no statement: held, not passed
    assert g.held("m") == FORGED


_events = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.sampled_from(["a", "b"]), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("state"), st.sampled_from(["a", "b"]), st.sampled_from([0, 1, 2, 3])),
    ),
    max_size=30,
)


@settings(max_examples=200)
@given(events=_events)
def test_only_graphs_matching_the_current_statement_ever_pass(
    events: list[tuple[str, str, int]],
) -> None:
    graphs = [GENUINE, FORGED, b"third"]
    digests = [digest(x) for x in graphs] + [NOT_STATED]
    g, _ = gate()
    for op, model_id, k in events:
        if op == "offer":
            out = g.offer(model_id, graphs[k])
        else:
            out = g.state(model_id, digests[k], version=0)
        stated = g.stated(model_id)
        if out is not None:
            assert stated is not None and digest(out) == stated
        for mid in ("a", "b"):
            verified = g.verified(mid)
            if verified is not None:
                assert digest(verified) == g.stated(mid)
