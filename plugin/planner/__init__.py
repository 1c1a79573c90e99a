"""Profile-driven planning: where to cut a model and which device runs each segment.

This package imports neither torch nor Flower, so a server can plan without
loading a model. Measuring needs torch: import `homesplit.planner.profile` for
layer profiles, `homesplit.planner.benchmark` for the device self-benchmark and
`homesplit.planner.linkprobe` for link bandwidth and latency.
"""

from __future__ import annotations

from homesplit.planner.discovery import devices_from_discovery, plan_from_discovery
from homesplit.planner.devices import HouseholdDevices, load_devices, parse_devices
from homesplit.planner.optimize import DEFAULT_MICROBATCH_CANDIDATES, brute_force, plan_household
from homesplit.planner.plan import OBJECTIVES, Plan, StagePlan
from homesplit.planner.profiles import (
    DEFAULT_LINK,
    DeviceProfile,
    LayerProfile,
    LinkProfile,
    LinkTable,
    ModelProfile,
)

__all__ = [
    "DEFAULT_LINK",
    "DEFAULT_MICROBATCH_CANDIDATES",
    "OBJECTIVES",
    "DeviceProfile",
    "HouseholdDevices",
    "LayerProfile",
    "LinkProfile",
    "LinkTable",
    "ModelProfile",
    "Plan",
    "StagePlan",
    "brute_force",
    "devices_from_discovery",
    "load_devices",
    "parse_devices",
    "plan_from_discovery",
    "plan_household",
]
