"""`HomesplitStrategy`: households train as pipelines, the server averages their segments."""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from homesplit.errors import ConfigError
from homesplit.household_plan import DeviceInfo, HouseholdPlan, plan_household
from homesplit.planner.plan import OBJECTIVES
from homesplit.profiled_plan import plan_household_profiled
from homesplit.schedule import SCHEDULES
from homesplit.strategies.aggregation import HouseholdOutcome, average_by_name, collect_outcomes
from homesplit.strategies.discovery import discover_devices, group_households, wait_for_nodes
from homesplit.strategies.link_probes import probe_household_links, with_measured_links
from homesplit.strategies.planning import PlanFn, segment_names, stage_messages
from homesplit.strategies.replanning import HouseholdPlanner

__all__ = ["HomesplitStrategy", "PLANNERS"]

logger = logging.getLogger(__name__)

PLANNERS = ("balanced", *OBJECTIVES)
"""Values of `HomesplitStrategy`'s ``planner`` option."""


class HomesplitStrategy(Strategy):
    """Train each household's model as a pipeline and average the segments by parameter name.

    Each round, every sampled household gets one message per pipeline stage,
    carrying only that stage's segment and the household plan. A household's
    update counts only if all its stages reply without error. The updates
    that count are averaged per parameter name, weighted by the household's
    examples. Start it like FedAvg: ``strategy.start(grid=grid,
    initial_arrays=ArrayRecord(model.state_dict()), num_rounds=...)``.

    A household keeps its plan while the same devices (names and node ids)
    take part, and is planned again when one joins or leaves. A device
    whose stage failed in the previous round is left out of the household's
    next plan, with a WARNING, unless the household cannot be planned
    without it. When a stage dies, its neighbours fail with link errors, so
    only the devices that failed with another error or sent no reply are
    left out. If every failure is a link error, all failing devices are.

    Parameters
    ----------
    model_fn : callable
        Builds the full model with no arguments. The strategy calls it on
        torch's ``meta`` device only, to plan cuts.
    example_inputs : callable
        Returns the model's positional inputs for a batch of one, as a tuple.
    fraction_train : float, default 1.0
        Fraction of the plannable households sampled for training; 0.0 skips
        federated training (logged as a WARNING).
    fraction_evaluate : float, default 1.0
        Fraction of households sampled for federated evaluation; 0.0 skips it,
        which suits centralized evaluation with `evaluate_fn` (logged at INFO;
        a WARNING when there is no `evaluate_fn`).
    min_train_households : int, default 1
        Households sampled for training at least, if that many can be planned;
        wins over `fraction_train`.
    min_evaluate_households : int, default 1
        The same for evaluation; wins over `fraction_evaluate`.
    min_available_nodes : int, default 2
        Nodes (devices) to wait for before the first discovery, for at most
        `nodes_timeout` seconds.
    min_household_devices : int, default 2
        Households with fewer devices are skipped with a WARNING.
    max_stages : int or None, default None
        Pipeline stages per household at most; None means one per device.
    num_microbatches : int, default 4
        Micro-batches per mini-batch in every household.
    schedule : {"gpipe", "1f1b"}, default "1f1b"
        Pipeline schedule in every household.
    weighted_by_key : str, default "num-examples"
        Metric key whose value weights each household's update and metrics.
    discovery_timeout : float, default 120.0
        Seconds to wait for the discovery replies.
    nodes_timeout : float, default 300.0
        Seconds to wait for `min_available_nodes` nodes to connect.
    link_probe_seconds : float, default 30.0
        With the "time" or "energy" planner, discovery ends with a link
        probe, as `homesplit.link_probes` describes. Each household's data
        owner measures its link to every other device of the household over
        the transport that training uses, which is mutual TLS unless the
        devices run with insecure-links. This is the time the owner may spend
        on one device, connecting included. The server waits
        `discovery_timeout` plus this time for each device other than the data
        owner in the largest household. A link that was not measured is
        planned with `homesplit.planner.DEFAULT_LINK`, with a WARNING.
    planner : {"balanced", "time", "energy"}, default "balanced"
        How households are cut. "balanced" balances parameter counts
        (`homesplit.household_plan.plan_household`). "time" and "energy" run
        the profile-driven planner (`homesplit.profiled_plan`) on the speed,
        memory and power figures of the discovery replies, minimising step
        time or energy per sample. The server then profiles the model once
        on its CPU, with real weights from `model_fn`. A household with a
        device that sent no speed figure gets the balanced plan, and one
        without power figures on every device is planned for time.
    batch_size : int, default 32
        Samples per mini-batch that the "time" and "energy" planners assume;
        set it to the train config's ``batch-size``. A different
        ``batch-size`` in the train config is logged as a WARNING.
    plan_fn : callable or None, default None
        Planner with `plan_household`'s signature; None takes the one that
        `planner` names. Give `plan_fn` or a `planner` other than "balanced",
        not both.
    seed : int, default 0
        Seed of household sampling.
    """

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        example_inputs: Callable[[], tuple],
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_households: int = 1,
        min_evaluate_households: int = 1,
        min_available_nodes: int = 2,
        min_household_devices: int = 2,
        max_stages: int | None = None,
        num_microbatches: int = 4,
        schedule: str = "1f1b",
        weighted_by_key: str = "num-examples",
        discovery_timeout: float = 120.0,
        nodes_timeout: float = 300.0,
        link_probe_seconds: float = 30.0,
        planner: str = "balanced",
        batch_size: int = 32,
        plan_fn: PlanFn | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must be between 0.0 and 1.0")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if num_microbatches < 1:
            raise ConfigError(f"num_microbatches={num_microbatches} must be at least 1")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if not (math.isfinite(link_probe_seconds) and link_probe_seconds > 0):
            raise ConfigError(f"link_probe_seconds={link_probe_seconds!r} must be a positive, finite number of seconds")
        if plan_fn is None:
            plan_fn = _planner_fn(planner, model_fn=model_fn, batch_size=batch_size)
        elif planner != "balanced":
            raise ConfigError(f"planner={planner!r} and plan_fn are both given; pass only one of them")
        self.model_fn = model_fn
        self.example_inputs = example_inputs
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_households = min_train_households
        self.min_evaluate_households = min_evaluate_households
        self.min_available_nodes = min_available_nodes
        self.min_household_devices = min_household_devices
        self.max_stages = max_stages
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.weighted_by_key = weighted_by_key
        self.discovery_timeout = discovery_timeout
        self.nodes_timeout = nodes_timeout
        self.link_probe_seconds = link_probe_seconds
        self._probe_sessions = 0
        self.planner = planner
        self.batch_size = batch_size
        self.plan_fn = plan_fn
        self._household_planner = HouseholdPlanner(
            plan_fn=plan_fn,
            min_devices=min_household_devices,
            max_stages=max_stages,
            num_microbatches=num_microbatches,
            schedule=schedule,
        )
        self._rng = random.Random(seed)

        self.devices: list[DeviceInfo] = []
        self.round_records: dict[int, dict] = {}
        self._discovered_nodes: frozenset[int] | None = None
        self._arrays: ArrayRecord | None = None
        self._plans: dict[str, HouseholdPlan] = {}
        self._train_plans: dict[str, dict[str, Any]] = {}
        self._outgoing: list[tuple[str, str, Message]] = []
        self._round_started = 0.0
        self._warned_batch_sizes: set[int] = set()

        if fraction_train == 0.0:
            logger.warning("fraction_train is 0.0: federated training is skipped")

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any):
        """Run Flower's round loop; see `flwr.serverapp.strategy.Strategy.start`.

        With ``fraction_evaluate=0.0`` evaluation happens only on the server
        when `evaluate_fn` is given, which is logged at INFO; without it
        nothing evaluates, which is logged as a WARNING.
        """
        if self.fraction_evaluate == 0.0:
            if kwargs.get("evaluate_fn") is not None:
                logger.info("fraction_evaluate is 0.0: the model is evaluated on the server only")
            else:
                logger.warning("fraction_evaluate is 0.0 and there is no evaluate_fn: nothing is evaluated")
        return super().start(grid, initial_arrays, num_rounds, **kwargs)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        logger.info("HomesplitStrategy: households train as %s pipelines, %d micro-batches", self.schedule, self.num_microbatches)
        logger.info(
            "  sampling: fraction train %.2f / evaluate %.2f; at least %d / %d households; %d nodes available",
            self.fraction_train, self.fraction_evaluate, self.min_train_households, self.min_evaluate_households,
            self.min_available_nodes,
        )  # fmt: skip
        logger.info(
            "  households: at least %d devices, at most %s stages; weighted by %r",
            self.min_household_devices, self.max_stages or "one per device", self.weighted_by_key,
        )  # fmt: skip
        logger.info("  planner: %s", self.planner if self.planner == "balanced" else f"{self.planner}, batch size {self.batch_size}")

    # -- training -------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Discover devices if the node set changed, plan every household and send each stage its segment."""
        self._round_started = time.monotonic()
        self._arrays = arrays
        self._train_plans = {}
        if self.fraction_train == 0.0:
            return []
        self._check_batch_size(config)
        self._refresh_devices(grid)
        plans = self._sample_for_training(self._plan_all())
        self._train_plans = {household: plan.summary() for household, plan in plans.items()}
        return self._messages(plans, arrays, config, "train", server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the segments of every household whose stages all succeeded."""
        outcomes = collect_outcomes(
            self._plans, self._sent(), replies, weighted_by_key=self.weighted_by_key, server_round=server_round
        )
        self._household_planner.record_failures({h: o.failures for h, o in outcomes.items()})
        trained = [o for o in outcomes.values() if o.succeeded]
        failed = sorted(h for h, o in outcomes.items() if not o.succeeded)
        seconds = time.monotonic() - self._round_started

        logger.info(
            "Round %d: %d households trained %s, %d dropped %s, in %.1f s",
            server_round, len(trained), sorted(o.household for o in trained), len(failed), failed, seconds,
        )  # fmt: skip
        metrics = MetricRecord(
            {
                "households-trained": len(trained),
                "households-failed": len(failed),
                "link-bytes": _sum_metric(outcomes.values(), "bytes-sent"),
                "seconds": seconds,
                self.weighted_by_key: sum(o.num_examples for o in trained),
            }
        )
        loss = _weighted_last_stage(trained, "train-loss")
        if loss is not None:
            metrics["train-loss"] = loss

        self.round_records[server_round] = {
            "households_trained": sorted(o.household for o in trained),
            "households_failed": {h: outcomes[h].failures for h in failed},
            "plans": self._train_plans,
        }
        return self._aggregate_arrays(trained), metrics

    # -- evaluation -----------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send each sampled household's stages their segments for a forward-only pass over local test data."""
        if self.fraction_evaluate == 0.0:
            self._plans, self._outgoing = {}, []
            return []
        self._refresh_devices(grid)
        plans = self._sample(self._plan_all(), self.fraction_evaluate, self.min_evaluate_households, "evaluation")
        return self._messages(plans, arrays, config, "evaluate", server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the last stages' loss and accuracy over households, weighted by examples."""
        if not self._plans:
            return None
        outcomes = collect_outcomes(
            self._plans, self._sent(), replies, weighted_by_key=self.weighted_by_key,
            server_round=server_round, expect_arrays=False,
        )  # fmt: skip
        self._household_planner.record_failures({h: o.failures for h, o in outcomes.items()})
        evaluated = [o for o in outcomes.values() if o.succeeded]
        if not evaluated:
            return None
        metrics = MetricRecord({"households-evaluated": len(evaluated)})
        for key in ("eval-loss", "eval-accuracy"):
            value = _weighted_last_stage(evaluated, key)
            if value is not None:
                metrics[key] = value
        return metrics

    # -- helpers --------------------------------------------------------------

    def _refresh_devices(self, grid: Grid) -> None:
        """Run discovery on the first round and whenever the set of connected nodes changed."""
        required = self.min_available_nodes if self._discovered_nodes is None else 1
        node_ids = frozenset(wait_for_nodes(grid, required, self.nodes_timeout))
        if node_ids == self._discovered_nodes:
            return
        logger.info("Discovering %d nodes", len(node_ids))
        self.devices = discover_devices(grid, sorted(node_ids), timeout=self.discovery_timeout)
        if self.planner != "balanced":
            # Only the profile-driven planners read link figures.
            self._probe_sessions += 1
            measured = probe_household_links(
                grid,
                group_households(self.devices),
                session=self._probe_sessions,
                budget_seconds=self.link_probe_seconds,
                timeout=self.discovery_timeout,
            )
            self.devices = with_measured_links(self.devices, measured)
        self._discovered_nodes = node_ids

    def _plan_all(self) -> dict[str, HouseholdPlan]:
        """Plan every household, reusing plans whose devices did not change and leaving out failed devices."""
        return self._household_planner.plan(
            group_households(self.devices), model_fn=self.model_fn, example_inputs=self.example_inputs
        )

    def _sample_for_training(self, plans: dict[str, HouseholdPlan]) -> dict[str, HouseholdPlan]:
        """Pick the households that train this round from those that could be planned."""
        return self._sample(plans, self.fraction_train, self.min_train_households, "training")

    def _aggregate_arrays(self, trained: list[HouseholdOutcome]) -> ArrayRecord | None:
        """Return the new global arrays from the households whose stages all succeeded, None to keep the old ones."""
        if not trained or self._arrays is None:
            return None
        return average_by_name(self._arrays, trained)

    def _check_batch_size(self, config: ConfigRecord) -> None:
        if self.planner == "balanced" or "batch-size" not in config:
            return
        configured = int(config["batch-size"])
        if configured != self.batch_size and configured not in self._warned_batch_sizes:
            self._warned_batch_sizes.add(configured)
            logger.warning(
                "The train config has batch-size=%d, but the %s planner assumes batch_size=%d; "
                "pass batch_size=%d to HomesplitStrategy",
                configured, self.planner, self.batch_size, configured,
            )  # fmt: skip

    def _sample(self, plans: dict[str, HouseholdPlan], fraction: float, minimum: int, what: str) -> dict[str, HouseholdPlan]:
        count = min(len(plans), max(int(math.floor(len(plans) * fraction)), minimum))
        if count < minimum:
            logger.warning("Only %d households can be planned for %s, fewer than the minimum %d", len(plans), what, minimum)
        chosen = sorted(self._rng.sample(sorted(plans), count))
        return {household: plans[household] for household in chosen}

    def _messages(
        self, plans: dict[str, HouseholdPlan], arrays: ArrayRecord, config: ConfigRecord, kind: str, server_round: int
    ) -> list[Message]:
        self._plans = plans
        self._outgoing = []
        for plan in plans.values():
            names = segment_names(plan, self.model_fn, self.example_inputs)
            batch = stage_messages(
                plan, names, arrays, config, message_type=kind, server_round=server_round, group_id=f"{kind}-{server_round}"
            )
            self._outgoing.extend((plan.household, a.device, m) for a, m in zip(plan.stages, batch))
        return [m for _, _, m in self._outgoing]

    def _sent(self) -> dict[str, tuple[str, str]]:
        """Map message id to (household, device); Flower assigns the ids when it pushes the messages."""
        return {m.metadata.message_id: (household, device) for household, device, m in self._outgoing}


def _planner_fn(planner: str, *, model_fn: Callable[[], nn.Module], batch_size: int) -> PlanFn:
    """Return the plan function that `planner` names."""
    if planner == "balanced":
        return plan_household
    if planner in OBJECTIVES:
        # NOTE: memory is planned for Adam's optimizer state whatever optimizer the train
        # config names, which overestimates it for SGD.
        return functools.partial(plan_household_profiled, objective=planner, batch_size=batch_size, model_fn=model_fn)
    raise ConfigError(f"planner={planner!r} is unknown; use one of {', '.join(PLANNERS)}")


def _sum_metric(outcomes: Iterable[HouseholdOutcome], key: str) -> float:
    return float(sum(m.get(key, 0) for o in outcomes for m in o.metrics))


def _weighted_last_stage(outcomes: list[HouseholdOutcome], key: str) -> float | None:
    """Average a metric reported by last stages only, weighted by each household's examples."""
    total = weight = 0.0
    for outcome in outcomes:
        values = [m[key] for m in outcome.metrics if key in m]
        if values and outcome.num_examples > 0:
            total += float(values[0]) * outcome.num_examples
            weight += outcome.num_examples
    return total / weight if weight else None
