"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.testing.broker import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain anonymous broker on a free loopback port, stopped after the test."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()
