"""A household plan as plain data: which device runs which layers, and the predicted costs.

A plan converts to and from JSON with `Plan.to_json` and `Plan.from_json`, so
the strategy can send it to every device in a Flower ConfigRecord.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import asdict, dataclass
from typing import Any

from homesplit.errors import PlanError
from homesplit.json_limits import loads_limited

__all__ = ["StagePlan", "Plan", "OBJECTIVES"]

OBJECTIVES = ("time", "energy")
"""Objectives the planner minimises: pipeline step time, or energy per sample."""


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a device and the consecutive units it holds.

    Parameters
    ----------
    index : int
        Stage index, from 0 (receives the input) to ``num_stages - 1`` (computes the loss).
    device : str
        Name of the device that runs the stage.
    layers : list of str
        Names of the units the stage holds, in model order.
    input_cut : str or None
        Cut the stage receives activations from, or None for stage 0.
    output_cut : str or None
        Cut the stage sends activations to, or None for the last stage.
    parameter_count : int
        Parameter elements the stage holds.
    memory_bytes : int
        Predicted peak memory: parameters, gradients, optimizer state and the
        activations the schedule keeps, in bytes.
    compute_seconds : float
        Predicted forward plus backward time of one micro-batch, in seconds.
    transfer_seconds : float
        Predicted time to send one micro-batch's activations to the next stage
        and receive their gradients back, in seconds; 0.0 for the last stage.
    runtime_seconds : float, default 0.0
        Predicted time the stage runtime spends on one micro-batch apart from
        compute (splitting, framing, link threads, Python), on this stage's
        device, in seconds.
    """

    index: int
    device: str
    layers: list[str]
    input_cut: str | None
    output_cut: str | None
    parameter_count: int
    memory_bytes: int
    compute_seconds: float
    transfer_seconds: float
    runtime_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the stage as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        """Build a stage from the output of `to_dict`."""
        return cls(**{**data, "layers": list(data["layers"])})


@dataclass(frozen=True)
class Plan:
    """Training plan of one household: the stages, micro-batching and predicted costs.

    Parameters
    ----------
    stages : list of StagePlan
        The stages in pipeline order.
    num_microbatches : int
        Micro-batches per mini-batch.
    microbatch_size : int
        Samples in the largest micro-batch: ``ceil(batch_size / num_microbatches)``.
    batch_size : int
        Samples per mini-batch, that is per optimizer step.
    schedule : {"gpipe", "1f1b"}
        Pipeline schedule the memory prediction assumes.
    objective : {"time", "energy"}
        What the planner minimised.
    optimizer : str
        Optimizer kind whose state the memory prediction includes.
    bottleneck_seconds : float
        The largest stage compute plus runtime, or link transfer, per
        micro-batch, in seconds.
    step_seconds : float
        Predicted time of one mini-batch: ``traversal_seconds +
        (num_microbatches - 1) * bottleneck_seconds``, in seconds.
    energy_joules_per_sample : float or None
        Predicted energy of the used devices per sample, in joules, or None
        when a used device has no power figures.
    idle_devices : list of str
        Devices that hold no stage and stay idle during training.
    stage_overhead_seconds : float, default 0.0
        Runtime seconds per micro-batch and stage on the reference device that
        the prediction assumes. Each stage's `runtime_seconds` is this figure
        divided by its device's speed. 0.0 when it was not measured.
    traversal_seconds : float or None, default None
        Sum of every stage's compute plus runtime and every link's transfer per
        micro-batch, in seconds: one micro-batch's way forward through the
        pipeline and back. None in plans written before the step time counted it.
    """

    stages: list[StagePlan]
    num_microbatches: int
    microbatch_size: int
    batch_size: int
    schedule: str
    objective: str
    optimizer: str
    bottleneck_seconds: float
    step_seconds: float
    energy_joules_per_sample: float | None
    idle_devices: list[str]
    stage_overhead_seconds: float = 0.0
    traversal_seconds: float | None = None

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    @property
    def devices(self) -> list[str]:
        """Device names in stage order."""
        return [stage.device for stage in self.stages]

    @property
    def cuts(self) -> list[str]:
        """Cut names between consecutive stages, in the form `split_model` takes."""
        return [stage.output_cut for stage in self.stages[:-1] if stage.output_cut is not None]

    def objective_value(self) -> float:
        """Return the value of `objective`: step seconds or joules per sample."""
        if self.objective != "energy":
            return self.step_seconds
        if self.energy_joules_per_sample is None:
            raise PlanError("the plan minimises energy but has no energy prediction; plan it again")
        return self.energy_joules_per_sample

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-compatible dict."""
        data = asdict(self)
        data["stages"] = [stage.to_dict() for stage in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Build a plan from the output of `to_dict`."""
        return cls(
            **{
                **data,
                "stages": [StagePlan.from_dict(stage) for stage in data["stages"]],
                "idle_devices": list(data["idle_devices"]),
            }
        )

    def to_json(self) -> str:
        """Return the plan as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Build a plan from the output of `to_json`.

        Raises
        ------
        PlanError
            If `text` is not valid JSON, nests deeper than
            `homesplit.json_limits.MAX_JSON_DEPTH` levels, or is not a plan
            object with the keys that `to_json` writes.
        """
        try:
            data = loads_limited(text)
        except ValueError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}; plan it again") from None
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise PlanError(f"plan {reprlib.repr(data)} is invalid; allowed: a JSON object whose 'stages' is a list of objects")
        try:
            return cls.from_dict(data)
        except KeyError as exc:
            raise PlanError(f"plan is missing key {exc.args[0]!r}; plan it again with this homesplit version") from None
        except TypeError as exc:
            raise PlanError(f"plan is invalid: {exc}; plan it again with this homesplit version") from None
