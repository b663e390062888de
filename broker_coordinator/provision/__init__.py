"""Provisioning of a maskfl fleet (``maskfl-provision``): CAs, bundles, broker config.

The operator runs this on an offline machine that holds the fleet CA. See
docs/operations.md for the workflow and :mod:`._fleet` for the directory layout.
"""

from __future__ import annotations

from maskfl.broker_coordinator.provision._broker import (
    COORDINATOR_USER,
    BrokerFiles,
    device_rules,
    observer_rules,
    render_acl,
    render_mosquitto_conf,
)
from maskfl.broker_coordinator.provision._fleet import AddOutcome, Fleet
from maskfl.broker_coordinator.provision._issue import Keys
from maskfl.broker_coordinator.provision._registry import (
    Layout,
    Registry,
    Status,
    numbered_device_ids,
)
from maskfl.broker_coordinator.provision._settings import (
    BrokerSettings,
    CoordinatorSettings,
    FleetSettings,
    ValiditySettings,
)
from maskfl.broker_coordinator.provision.errors import ProvisionError

__all__ = [
    "COORDINATOR_USER",
    "AddOutcome",
    "BrokerFiles",
    "BrokerSettings",
    "CoordinatorSettings",
    "Fleet",
    "FleetSettings",
    "Keys",
    "Layout",
    "ProvisionError",
    "Registry",
    "Status",
    "ValiditySettings",
    "device_rules",
    "numbered_device_ids",
    "observer_rules",
    "render_acl",
    "render_mosquitto_conf",
]
