"""The planner's cost model: predicted compute, transfer, memory, step time and energy.

A candidate plan assigns consecutive units ``[bounds[s], bounds[s + 1])`` to
device ``devices[s]`` for every stage ``s`` of ``S`` stages, and splits a
mini-batch of ``B`` samples into ``M`` micro-batches of at most
``b = ceil(B / M)`` samples. With ``t(b)`` a unit's forward plus backward
seconds per sample on the reference device, measured at micro-batches of ``b``
samples (`LayerProfile.seconds_per_sample_at`):

- compute of stage ``s`` per micro-batch: ``b * sum(t(b)) / speed``;
- runtime of stage ``s`` per micro-batch: ``r / speed``, with ``r`` the
  reference seconds that the stage runtime spends on one micro-batch apart
  from the model (splitting, framing, link threads, Python). It runs on the
  stage's device, so it slows down with the device like compute does;
- transfer across the cut after stage ``s`` per micro-batch: the activation
  goes downstream and its gradient of the same size comes back, one after the
  other, each taking ``latency + b * bytes_per_sample / bandwidth``. Sending
  both directions in turn models a half-duplex link such as Wi-Fi;
- bottleneck: the largest stage compute plus runtime, or transfer, per micro-batch;
- traversal: the sum of every stage's compute plus runtime and every link's
  transfer per micro-batch, the time one micro-batch takes forward through
  the pipeline and backward again;
- step time: ``traversal + (M - 1) * bottleneck``. The first micro-batch
  crosses every stage and link once, and each later one finishes one
  bottleneck period after the one before it, as in 1F1B's steady state. Fill
  and drain are done by every stage at its own speed, so the step is shorter
  than ``(M + S - 1) * bottleneck`` when the stages and links differ;
- busy time of stage ``s`` per step: ``(B * sum(t(b)) + m * r) / speed``, with
  ``m = ceil(B / b)`` the micro-batches that actually run. The rest of the
  step, ``step - busy``, is that device's bubble;
- energy per sample: ``sum over used devices of (busy_watts * busy + idle_watts
  * (step - busy)) / B``. Devices without a stage are left idle and not counted.
  Transfers cost no energy beyond the idle power of the devices waiting on them;
- memory of stage ``s``: parameters, gradients and optimizer state of its units,
  plus ``kept * b * sum(activation bytes per sample)``, where GPipe keeps all
  ``M`` micro-batches and 1F1B keeps at most ``min(S - s, M)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from homesplit.errors import ConfigError
from homesplit.planner.plan import OBJECTIVES, Plan, StagePlan
from homesplit.planner.profiles import DeviceProfile, LayerProfile, LinkTable
from homesplit.schedule import SCHEDULES

__all__ = ["CostModel", "StepCost", "check_objective"]


# Parameter-sized temporaries of one optimizer step; unknown kinds count as Adam.
_STEP_TEMPORARIES = {"sgd": 0, "sgd_momentum": 0, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class StepCost:
    """Cost of one mini-batch under a candidate plan.

    Parameters
    ----------
    bottleneck_seconds : float
        Largest stage compute plus runtime, or link transfer, per micro-batch,
        in seconds.
    traversal_seconds : float
        Sum of every stage's compute plus runtime and every link's transfer per
        micro-batch, in seconds: one micro-batch's way through the pipeline.
    step_seconds : float
        Predicted time of one mini-batch, in seconds.
    energy_joules_per_sample : float or None
        Predicted energy of the used devices per sample, in joules, or None if
        a used device has no power figures.
    """

    bottleneck_seconds: float
    traversal_seconds: float
    step_seconds: float
    energy_joules_per_sample: float | None


class CostModel:
    """Predicted costs of running consecutive units on household devices.

    Parameters
    ----------
    layers : sequence of LayerProfile
        Units of the model in order; at least one.
    devices : sequence of DeviceProfile
        Devices of the household, with unique names.
    links : LinkTable
        Links between the devices.
    batch_size : int
        Samples per mini-batch.
    schedule : {"gpipe", "1f1b"}
        Pipeline schedule, which sets how many micro-batches of activations a
        stage keeps.
    optimizer : str
        Optimizer kind whose state counts towards memory; every layer profile
        must list it.
    stage_overhead_seconds : float, default 0.0
        Seconds the stage runtime spends per micro-batch and stage on the
        reference device, apart from the model's compute (`ModelProfile`'s
        figure from `measure_stage_overhead`). A device of speed ``v`` spends
        ``stage_overhead_seconds / v``. 0.0 leaves the runtime out.

    Raises
    ------
    ConfigError
        If a count, name, the schedule or the overhead is invalid, or a layer
        profile lacks the optimizer.
    """

    def __init__(
        self,
        layers: Sequence[LayerProfile],
        devices: Sequence[DeviceProfile],
        links: LinkTable,
        *,
        batch_size: int,
        schedule: str,
        optimizer: str,
        stage_overhead_seconds: float = 0.0,
    ) -> None:
        _check_inputs(layers, devices, batch_size=batch_size, schedule=schedule)
        if not (isinstance(stage_overhead_seconds, (int, float)) and 0 <= stage_overhead_seconds < math.inf):
            raise ConfigError(
                f"stage_overhead_seconds={stage_overhead_seconds!r} must be a finite number of seconds >= 0"
            )
        self.layers = list(layers)
        self.devices = list(devices)
        self.links = links
        self.batch_size = batch_size
        self.schedule = schedule
        self.optimizer = optimizer
        self.stage_overhead_seconds = float(stage_overhead_seconds)

        # Prefix sums make every segment's cost O(1); the seconds per sample
        # depend on the micro-batch size, so their sums are built per size.
        self._seconds: dict[int, list[float]] = {}
        self._activation = [0, *accumulate(layer.activation_bytes_per_sample for layer in layers)]
        self._static = [0, *accumulate(layer.static_bytes(optimizer) for layer in layers)]
        self._parameters = [0, *accumulate(layer.parameter_count for layer in layers)]
        # _largest[start][stop - start - 1]: the largest trainable parameter of units [start, stop).
        self._largest = [list(accumulate((layer.largest_gradient_bytes for layer in layers[start:]), max)) for start in range(len(layers))]

    def microbatch_size(self, num_microbatches: int) -> int:
        """Return the samples in the largest micro-batch."""
        return math.ceil(self.batch_size / num_microbatches)

    def kept_microbatches(self, *, stages_from_end: int, num_microbatches: int) -> int:
        """Return how many micro-batches of activations a stage keeps at its peak.

        `stages_from_end` is ``S - s`` for stage ``s`` of ``S``: 1 for the last stage.
        """
        if self.schedule == "gpipe":
            return num_microbatches
        return min(stages_from_end, num_microbatches)

    def unit_seconds(self, index: int, *, microbatch_size: int) -> float:
        """Return unit `index`'s reference seconds per sample at micro-batches of `microbatch_size`."""
        return self._prefix_seconds(microbatch_size)[index + 1] - self._prefix_seconds(microbatch_size)[index]

    def compute_seconds(self, start: int, stop: int, device: DeviceProfile, *, microbatch_size: int) -> float:
        """Return forward plus backward seconds of units ``[start, stop)`` for one micro-batch."""
        seconds = self._prefix_seconds(microbatch_size)
        return microbatch_size * (seconds[stop] - seconds[start]) / device.speed

    def runtime_seconds(self, device: DeviceProfile) -> float:
        """Return the seconds the stage runtime spends on `device` per micro-batch, apart from compute."""
        return self.stage_overhead_seconds / device.speed

    def stage_seconds(self, start: int, stop: int, device: DeviceProfile, *, microbatch_size: int) -> float:
        """Return compute plus runtime seconds of a stage that runs units ``[start, stop)``, per micro-batch."""
        return self.compute_seconds(start, stop, device, microbatch_size=microbatch_size) + self.runtime_seconds(device)

    def busy_seconds(self, start: int, stop: int, device: DeviceProfile, *, num_microbatches: int) -> float:
        """Return the seconds `device` works on units ``[start, stop)`` in one mini-batch.

        That is the compute of every sample plus the runtime of every
        micro-batch that runs: ``ceil(B / ceil(B / M))``, which is below ``M``
        when ``M`` does not divide ``B`` evenly enough.
        """
        size = self.microbatch_size(num_microbatches)
        count = math.ceil(self.batch_size / size)
        seconds = self._prefix_seconds(size)
        compute = self.batch_size * (seconds[stop] - seconds[start])
        return (compute + count * self.stage_overhead_seconds) / device.speed

    def step_seconds(self, *, bottleneck_seconds: float, traversal_seconds: float, num_microbatches: int) -> float:
        """Return the step time ``traversal + (M - 1) * bottleneck``, in seconds."""
        return traversal_seconds + (num_microbatches - 1) * bottleneck_seconds

    def memory_bytes(self, start: int, stop: int, *, kept_microbatches: int, microbatch_size: int) -> int:
        """Return the peak memory of a stage that runs units ``[start, stop)``, in bytes."""
        static = self._static[stop] - self._static[start]
        activations = kept_microbatches * microbatch_size * (self._activation[stop] - self._activation[start])
        # Temporaries the size of the largest parameter. Backward adds each
        # micro-batch's new gradient to the stored one, so one temporary exists
        # while activations are kept. torch.optim.Adam's step (torch 2.13, one
        # CPU tensor at a time) keeps sqrt(v) and its quotient, so two exist
        # after the backward passes. SGD steps in place.
        largest = self._largest[start][stop - start - 1] if stop > start else 0
        step = _STEP_TEMPORARIES.get(self.optimizer, 2) * largest
        return static + max(activations + largest, step)

    def transfer_seconds(
        self, boundary: int, source: DeviceProfile, target: DeviceProfile, *, microbatch_size: int
    ) -> float:
        """Return seconds to send one micro-batch across the cut before unit `boundary` and its gradient back."""
        num_bytes = microbatch_size * self.layers[boundary - 1].output_bytes_per_sample
        forward = self.links.between(source.name, target.name).transfer_seconds(num_bytes)
        backward = self.links.between(target.name, source.name).transfer_seconds(num_bytes)
        return forward + backward

    def parameter_count(self, start: int, stop: int) -> int:
        """Return the parameter elements of units ``[start, stop)``."""
        return self._parameters[stop] - self._parameters[start]

    def fits(self, bounds: Sequence[int], devices: Sequence[DeviceProfile], *, num_microbatches: int) -> bool:
        """Return whether every stage of a candidate plan fits its device's memory."""
        size = self.microbatch_size(num_microbatches)
        for s, device in enumerate(devices):
            kept_count = self.kept_microbatches(stages_from_end=len(devices) - s, num_microbatches=num_microbatches)
            memory = self.memory_bytes(bounds[s], bounds[s + 1], kept_microbatches=kept_count, microbatch_size=size)
            if memory > device.memory_bytes:
                return False
        return True

    def step_cost(self, bounds: Sequence[int], devices: Sequence[DeviceProfile], *, num_microbatches: int) -> StepCost:
        """Return the predicted step time and energy of a candidate plan, ignoring memory.

        `bounds` has ``S + 1`` entries from 0 to the number of units, and
        `devices` has ``S``.
        """
        size = self.microbatch_size(num_microbatches)
        bottleneck = traversal = 0.0
        for s, device in enumerate(devices):
            stage = self.stage_seconds(bounds[s], bounds[s + 1], device, microbatch_size=size)
            bottleneck, traversal = max(bottleneck, stage), traversal + stage
            if s + 1 < len(devices):
                transfer = self.transfer_seconds(bounds[s + 1], device, devices[s + 1], microbatch_size=size)
                bottleneck, traversal = max(bottleneck, transfer), traversal + transfer
        step = self.step_seconds(
            bottleneck_seconds=bottleneck, traversal_seconds=traversal, num_microbatches=num_microbatches
        )

        energy = None
        if all(device.has_power for device in devices):
            joules = 0.0
            for s, device in enumerate(devices):
                busy = self.busy_seconds(bounds[s], bounds[s + 1], device, num_microbatches=num_microbatches)
                joules += device.busy_watts * busy + device.idle_watts * (step - busy)
            energy = joules / self.batch_size
        return StepCost(
            bottleneck_seconds=bottleneck, traversal_seconds=traversal, step_seconds=step, energy_joules_per_sample=energy
        )

    def _prefix_seconds(self, microbatch_size: int) -> list[float]:
        """Return the prefix sums of the units' seconds per sample at `microbatch_size`."""
        if microbatch_size not in self._seconds:
            per_sample = (layer.seconds_per_sample_at(microbatch_size) for layer in self.layers)
            self._seconds[microbatch_size] = [0.0, *accumulate(per_sample)]
        return self._seconds[microbatch_size]

    def build_plan(
        self, bounds: Sequence[int], devices: Sequence[DeviceProfile], *, num_microbatches: int, objective: str
    ) -> Plan:
        """Return the plan that runs units ``[bounds[s], bounds[s + 1])`` on ``devices[s]``."""
        size = self.microbatch_size(num_microbatches)
        cost = self.step_cost(bounds, devices, num_microbatches=num_microbatches)
        stages = []
        for s, device in enumerate(devices):
            start, stop = bounds[s], bounds[s + 1]
            kept_count = self.kept_microbatches(stages_from_end=len(devices) - s, num_microbatches=num_microbatches)
            last = s + 1 == len(devices)
            transfer = 0.0 if last else self.transfer_seconds(stop, device, devices[s + 1], microbatch_size=size)
            stages.append(
                StagePlan(
                    index=s,
                    device=device.name,
                    layers=[layer.name for layer in self.layers[start:stop]],
                    input_cut=None if s == 0 else self.layers[start - 1].cut,
                    output_cut=None if last else self.layers[stop - 1].cut,
                    parameter_count=self.parameter_count(start, stop),
                    memory_bytes=self.memory_bytes(start, stop, kept_microbatches=kept_count, microbatch_size=size),
                    compute_seconds=self.compute_seconds(start, stop, device, microbatch_size=size),
                    runtime_seconds=self.runtime_seconds(device),
                    transfer_seconds=transfer,
                )
            )
        used = {device.name for device in devices}
        return Plan(
            stages=stages,
            num_microbatches=num_microbatches,
            microbatch_size=size,
            batch_size=self.batch_size,
            schedule=self.schedule,
            objective=objective,
            optimizer=self.optimizer,
            stage_overhead_seconds=self.stage_overhead_seconds,
            bottleneck_seconds=cost.bottleneck_seconds,
            traversal_seconds=cost.traversal_seconds,
            step_seconds=cost.step_seconds,
            energy_joules_per_sample=cost.energy_joules_per_sample,
            idle_devices=[device.name for device in self.devices if device.name not in used],
        )


def _check_inputs(
    layers: Sequence[LayerProfile], devices: Sequence[DeviceProfile], *, batch_size: int, schedule: str
) -> None:
    if not layers:
        raise ConfigError("the model profile has no units; profile the model with at least one unit")
    if not devices:
        raise ConfigError("the household has no devices; list at least one device")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    for kind, names in (("unit", [layer.name for layer in layers]), ("device", [device.name for device in devices])):
        seen = set()
        for name in names:
            if name in seen:
                raise ConfigError(f"{kind} name {name!r} appears twice; names must be unique")
            seen.add(name)
    for layer in layers[:-1]:
        if layer.cut is None:
            raise ConfigError(f"unit {layer.name!r} has no cut after it but is not the last unit")


def check_objective(objective: str, devices: Sequence[DeviceProfile]) -> None:
    """Raise ConfigError if `objective` is unknown or needs power figures that a device lacks."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if objective == "energy":
        missing = [device.name for device in devices if not device.has_power]
        if missing:
            raise ConfigError(
                f"objective='energy' needs idle_watts and busy_watts on every device; missing on {', '.join(missing)}"
            )
