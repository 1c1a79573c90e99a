"""Planning per household and building the per-device messages of a round."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from homesplit.errors import HomesplitError, PlanError
from homesplit.household_plan import DeviceInfo, HouseholdPlan, plan_household
from homesplit.partition import split_model
from homesplit.records import ARRAYS, CONFIG, PLAN

__all__ = ["PlanFn", "plan_households", "plan_one", "segment_names", "stage_messages"]

logger = logging.getLogger(__name__)

PlanFn = Callable[..., HouseholdPlan]
"""Signature of `homesplit.household_plan.plan_household`, which a planner may replace."""


def plan_households(
    households: Mapping[str, Sequence[DeviceInfo]],
    *,
    model_fn: Callable[[], nn.Module],
    example_inputs: Callable[[], tuple],
    min_devices: int,
    max_stages: int | None,
    num_microbatches: int,
    schedule: str,
    plan_fn: PlanFn = plan_household,
) -> dict[str, HouseholdPlan]:
    """Plan every household that can train; skip the others with a WARNING naming them.

    A household is skipped when it has no data owner, more than one, or fewer
    than `min_devices` devices, or when the planner raises.
    """
    with torch.device("meta"):
        model = model_fn()
        inputs = example_inputs()
    plans = {}
    for household, devices in households.items():
        try:
            plans[household] = plan_one(
                devices,
                model=model,
                example_inputs=inputs,
                min_devices=min_devices,
                max_stages=max_stages,
                num_microbatches=num_microbatches,
                schedule=schedule,
                plan_fn=plan_fn,
            )
        except HomesplitError as exc:
            logger.warning("Household %s skipped: %s", household, exc)
    return plans


def plan_one(
    devices: Sequence[DeviceInfo],
    *,
    model: nn.Module,
    example_inputs: tuple,
    min_devices: int,
    max_stages: int | None,
    num_microbatches: int,
    schedule: str,
    plan_fn: PlanFn = plan_household,
) -> HouseholdPlan:
    """Plan one household with `plan_fn` and log the plan at INFO.

    Parameters
    ----------
    devices : sequence of DeviceInfo
        The devices of one household.
    model : nn.Module
        The full model on the ``meta`` device.
    example_inputs : tuple
        The model's inputs for a batch of one, on the ``meta`` device.
    min_devices, max_stages, num_microbatches, schedule, plan_fn
        As in `plan_households`.

    Raises
    ------
    PlanError
        If no device holds data or there are fewer than `min_devices` devices.
    HomesplitError
        Whatever `plan_fn` raises, such as a `PlanError` when no plan fits.
    """
    household = devices[0].household if devices else "?"
    names = [d.device for d in devices]
    if not any(d.holds_data for d in devices):
        raise PlanError(f"none of its devices {names} holds data; set holds-data=true on its data owner")
    if len(devices) < min_devices:
        raise PlanError(f"it has {len(devices)} devices {names}, fewer than min_household_devices={min_devices}")
    plan = plan_fn(
        devices,
        model=model,
        example_inputs=example_inputs,
        max_stages=max_stages,
        num_microbatches=num_microbatches,
        schedule=schedule,
    )
    logger.info(
        "Household %s: %d stages %s, cuts %s, idle %s, %d examples",
        household, plan.num_stages, plan.devices, plan.cuts, plan.idle_devices, plan.num_examples,
    )  # fmt: skip
    return plan


def segment_names(plan: HouseholdPlan, model_fn: Callable[[], nn.Module], example_inputs: Callable[[], tuple]) -> list[list[str]]:
    """Return the state_dict names of each stage's segment under `plan`."""
    with torch.device("meta"):
        split = split_model(model_fn(), plan.cuts, example_inputs=example_inputs())
    return [split.parameter_names(k) for k in range(split.num_stages)]


def stage_messages(
    plan: HouseholdPlan,
    names: Sequence[Sequence[str]],
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    message_type: str,
    server_round: int,
    group_id: str,
) -> list[Message]:
    """Build one message per stage, each with only that stage's arrays and the plan.

    Raises
    ------
    HomesplitError
        If the global ArrayRecord lacks a parameter that a segment holds.
    """
    messages = []
    plan_json = plan.to_json()
    for assignment, stage_names in zip(plan.stages, names):
        missing = [n for n in stage_names if n not in arrays]
        if missing:
            raise HomesplitError(
                f"the global arrays lack {missing[:5]} of stage {assignment.stage} of household {plan.household}; "
                "pass ArrayRecord(model.state_dict()) of the same model as initial_arrays"
            )
        segment = ArrayRecord({n: arrays[n] for n in stage_names})
        stage_config = ConfigRecord(dict(config))
        stage_config[PLAN] = plan_json
        stage_config["stage"] = assignment.stage
        stage_config["server-round"] = server_round
        messages.append(
            Message(
                RecordDict({ARRAYS: segment, CONFIG: stage_config}),
                dst_node_id=assignment.node_id,
                message_type=message_type,
                group_id=group_id,
            )
        )
    return messages
