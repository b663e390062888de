"""The maskfl coordinator: one asyncio service that runs PET rounds over MQTT.

Layout: :mod:`.config` (coordinator.toml), :mod:`.service` (wiring and
supervision), :mod:`.runner` and :mod:`.phases` (the round as a phase state
machine), :mod:`.ingest` (MQTT deliveries to admitted messages, receipts),
:mod:`.committer` (group commit: aggregate checkpoint + SQLite, then acks),
:mod:`.store` (SQLite and checkpoint files), :mod:`.metrics` and :mod:`.http`
(operations), :mod:`.cli` (``maskfl-coordinator``). Provisioning lives in
:mod:`.provision`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskfl.broker_coordinator.config import CoordinatorConfig, load_config
    from maskfl.broker_coordinator.service import Coordinator

__all__ = ["Coordinator", "CoordinatorConfig", "load_config"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing maskfl.broker_coordinator.provision does not load the
    # service (aiosqlite, prometheus, the transport).
    if name == "Coordinator":
        from maskfl.broker_coordinator.service import Coordinator

        return Coordinator
    if name in ("CoordinatorConfig", "load_config"):
        from maskfl.broker_coordinator import config

        return getattr(config, name)
    raise AttributeError(name)
