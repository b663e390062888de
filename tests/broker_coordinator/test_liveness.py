"""Liveness from status topics: alive, gone, expiry, bounds, and what is not a heartbeat."""

from __future__ import annotations

import pytest

from maskfl.broker_coordinator.liveness import MAX_HEARTBEAT_BYTES, Liveness
from maskfl.transport import Message

PREFIX = "maskfl/v1/f/status/"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_devices: int = 100, window_s: float = 60.0) -> tuple[Liveness, Clock]:
    clock = Clock()
    return Liveness(PREFIX, window_s=window_s, max_devices=max_devices, clock=clock), clock


def beat(live: Liveness, device: str, payload: bytes = b"hb") -> None:
    live.on_status(Message(PREFIX + device, payload))


def test_any_payload_on_a_device_status_topic_means_alive_and_empty_means_gone() -> None:
    live, clock = make()
    beat(live, "dev-1", b"\x00 not even a maskfl message")
    beat(live, "dev-2")
    assert live.count(clock()) == 2
    beat(live, "dev-1", b"")  # last will / goodbye
    assert "dev-1" not in live and live.count(clock()) == 1
    assert live.counts == {"alive": 2, "gone": 1}


def test_devices_expire_after_the_window_and_a_beat_renews_them() -> None:
    live, clock = make(window_s=60)
    beat(live, "a")
    clock.now += 40
    beat(live, "b")
    clock.now += 30  # a: 70 s old, b: 30 s
    assert live.count(clock()) == 1 and "b" in live and "a" not in live
    beat(live, "b")
    clock.now += 59
    assert live.count(clock()) == 1
    clock.now += 2
    assert live.count(clock()) == 0


@pytest.mark.parametrize(
    ("topic_tail", "payload", "outcome"),
    [
        ("dev/extra", b"hb", "malformed"),
        ("", b"hb", "malformed"),
        ("d" * 65, b"hb", "malformed"),
        ("dev-1", bytes(MAX_HEARTBEAT_BYTES + 1), "oversize"),
    ],
)
def test_what_is_not_a_heartbeat_is_counted_and_changes_nothing(
    topic_tail: str, payload: bytes, outcome: str
) -> None:
    live, clock = make()
    beat(live, topic_tail, payload)
    assert live.count(clock()) == 0
    assert live.counts == {outcome: 1}


def test_a_full_table_refuses_new_devices_without_evicting_live_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live, clock = make(max_devices=3, window_s=60)
    for d in ("a", "b", "c"):
        beat(live, d)
    beat(live, "d")
    beat(live, "e")
    assert live.count(clock()) == 3 and "d" not in live
    assert live.counts["fleet_full"] == 2
    assert sum("fleet.max_devices" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    beat(live, "a")  # known devices still renew
    assert live.counts["alive"] == 4
    clock.now += 61  # all expired: room again
    beat(live, "d")
    assert "d" in live and live.count(clock()) == 1


def test_round_messages_count_as_signs_of_life_too() -> None:
    live, clock = make()
    assert live.seen("dev-9", clock())
    assert live.count(clock()) == 1


def test_the_window_does_not_run_while_paused() -> None:
    """Two pauses inside one window: a device expires after window_s of listening time."""
    live, clock = make(window_s=60)
    beat(live, "a")
    clock.now += 20  # listened 20
    live.pause(clock())
    clock.now += 500
    assert live.count(clock()) == 1  # paused: the window stands still
    assert live.resume(clock()) == 500
    clock.now += 30  # listened 50
    live.pause(clock())
    clock.now += 100
    live.resume(clock())
    beat(live, "b")
    clock.now += 9.5  # listened 59.5
    assert live.count(clock()) == 2
    clock.now += 1  # listened 60.5 since a; b was heard 10.5 s ago
    assert live.count(clock()) == 1 and "a" not in live and "b" in live
    assert live.horizon(clock()) == clock() - 60 - 100 - 500  # the pauses added
