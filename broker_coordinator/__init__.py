"""maskfl.broker_coordinator: the coordinator, one asyncio service that runs PET rounds.

It publishes each round's parameters over MQTT, admits signed participant
messages, aggregates the masked updates (:mod:`maskfl.aggregator_gpu`), unmasks
the sum, applies the server optimizer and publishes the signed global model.

Modules: :mod:`.config` (coordinator.toml, the source of truth for its keys),
:mod:`.service` (start-up checks, wiring and supervision), :mod:`.runner` and
:mod:`.phases` (the round as a phase state machine, one module per phase),
:mod:`.context` (what the phases share), :mod:`.ingest` (MQTT deliveries to
admitted messages, receipts), :mod:`.enrollment` (certificates and the revocation
list), :mod:`.committer` (group commit: aggregate checkpoint + SQLite, then acks),
:mod:`.store` (SQLite and checkpoint files), :mod:`.outbox` (everything published),
:mod:`.optimizers` (FedAvg, FedAvgM, FedAdam), :mod:`.errors`, :mod:`.logs`,
:mod:`.metrics` and :mod:`.http` (operations), :mod:`.cli` (``maskfl-coordinator``).
Provisioning (CA, bundles, broker ACL) lives in :mod:`.provision`.

The public API is :class:`Coordinator`, :class:`CoordinatorConfig` and
:func:`load_config`, imported lazily so that ``maskfl.broker_coordinator.provision``
does not load the service (aiosqlite, prometheus, the transport).
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
