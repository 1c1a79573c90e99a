"""Which device of a household runs which segment, as plain data.

`plan_household` is the small interface between the Flower strategy and
whatever chooses the cuts. This version balances parameter counts with
`homesplit.partition.even_cuts`. `homesplit.profiled_plan.plan_household_profiled`
uses the profile-driven planner of `homesplit.planner` behind the same signature.
"""

from __future__ import annotations

import json
import logging
import reprlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from homesplit.errors import PlanError
from homesplit.json_limits import loads_limited
from homesplit.partition import candidate_cuts, even_cuts
from homesplit.planner.profiles import LinkProfile
from homesplit.schedule import SCHEDULES

__all__ = ["DeviceInfo", "HouseholdPlan", "StageAssignment", "data_owner", "plan_household"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What one device reported about itself during discovery.

    Parameters
    ----------
    household : str
        Household id.
    device : str
        Device name, unique in its household and equal to its certificate name.
    address : str
        Data-plane address (``HOST:PORT``) that its upstream neighbour dials.
    node_id : int
        Flower node id of the device's SuperNode.
    holds_data : bool
        True on the data owner, the device that holds the household's examples.
    num_examples : int
        Training examples on the device; 0 unless it holds data.
    memory_bytes : int
        Memory available for training, in bytes (0 when unknown).
    cpu_count : int
        Logical CPUs of the device.
    flops_per_second : float or None, default None
        Float32 matrix-multiply throughput of the device's self-benchmark, in
        FLOP/s; None when the device sent none (replies of older versions).
    idle_watts, busy_watts : float or None, default None
        Power draw while waiting and while computing, in watts, from the
        device's node config; None when not configured.
    measured_links : tuple of (str, LinkProfile), default ()
        Links from this device to peers of its household, measured over the
        household's link during discovery, as (peer device, link). Only the
        data owner measures links (`homesplit.link_probes`).
    """

    household: str
    device: str
    address: str
    node_id: int
    holds_data: bool = False
    num_examples: int = 0
    memory_bytes: int = 0
    cpu_count: int = 1
    flops_per_second: float | None = None
    idle_watts: float | None = None
    busy_watts: float | None = None
    measured_links: tuple[tuple[str, LinkProfile], ...] = ()


@dataclass(frozen=True)
class StageAssignment:
    """One stage of a household plan: the device that runs it and where to reach it."""

    stage: int
    device: str
    node_id: int
    address: str


@dataclass
class HouseholdPlan:
    """The plan of one household for one round.

    Parameters
    ----------
    household : str
        Household id.
    cuts : list of str
        Module names where segments start; ``len(cuts) + 1`` stages.
    stages : list of StageAssignment
        One per stage, stage 0 first; stage 0 is always the data owner.
    num_microbatches : int
        Micro-batches per mini-batch.
    schedule : str
        Pipeline schedule, a key of `homesplit.schedule.SCHEDULES`.
    num_examples : int
        Training examples of the household (those of its data owner).
    idle_devices : list of str
        Devices of the household that get no stage this round.
    """

    household: str
    cuts: list[str]
    stages: list[StageAssignment]
    num_microbatches: int
    schedule: str
    num_examples: int
    idle_devices: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    @property
    def devices(self) -> list[str]:
        """Device name per stage."""
        return [s.device for s in self.stages]

    def summary(self) -> dict[str, Any]:
        """Return the plan without addresses and node ids, as results.json records it.

        Keys: ``stages`` (device per stage, stage 0 first), ``cuts``,
        ``idle`` (devices without a stage), ``num_microbatches`` and ``schedule``.
        """
        return {
            "stages": self.devices,
            "cuts": list(self.cuts),
            "idle": list(self.idle_devices),
            "num_microbatches": self.num_microbatches,
            "schedule": self.schedule,
        }

    def to_json(self) -> str:
        """Serialise to JSON, the form that travels in a ConfigRecord."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HouseholdPlan:
        """Parse JSON written by `to_json`.

        Raises
        ------
        PlanError
            If `text` is not valid JSON, nests deeper than
            `homesplit.json_limits.MAX_JSON_DEPTH` levels, or is not a plan
            object with the keys that `to_json` writes.
        """
        try:
            raw = loads_limited(text)
        except ValueError as exc:
            raise PlanError(
                f"household plan is not valid JSON: {exc}; check that the server runs the same homesplit version as "
                "this device"
            ) from None
        stages = raw.get("stages") if isinstance(raw, dict) else None
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise PlanError(
                f"household plan {reprlib.repr(raw)} is invalid; allowed: a JSON object whose 'stages' is a list of objects"
            )
        try:
            return cls(**{**raw, "stages": [StageAssignment(**stage) for stage in stages]})
        except TypeError as exc:
            raise PlanError(
                f"household plan is invalid: {exc}; check that the server runs the same homesplit version as this device"
            ) from None


def data_owner(devices: Sequence[DeviceInfo]) -> DeviceInfo:
    """Return the household's data owner, the one device with ``holds_data``.

    Raises
    ------
    PlanError
        If no device or more than one holds data.
    """
    household = devices[0].household if devices else "?"
    owners = [d for d in devices if d.holds_data]
    if len(owners) != 1:
        raise PlanError(
            f"household {household} has {len(owners)} data owners ({[d.device for d in owners]}); "
            "set holds-data=true in the node config of exactly one of its devices"
        )
    return owners[0]


def plan_household(
    devices: Sequence[DeviceInfo],
    *,
    model: nn.Module,
    example_inputs: tuple,
    max_stages: int | None = None,
    num_microbatches: int = 4,
    schedule: str = "1f1b",
) -> HouseholdPlan:
    """Plan one household: cut `model` and give each segment to a device.

    The data owner runs stage 0, because it streams the examples; the other
    devices follow in order of reported memory, largest first, then by name.
    Cuts balance parameter counts (`even_cuts`).

    Parameters
    ----------
    devices : sequence of DeviceInfo
        The household's devices; exactly one must hold data.
    model : nn.Module
        The full model, best built on the ``meta`` device (no memory used).
    example_inputs : tuple
        Example inputs on the same device as `model`, batch dimension included.
    max_stages : int or None, default None
        Upper bound on stages; None means one stage per device. The model's
        number of candidate cuts plus one also bounds it.
    num_microbatches : int, default 4
        Micro-batches per mini-batch.
    schedule : str, default "1f1b"
        Pipeline schedule name.

    Raises
    ------
    PlanError
        If the household has no data owner or more than one, or the schedule
        is unknown.
    """
    if schedule not in SCHEDULES:
        raise PlanError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    owner = data_owner(devices)
    household = owner.household
    others = sorted((d for d in devices if d is not owner), key=lambda d: (-d.memory_bytes, d.device))

    limit = len(devices) if max_stages is None else min(max_stages, len(devices))
    limit = min(limit, len(candidate_cuts(model, example_inputs=example_inputs)) + 1)
    ordered = [owner, *others][:limit]
    cuts = even_cuts(model, len(ordered), example_inputs=example_inputs)
    stages = [StageAssignment(stage=k, device=d.device, node_id=d.node_id, address=d.address) for k, d in enumerate(ordered)]
    idle = [d.device for d in others[limit - 1 :]]
    if idle:
        logger.info("Household %s: %s stay idle, because the model has only %d stages", household, idle, limit)
    return HouseholdPlan(
        household=household,
        cuts=cuts,
        stages=stages,
        num_microbatches=num_microbatches,
        schedule=schedule,
        num_examples=owner.num_examples,
        idle_devices=idle,
    )
