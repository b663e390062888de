"""Identifier types shared by every package."""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

__all__ = ["DeviceId", "FleetId", "Role", "RoundId"]

RoundId = NewType("RoundId", int)
DeviceId = NewType("DeviceId", str)
FleetId = NewType("FleetId", str)


class Role(StrEnum):
    """What an enrollment certificate allows its holder to be."""

    DEVICE = "device"
    COORDINATOR = "coordinator"
