"""Household plans kept across rounds, recomputed when devices change or a device failed.

A household keeps its plan while the same devices (names and Flower node ids)
report. A device whose stage failed in the previous round is left out of the
household's next plan. It stays in when the household cannot be planned
without it, because it is the data owner, too few devices would remain, or
the planner finds no plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from homesplit.errors import HomesplitError, LinkError
from homesplit.household_plan import DeviceInfo, HouseholdPlan, plan_household
from homesplit.strategies.planning import PlanFn, plan_one

__all__ = ["HouseholdPlanner", "failed_devices"]

logger = logging.getLogger(__name__)


def _link_error_names() -> set[str]:
    names = set()
    pending: list[type] = [LinkError]
    while pending:
        kind = pending.pop()
        names.add(kind.__name__)
        pending.extend(kind.__subclasses__())
    return names


def failed_devices(failures: Mapping[str, str]) -> set[str]:
    """Return the devices that caused a household's failure, from each device's error.

    When a stage's process dies, its pipeline neighbours fail too, with a
    `LinkError` about that peer. A failure whose error names a `LinkError`
    class (as the device app's error reply does) is therefore counted only if
    every failure of the household is one: then no device can be singled out,
    and all of them count.

    Parameters
    ----------
    failures : mapping of str to str
        Device name to its error, as in `HouseholdOutcome.failures`.
    """
    link_errors = {f": {name}:" for name in _link_error_names()}
    causes = {device for device, error in failures.items() if not any(marker in error for marker in link_errors)}
    return causes or set(failures)


class HouseholdPlanner:
    """Plans of every household, recomputed only when the household's devices changed or one failed.

    Parameters
    ----------
    plan_fn : callable, default `homesplit.household_plan.plan_household`
        Planner with `plan_household`'s signature.
    min_devices : int, default 2
        Households with fewer devices are skipped with a WARNING.
    max_stages : int or None, default None
        Passed to `plan_fn`.
    num_microbatches : int, default 4
        Passed to `plan_fn`.
    schedule : str, default "1f1b"
        Passed to `plan_fn`.
    """

    def __init__(
        self,
        *,
        plan_fn: PlanFn = plan_household,
        min_devices: int = 2,
        max_stages: int | None = None,
        num_microbatches: int = 4,
        schedule: str = "1f1b",
    ) -> None:
        self.plan_fn = plan_fn
        self.min_devices = min_devices
        self.max_stages = max_stages
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        # Household id to the devices whose stage failed in the latest round it took part in.
        self.failed: dict[str, set[str]] = {}
        # Household id to (device key, excluded devices) and the plan made for them.
        self._plans: dict[str, tuple[tuple, HouseholdPlan]] = {}

    def record_failures(self, failures: Mapping[str, Mapping[str, str]]) -> None:
        """Store the failures of a round's households; a household that succeeded clears its earlier ones.

        Parameters
        ----------
        failures : mapping of str to mapping of str to str
            Household id to its failing devices and their errors; an empty
            mapping for a household that succeeded.
        """
        for household, errors in failures.items():
            self.failed[household] = failed_devices(errors) if errors else set()

    def plan(
        self,
        households: Mapping[str, Sequence[DeviceInfo]],
        *,
        model_fn: Callable[[], nn.Module],
        example_inputs: Callable[[], tuple],
    ) -> dict[str, HouseholdPlan]:
        """Return a plan for every household that can train; skip the others with a WARNING.

        A household whose devices and exclusions are those of its previous
        plan gets that plan again without calling `plan_fn`.
        """
        plans: dict[str, HouseholdPlan] = {}
        model: nn.Module | None = None
        inputs: tuple = ()
        for household, devices in households.items():
            excluded = self._excluded(household, devices)
            key = (tuple((d.device, d.node_id) for d in devices), frozenset(excluded))
            cached = self._plans.get(household)
            if cached is not None and cached[0] == key:
                plans[household] = cached[1]
                continue

            if model is None:
                with torch.device("meta"):
                    model = model_fn()
                    inputs = example_inputs()
            try:
                plan = self._plan_without(household, devices, excluded, model=model, example_inputs=inputs)
            except HomesplitError as exc:
                logger.warning("Household %s skipped: %s", household, exc)
                self._plans.pop(household, None)
                continue
            self._plans[household] = (key, plan)
            plans[household] = plan
        return plans

    def _excluded(self, household: str, devices: Sequence[DeviceInfo]) -> set[str]:
        """Return the failed devices that can be left out: every one but the data owner."""
        failed = self.failed.get(household, set()) & {d.device for d in devices}
        owners = {d.device for d in devices if d.holds_data}
        for device in sorted(failed & owners):
            logger.warning(
                "Household %s: device %s failed in the previous round but is the data owner, so it stays in the plan",
                household, device,
            )  # fmt: skip
        return failed - owners

    def _plan_without(
        self, household: str, devices: Sequence[DeviceInfo], excluded: set[str], *, model: nn.Module, example_inputs: tuple
    ) -> HouseholdPlan:
        options = dict(
            model=model,
            example_inputs=example_inputs,
            min_devices=self.min_devices,
            max_stages=self.max_stages,
            num_microbatches=self.num_microbatches,
            schedule=self.schedule,
            plan_fn=self.plan_fn,
        )
        if excluded:
            remaining = [d for d in devices if d.device not in excluded]
            try:
                plan = plan_one(remaining, **options)
            except HomesplitError as exc:
                logger.warning(
                    "Household %s: devices %s failed in the previous round, but the household cannot be planned "
                    "without them (%s); they stay in the plan",
                    household, sorted(excluded), exc,
                )  # fmt: skip
            else:
                logger.warning(
                    "Household %s: devices %s failed in the previous round and are left out of this plan",
                    household, sorted(excluded),
                )  # fmt: skip
                plan.idle_devices = sorted({*plan.idle_devices, *excluded})
                return plan
        return plan_one(devices, **options)
