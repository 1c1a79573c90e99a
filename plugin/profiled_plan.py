"""A household plan from the profile-driven planner, behind `plan_household`'s signature.

`plan_household_profiled` profiles the model once on this machine (the
reference device). It turns the devices' discovery reports and the links
that the data owner measured into planner inputs, and lets
`homesplit.planner.plan_from_discovery` choose the cuts, the device order
and the micro-batch count. Devices that sent no speed figure make it
fall back to the parameter-balanced `homesplit.household_plan.plan_household`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from homesplit.errors import PlanError
from homesplit.household_plan import DeviceInfo, HouseholdPlan, StageAssignment, data_owner, plan_household
from homesplit.partition import candidate_cuts, flatten_value
from homesplit.planner.discovery import plan_from_discovery
from homesplit.planner.plan import OBJECTIVES, Plan
from homesplit.planner.profile import model_signature, profile_model
from homesplit.planner.profiles import DEFAULT_LINK, LinkProfile, LinkTable, ModelProfile
from homesplit.schedule import SCHEDULES

__all__ = ["plan_household_profiled", "household_profile", "household_links"]

logger = logging.getLogger(__name__)

# Profiles by model signature, so that a server process profiles each model and batch shape once.
_PROFILES: dict[str, ModelProfile] = {}


def plan_household_profiled(
    devices: Sequence[DeviceInfo],
    *,
    model: nn.Module,
    example_inputs: tuple,
    max_stages: int | None = None,
    num_microbatches: int = 4,
    schedule: str = "1f1b",
    objective: str = "time",
    batch_size: int = 32,
    model_fn: Callable[[], nn.Module] | None = None,
    optimizer: str = "adam",
    runtime_bytes: int = 0,
    cache_path: str | Path | None = None,
) -> HouseholdPlan:
    """Plan one household with the profile-driven planner.

    The data owner runs stage 0. The planner picks the cuts, which other
    devices run a stage and in what order, and the micro-batch count.
    Devices that would not lower the objective stay idle.

    Parameters
    ----------
    devices : sequence of DeviceInfo
        The household's devices; exactly one must hold data.
    model : nn.Module
        The full model, on the ``meta`` device or with real weights.
    example_inputs : tuple
        Example inputs on the same device as `model`, batch dimension first.
        Only their shapes and dtypes are used: the profile runs on a batch of
        `batch_size` synthetic inputs.
    max_stages : int or None, default None
        Upper bound on stages; None means one stage per device at most.
    num_microbatches : int, default 4
        Used only by the parameter-balanced fallback; otherwise the planner
        chooses the count.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
        Pipeline schedule, which sets the activation memory of each stage.
    objective : {"time", "energy"}, default "time"
        What the planner minimises. "energy" needs ``idle_watts`` and
        ``busy_watts`` on every device; without them the plan minimises time
        and a WARNING names the devices.
    batch_size : int, default 32
        Samples per mini-batch, as the data owner's train config sets it.
    model_fn : callable or None, default None
        Builds the full model with real weights on the CPU, for profiling.
        None profiles `model` itself, which then must not be on ``meta``.
    optimizer : str, default "adam"
        Optimizer kind whose state counts towards memory: "sgd",
        "sgd_momentum", "adam" or "adamw".
    runtime_bytes : int, default 0
        Memory of the Python and PyTorch runtime of one stage process, in
        bytes, taken off each device's ``memory_bytes``.
    cache_path : str or Path or None, default None
        JSON file of `profile_model`'s profile cache, read before profiling
        and written after; profiles are kept in memory either way.

    Returns
    -------
    HouseholdPlan
        The plan, with stage 0 on the data owner.

    Raises
    ------
    PlanError
        If the household has no data owner or more than one, an option is
        invalid, no plan fits the devices' memory, or the model is on ``meta``
        and `model_fn` is None.
    ConfigError
        If a device's report is invalid, for example negative watts.
    """
    if schedule not in SCHEDULES:
        raise PlanError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if objective not in OBJECTIVES:
        raise PlanError(f"objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if batch_size < 1:
        raise PlanError(f"batch_size={batch_size} must be at least 1")
    if max_stages is not None and max_stages < 1:
        raise PlanError(f"max_stages={max_stages} must be at least 1, or None for one stage per device")
    owner = data_owner(devices)

    unmeasured = [d.device for d in devices if d.flops_per_second is None or d.memory_bytes <= 0]
    if unmeasured:
        logger.info(
            "Household %s: devices %s sent no speed or memory figure; using the parameter-balanced plan",
            owner.household, unmeasured,
        )  # fmt: skip
        return plan_household(
            devices,
            model=model,
            example_inputs=example_inputs,
            max_stages=max_stages,
            num_microbatches=num_microbatches,
            schedule=schedule,
        )
    if objective == "energy":
        objective = _energy_or_time(devices)

    profile = household_profile(model, example_inputs, batch_size=batch_size, model_fn=model_fn, cache_path=cache_path)
    plan, unused = _best_plan(
        profile,
        devices,
        owner,
        household_links(devices, owner),
        max_stages=max_stages,
        batch_size=batch_size,
        objective=objective,
        schedule=schedule,
        optimizer=optimizer,
        runtime_bytes=runtime_bytes,
    )
    return _household_plan(plan, devices, owner, schedule=schedule, unused=unused)


def household_profile(
    model: nn.Module,
    example_inputs: tuple,
    *,
    batch_size: int,
    model_fn: Callable[[], nn.Module] | None = None,
    cache_path: str | Path | None = None,
) -> ModelProfile:
    """Return the layer profile of `model` on a batch of `batch_size`, measuring it on first use.

    The model is profiled in training mode with one torch thread, as stage
    processes run by default. Unless `cache_path` contains a profile with the
    stage runtime's cost per micro-batch, the first call for a model
    signature (structure, cuts, input shapes and dtypes) also measures that
    cost with `measure_stage_overhead`. That runs two stage processes on
    loopback for some seconds. Later calls with the same signature
    return the profile kept in memory. Parameters are those of
    `plan_household_profiled`.
    """
    on_meta = any(p.is_meta for p in model.parameters())
    inputs = _profiling_inputs(example_inputs, batch_size, device="meta" if on_meta else "cpu")
    cuts = candidate_cuts(model, example_inputs=inputs)
    signature = model_signature(model, inputs, cuts)
    if signature in _PROFILES:
        return _PROFILES[signature]

    if not on_meta:
        real_model = model
    elif model_fn is None:
        raise PlanError("the model is on the meta device; pass model_fn so the planner can profile it with real weights")
    else:
        with torch.device("cpu"):
            real_model = model_fn()
    real_model.train()

    # Stage processes run with one torch thread unless the node config sets threads.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile = profile_model(
            real_model,
            _profiling_inputs(example_inputs, batch_size, device="cpu"),
            cuts,
            cache_path=cache_path,
            measure_overhead=True,
        )
    finally:
        torch.set_num_threads(previous_threads)
    _PROFILES[signature] = profile
    return profile


def _profiling_inputs(example_inputs: tuple, batch_size: int, *, device: str) -> tuple:
    """Build inputs with the shapes and dtypes of `example_inputs` and a batch of `batch_size`."""
    generator = torch.Generator().manual_seed(0)
    inputs: list[Any] = []
    for tensor in flatten_value(tuple(example_inputs)):
        shape = [batch_size, *tensor.shape[1:]]
        if device == "meta":
            inputs.append(torch.empty(shape, dtype=tensor.dtype, device="meta"))
        elif tensor.dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=tensor.dtype, generator=generator))
        else:
            # Token 1 is valid in every vocabulary of two or more, and 0 is often padding.
            inputs.append(torch.ones(shape, dtype=tensor.dtype))
    return tuple(inputs)


def _energy_or_time(devices: Sequence[DeviceInfo]) -> str:
    """Return "energy" if every device has power figures, else "time" with a WARNING."""
    unpowered = [d.device for d in devices if d.idle_watts is None or d.busy_watts is None]
    if not unpowered:
        return "energy"
    logger.warning(
        "Household %s: devices %s have no idle-watts and busy-watts in their node config; planning for time, not energy",
        devices[0].household, unpowered,
    )  # fmt: skip
    return "time"


def household_links(devices: Sequence[DeviceInfo], owner: DeviceInfo) -> LinkTable:
    """Build the household's link table from the links its data owner measured during discovery.

    The owner's link to each device is its measurement. A device without
    one gets `DEFAULT_LINK` to and from every device, with a WARNING. The
    link between two other devices is estimated as the slower of their
    links to the owner (the lower bandwidth, the higher latency).
    """
    measured = dict(owner.measured_links)
    others = [d.device for d in devices if d is not owner]
    missing = [name for name in others if name not in measured]
    if missing:
        logger.warning(
            "Household %s: no measured link from %s to %s; planning them with the default link (%.3g MB/s, %.3g ms)",
            owner.household, owner.device, missing, DEFAULT_LINK.bandwidth_bytes_per_second / 1e6,
            DEFAULT_LINK.latency_seconds * 1e3,
        )  # fmt: skip
    links = {(owner.device, name): measured[name] for name in others if name in measured}
    # NOTE: only the owner measures, so a link between two other devices is an
    # estimate. It is right when they reach each other through the access point
    # that connects them to the owner. A direct link between them may be faster.
    for first, second in itertools.combinations([name for name in others if name in measured], 2):
        links[(first, second)] = LinkProfile(
            bandwidth_bytes_per_second=min(measured[first].bandwidth_bytes_per_second, measured[second].bandwidth_bytes_per_second),
            latency_seconds=max(measured[first].latency_seconds, measured[second].latency_seconds),
        )
    return LinkTable(links=links)


def _best_plan(
    profile: ModelProfile,
    devices: Sequence[DeviceInfo],
    owner: DeviceInfo,
    links: LinkTable,
    *,
    max_stages: int | None,
    batch_size: int,
    objective: str,
    schedule: str,
    optimizer: str,
    runtime_bytes: int,
) -> tuple[Plan, list[str]]:
    """Plan on every device subset of at most `max_stages` devices with the owner; return the best plan and the left-out devices.

    The planner has no stage limit of its own, but it leaves devices idle, so
    the best plan over all subsets of `max_stages` devices is the best plan
    with at most `max_stages` stages.
    """
    others = [d for d in devices if d is not owner]
    size = len(devices) if max_stages is None else min(max_stages, len(devices))
    best: tuple[Plan, list[str]] | None = None
    error: PlanError | None = None
    for chosen in itertools.combinations(others, size - 1):
        subset = [owner, *chosen]
        try:
            plan = plan_from_discovery(
                profile,
                [_report(d) for d in subset],
                links,
                batch_size=batch_size,
                objective=objective,
                schedule=schedule,
                optimizer=optimizer,
                runtime_bytes=runtime_bytes,
                data_owner=owner.device,
            )
        except PlanError as exc:
            error = exc
            continue
        if best is None or plan.objective_value() < best[0].objective_value():
            best = (plan, [d.device for d in others if d not in chosen])
    if best is None:
        assert error is not None
        raise error
    return best


def _report(device: DeviceInfo) -> dict[str, Any]:
    """Return `device` as a discovery reply of `homesplit.planner.discovery`."""
    return {
        "device": device.device,
        "memory_bytes": device.memory_bytes,
        "flops_per_second": device.flops_per_second,
        "holds_data": device.holds_data,
        "num_examples": device.num_examples,
        "idle_watts": device.idle_watts,
        "busy_watts": device.busy_watts,
    }


def _household_plan(plan: Plan, devices: Sequence[DeviceInfo], owner: DeviceInfo, *, schedule: str, unused: list[str]) -> HouseholdPlan:
    by_name = {d.device: d for d in devices}
    stages = [
        StageAssignment(stage=k, device=name, node_id=by_name[name].node_id, address=by_name[name].address)
        for k, name in enumerate(plan.devices)
    ]
    idle = sorted({*plan.idle_devices, *unused})
    logger.info(
        "Household %s: planned %d stages %s, %d micro-batches, predicted step %.3g s (%s objective); idle %s",
        owner.household, plan.num_stages, plan.devices, plan.num_microbatches, plan.step_seconds, plan.objective, idle,
    )  # fmt: skip
    return HouseholdPlan(
        household=owner.household,
        cuts=plan.cuts,
        stages=stages,
        num_microbatches=plan.num_microbatches,
        schedule=schedule,
        num_examples=owner.num_examples,
        idle_devices=idle,
    )
