"""Profile-driven planning: where to cut a model and which device runs each segment.

This package imports neither torch nor Flower, so a server can plan without
loading a model. Measuring needs torch: import `homesplit.planner.profile` for
layer profiles and `homesplit.planner.benchmark` for the device self-benchmark.
"""

from __future__ import annotations

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
    "load_devices",
    "parse_devices",
    "plan_household",
]
