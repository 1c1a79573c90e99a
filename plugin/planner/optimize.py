"""Choose cut points, the device of every stage and the micro-batch count.

`plan_household` solves the problem exactly by dynamic programming;
`brute_force` enumerates every candidate and exists to test it. Both use the
cost model of `homesplit.planner.costs`.

The dynamic program runs once per micro-batch count ``M``. It walks the units
from the back, because a 1F1B stage's memory depends on its distance from the
last stage, which is known from the back without knowing the number of
stages. A state is ``(start, device, used)``: units ``[start, n)`` run on the
devices in the set ``used``, the first of them on ``device``. Its value is the
Pareto front of (bottleneck seconds, traversal seconds, additive joules) over
all ways to reach it. The traversal is the sum of the stages' and links' times
per micro-batch, and the additive part is ``sum((busy_watts - idle_watts) *
busy seconds)`` over the stages. A stage's share of the bottleneck and the
traversal is its compute plus its runtime overhead per micro-batch, and its
busy seconds include that overhead for every micro-batch, as in
`homesplit.planner.costs`. Both objectives grow with all three numbers once
``used`` is fixed, since

- time = ``traversal + (M - 1) * bottleneck``, and
- energy * B = ``additive + sum(idle_watts over used) * time``.

Stages added in front only raise the bottleneck and add to the traversal and
the additive part, so no state that is dominated on all three numbers can
lead to the optimum, and the front keeps the search exact. For "time" the
additive part is zero and the front is the Pareto front of the first two.
Entries whose lower bound is worse than a plan already known are dropped too.
The cost grows as ``n**2 * D**2 * 2**D`` front merges per ``M`` for ``n``
units and ``D`` devices, times the front size, which has no proven bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from itertools import combinations, permutations

from homesplit.errors import ConfigError, PlanError
from homesplit.planner.costs import CostModel, check_objective
from homesplit.planner.plan import Plan
from homesplit.planner.profiles import DeviceProfile, LayerProfile, LinkTable

__all__ = ["plan_household", "brute_force", "DEFAULT_MICROBATCH_CANDIDATES"]

logger = logging.getLogger(__name__)

DEFAULT_MICROBATCH_CANDIDATES = (1, 2, 4, 8, 16, 32)
"""Micro-batch counts the planner tries when the caller passes none."""

# A front entry: (bottleneck seconds, traversal seconds, additive joules, path),
# where the path is a linked list (start, device index, rest of the path or None).
_Entry = tuple[float, float, float, tuple | None]


def plan_household(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    links: LinkTable | None = None,
    *,
    batch_size: int,
    objective: str = "time",
    schedule: str = "1f1b",
    microbatch_candidates: Iterable[int] | None = None,
    optimizer: str = "adam",
    data_owner: str | None = None,
    stage_overhead_seconds: float = 0.0,
) -> Plan:
    """Plan one household: cut points, the device of each segment and the micro-batch count.

    Parameters
    ----------
    layers : sequence of LayerProfile
        Units of the model in order, measured on the reference device.
    devices : sequence of DeviceProfile
        The household's devices. Devices that would not lower the objective
        stay idle and are listed in `Plan.idle_devices`.
    links : LinkTable or None, default None
        Links between the devices; None assumes `DEFAULT_LINK` everywhere.
    batch_size : int
        Samples per mini-batch, that is per optimizer step.
    objective : {"time", "energy"}, default "time"
        "time" minimises the predicted step time; "energy" minimises the
        predicted energy per sample of the used devices and needs power
        figures on every device.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
        Pipeline schedule; it sets how many micro-batches of activations each
        stage keeps, and so the memory limit.
    microbatch_candidates : iterable of int or None, default None
        Micro-batch counts to choose from. Counts larger than `batch_size` are
        skipped with a warning. None takes the counts of
        `DEFAULT_MICROBATCH_CANDIDATES` up to `batch_size`.
    optimizer : str, default "adam"
        Optimizer kind whose state counts towards memory.
    data_owner : str or None, default None
        Device that must run stage 0, for example the one that stores the
        data; None lets the planner choose.
    stage_overhead_seconds : float, default 0.0
        Seconds the stage runtime spends per micro-batch and stage on the
        reference device, apart from compute: `ModelProfile.stage_overhead_seconds`.
        Every stage pays it divided by its device's speed, so it also charges
        each extra stage. 0.0 leaves the runtime out of the prediction.

    Returns
    -------
    Plan
        A plan with the least objective value; ties go to the smaller
        micro-batch count, then the fewer stages.

    Raises
    ------
    ConfigError
        If an argument is invalid or the energy objective lacks power figures.
    PlanError
        If no assignment fits every device's memory. The message names the
        largest unit and the largest device memory.
    """
    model, counts, owner = _prepare(
        layers, devices, links, batch_size, objective, schedule, microbatch_candidates, optimizer, data_owner,
        stage_overhead_seconds,
    )
    best: tuple[float, int, list[int], list[int]] | None = None
    bound = _single_device_bound(model, counts, objective=objective, owner=owner)
    for num_microbatches in counts:
        found = _solve(model, num_microbatches=num_microbatches, objective=objective, owner=owner, bound=bound)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], num_microbatches, found[1], found[2])
            bound = min(bound, found[0])
    if best is None:
        raise _no_plan_error(model, counts)

    _, num_microbatches, bounds, order = best
    plan = model.build_plan(
        bounds, [model.devices[d] for d in order], num_microbatches=num_microbatches, objective=objective
    )
    logger.info(
        "planned %d stages on %s with %d micro-batches: step %.4g s, objective %s",
        plan.num_stages,
        ", ".join(plan.devices),
        plan.num_microbatches,
        plan.step_seconds,
        objective,
    )
    return plan


def brute_force(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    links: LinkTable | None = None,
    *,
    batch_size: int,
    objective: str = "time",
    schedule: str = "1f1b",
    microbatch_candidates: Iterable[int] | None = None,
    optimizer: str = "adam",
    data_owner: str | None = None,
    stage_overhead_seconds: float = 0.0,
) -> Plan:
    """Plan one household by trying every cut set, device order and micro-batch count.

    Takes the same arguments, returns the same kind of plan and raises the
    same errors as `plan_household`. It is exponential in the number of units
    and devices, and meant as the reference in tests.
    """
    model, counts, owner = _prepare(
        layers, devices, links, batch_size, objective, schedule, microbatch_candidates, optimizer, data_owner,
        stage_overhead_seconds,
    )
    n = len(model.layers)
    best_value = math.inf
    best: tuple[list[int], tuple[DeviceProfile, ...], int] | None = None
    for num_microbatches in counts:
        for num_stages in range(1, min(len(model.devices), n) + 1):
            for order in permutations(model.devices, num_stages):
                if owner is not None and order[0] is not model.devices[owner]:
                    continue
                for cuts in combinations(range(1, n), num_stages - 1):
                    bounds = [0, *cuts, n]
                    if not model.fits(bounds, order, num_microbatches=num_microbatches):
                        continue
                    cost = model.step_cost(bounds, order, num_microbatches=num_microbatches)
                    value = cost.energy_joules_per_sample if objective == "energy" else cost.step_seconds
                    if value < best_value:
                        best_value, best = value, (bounds, order, num_microbatches)
    if best is None:
        raise _no_plan_error(model, counts)
    bounds, order, num_microbatches = best
    return model.build_plan(bounds, order, num_microbatches=num_microbatches, objective=objective)


def _prepare(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    links: LinkTable | None,
    batch_size: int,
    objective: str,
    schedule: str,
    microbatch_candidates: Iterable[int] | None,
    optimizer: str,
    data_owner: str | None,
    stage_overhead_seconds: float,
) -> tuple[CostModel, list[int], int | None]:
    """Validate the arguments; return the cost model, micro-batch counts and data owner's index."""
    model = CostModel(
        layers,
        devices,
        links or LinkTable(),
        batch_size=batch_size,
        schedule=schedule,
        optimizer=optimizer,
        stage_overhead_seconds=stage_overhead_seconds,
    )
    check_objective(objective, devices)

    if microbatch_candidates is None:
        microbatch_candidates = [count for count in DEFAULT_MICROBATCH_CANDIDATES if count <= batch_size]
    counts = []
    for count in sorted(set(microbatch_candidates)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"micro-batch count {count!r} must be a positive integer")
        if count > batch_size:
            logger.warning("skipping micro-batch count %d: larger than batch_size=%d", count, batch_size)
            continue
        counts.append(count)
    if not counts:
        raise ConfigError(f"no micro-batch count is at most batch_size={batch_size}; pass a count of 1 or more")

    owner = None
    if data_owner is not None:
        names = [device.name for device in devices]
        if data_owner not in names:
            raise ConfigError(f"data_owner={data_owner!r} is not a device of the household ({', '.join(names)})")
        owner = names.index(data_owner)
    return model, counts, owner


def _solve(
    model: CostModel, *, num_microbatches: int, objective: str, owner: int | None, bound: float
) -> tuple[float, list[int], list[int]] | None:
    """Return (objective value, bounds, device indices) of the best plan with `num_microbatches`, or None.

    `bound` is the objective value of a plan already known. Front entries whose
    every completion is worse are dropped, which keeps the fronts of the energy
    objective small without losing the optimum.
    """
    n = len(model.layers)
    size = model.microbatch_size(num_microbatches)
    energy = objective == "energy"
    least_additive = _least_additive_prefix(model, num_microbatches) if energy else [0.0] * (n + 1)
    least_traversal = _least_traversal_prefix(model, num_microbatches)
    # A relative margin keeps rounding in the bound from dropping the optimum.
    limit = bound + abs(bound) * 1e-9
    fronts: dict[tuple[int, int, int], list[_Entry]] = {}

    for start in range(n - 1, -1, -1):
        for used in range(1, 1 << len(model.devices)):
            num_used = used.bit_count()
            if num_used > n - start:
                continue
            kept = model.kept_microbatches(stages_from_end=num_used, num_microbatches=num_microbatches)
            for d in _members(used):
                front = _extend(
                    model,
                    start,
                    d,
                    used,
                    kept_microbatches=kept,
                    num_microbatches=num_microbatches,
                    energy=energy,
                    fronts=fronts,
                )
                # Units before `start` add at least least_traversal[start] and
                # least_additive[start], and more devices only add stages and idle
                # power, so this is a lower bound.
                front = [
                    entry
                    for entry in front
                    if _value(
                        model, entry[0], entry[1] + least_traversal[start], entry[2] + least_additive[start], used,
                        num_microbatches, energy,
                    )  # fmt: skip
                    <= limit
                ]
                if front:
                    fronts[(start, d, used)] = front

    best: tuple[float, int, tuple] | None = None
    for (start, d, used), front in fronts.items():
        if start != 0 or (owner is not None and d != owner):
            continue
        for bottleneck, traversal, additive, path in front:
            value = _value(model, bottleneck, traversal, additive, used, num_microbatches, energy)
            key = (value, used.bit_count(), path)
            if best is None or key[:2] < best[:2]:
                best = key
    if best is None:
        return None
    bounds, order = _unwind(best[2], n)
    return best[0], bounds, order


def _value(
    model: CostModel,
    bottleneck: float,
    traversal: float,
    additive: float,
    used: int,
    num_microbatches: int,
    energy: bool,
) -> float:
    """Return the objective of a plan on the devices in `used` from its three front numbers."""
    step = model.step_seconds(
        bottleneck_seconds=bottleneck, traversal_seconds=traversal, num_microbatches=num_microbatches
    )
    if not energy:
        return step
    idle_watts = sum(model.devices[e].idle_watts for e in _members(used))
    return (additive + idle_watts * step) / model.batch_size


def _least_traversal_prefix(model: CostModel, num_microbatches: int) -> list[float]:
    """Return, for each start, the least traversal seconds that units before it can add on any device."""
    size = model.microbatch_size(num_microbatches)
    compute = [0.0]
    for i in range(len(model.layers)):
        least = min(size * model.unit_seconds(i, microbatch_size=size) / device.speed for device in model.devices)
        compute.append(compute[-1] + least)

    # Units before a start > 0 form at least one more stage, which pays the
    # runtime once; links only add to this.
    runtime = min(model.runtime_seconds(device) for device in model.devices)
    return [compute[0], *(value + runtime for value in compute[1:])]


def _least_additive_prefix(model: CostModel, num_microbatches: int) -> list[float]:
    """Return, for each start, the least additive energy that units before it can add on any device."""
    # The compute part of a stage's additive energy is a sum over its units.
    size = model.microbatch_size(num_microbatches)
    compute = [0.0]
    for i in range(len(model.layers)):
        seconds = model.unit_seconds(i, microbatch_size=size)
        least = min(
            (device.busy_watts - device.idle_watts) * model.batch_size * seconds / device.speed
            for device in model.devices
        )
        compute.append(compute[-1] + least)

    # The runtime part is paid once per stage. Units before a start > 0 form at
    # least one stage and at most one per device, and a device whose busy power
    # is below its idle power makes that part negative.
    count = math.ceil(model.batch_size / model.microbatch_size(num_microbatches))
    runtime = min(
        (device.busy_watts - device.idle_watts) * count * model.runtime_seconds(device) for device in model.devices
    )
    runtime = runtime if runtime >= 0 else runtime * len(model.devices)
    return [compute[0], *(value + runtime for value in compute[1:])]


def _single_device_bound(model: CostModel, counts: Sequence[int], *, objective: str, owner: int | None) -> float:
    """Return the best objective of running the whole model on one device, or infinity if none fits."""
    n = len(model.layers)
    best = math.inf
    for index, device in enumerate(model.devices):
        if owner is not None and index != owner:
            continue
        for count in counts:
            if model.fits([0, n], [device], num_microbatches=count):
                cost = model.step_cost([0, n], [device], num_microbatches=count)
                value = cost.energy_joules_per_sample if objective == "energy" else cost.step_seconds
                best = min(best, value)
    return best


def _extend(
    model: CostModel,
    start: int,
    d: int,
    used: int,
    *,
    kept_microbatches: int,
    num_microbatches: int,
    energy: bool,
    fronts: dict[tuple[int, int, int], list[_Entry]],
) -> list[_Entry]:
    """Return the Pareto front of state ``(start, d, used)`` from the fronts of later starts."""
    n = len(model.layers)
    size = model.microbatch_size(num_microbatches)
    device = model.devices[d]
    rest = used & ~(1 << d)
    candidates: list[_Entry] = []

    # The last stage takes every remaining unit.
    if not rest:
        memory = model.memory_bytes(start, n, kept_microbatches=kept_microbatches, microbatch_size=size)
        if memory > device.memory_bytes:
            return []
        compute = model.stage_seconds(start, n, device, microbatch_size=size)
        additive = _additive(model, start, n, device, num_microbatches=num_microbatches, energy=energy)
        return [(compute, compute, additive, (start, d, None))]

    # Leave at least one unit for each later stage.
    for stop in range(start + 1, n - rest.bit_count() + 1):
        # Memory only grows with more units, so no longer segment fits either.
        memory = model.memory_bytes(start, stop, kept_microbatches=kept_microbatches, microbatch_size=size)
        if memory > device.memory_bytes:
            break
        compute = model.stage_seconds(start, stop, device, microbatch_size=size)
        additive = _additive(model, start, stop, device, num_microbatches=num_microbatches, energy=energy)
        for e in _members(rest):
            later = fronts.get((stop, e, rest))
            if not later:
                continue
            transfer = model.transfer_seconds(stop, device, model.devices[e], microbatch_size=size)
            head = max(compute, transfer)
            for bottleneck, traversal, later_additive, path in later:
                entry = (max(head, bottleneck), compute + transfer + traversal, additive + later_additive, (start, d, path))
                candidates.append(entry)
    return _pareto(candidates)


def _additive(
    model: CostModel, start: int, stop: int, device: DeviceProfile, *, num_microbatches: int, energy: bool
) -> float:
    if not energy:
        return 0.0
    busy = model.busy_seconds(start, stop, device, num_microbatches=num_microbatches)
    return (device.busy_watts - device.idle_watts) * busy


def _pareto(candidates: list[_Entry]) -> list[_Entry]:
    """Keep the entries that no other entry matches or beats on bottleneck, traversal and additive cost."""
    # After sorting, every kept entry has a bottleneck no larger than the
    # current one, so only the other two numbers need comparing.
    candidates.sort(key=lambda entry: entry[:3])
    front: list[_Entry] = []
    for entry in candidates:
        if not any(kept[1] <= entry[1] and kept[2] <= entry[2] for kept in front):
            front.append(entry)
    return front


def _members(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _unwind(path: tuple | None, n: int) -> tuple[list[int], list[int]]:
    bounds, order = [], []
    while path is not None:
        start, d, path = path
        bounds.append(start)
        order.append(d)
    return [*bounds, n], order


def _no_plan_error(model: CostModel, counts: Sequence[int]) -> PlanError:
    """Build the error for a household whose memory fits no plan."""
    # The smallest micro-batch, kept once, is the least any unit needs anywhere.
    size = model.microbatch_size(max(counts))
    needs = [
        model.memory_bytes(i, i + 1, kept_microbatches=1, microbatch_size=size) for i in range(len(model.layers))
    ]
    largest = max(range(len(needs)), key=needs.__getitem__)
    device = max(model.devices, key=lambda device: device.memory_bytes)
    return PlanError(
        f"no plan fits the devices' memory: the largest unit {model.layers[largest].name!r} needs "
        f"{needs[largest]} bytes (parameters, gradients, {model.optimizer} state and one {size}-sample "
        f"micro-batch of activations), and the largest device memory is {device.memory_bytes} bytes on "
        f"{device.name!r}; add devices or memory, lower the batch size, allow more micro-batches, or cut "
        f"the model into smaller units"
    )
