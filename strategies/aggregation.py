"""Aggregation of household updates: all stages or nothing, then averages by parameter name."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from homesplit.household_plan import HouseholdPlan
from homesplit.records import ARRAYS, METRICS

__all__ = ["HouseholdOutcome", "collect_outcomes", "average_by_name"]

logger = logging.getLogger(__name__)


@dataclass
class HouseholdOutcome:
    """Update and metrics that one household returned in one round.

    Attributes
    ----------
    household : str
        Household id.
    num_examples : int
        Weight of the household's update: the examples its data owner trained on.
    arrays : dict of str to numpy.ndarray
        Union of the segments of every stage, by parameter name.
    metrics : list of dict
        One metrics dict per stage, stage order.
    failures : dict of str to str
        Failing device name to its error; empty when the household succeeded.
    """

    household: str
    num_examples: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """True when every stage replied without error."""
        return not self.failures


def collect_outcomes(
    plans: Mapping[str, HouseholdPlan],
    sent: Mapping[str, tuple[str, int]],
    replies: Iterable[Message],
    *,
    weighted_by_key: str,
    server_round: int,
    expect_arrays: bool = True,
) -> dict[str, HouseholdOutcome]:
    """Sort replies into households and decide which households count.

    Parameters
    ----------
    plans : mapping of household id to HouseholdPlan
        The households that were sent messages this round.
    sent : mapping of message id to (household, device)
        Who each sent message went to; replies are matched by
        ``reply_to_message_id``.
    replies : iterable of Message
        The replies that arrived before the timeout.
    weighted_by_key : str
        Metric that carries each stage's example count.
    server_round : int
        Round number, for the log.
    expect_arrays : bool, default True
        Whether each reply must carry an ArrayRecord (train) or not (evaluate).
    """
    outcomes = {household: HouseholdOutcome(household) for household in plans}
    replied: dict[str, set[str]] = {household: set() for household in plans}
    for reply in replies:
        target = sent.get(reply.metadata.reply_to_message_id)
        if target is None:
            logger.warning("Round %d: ignoring a reply to unknown message %s", server_round, reply.metadata.reply_to_message_id)
            continue
        household, device = target
        replied[household].add(device)
        outcome = outcomes[household]
        if reply.has_error():
            outcome.failures[device] = f"error code {reply.error.code}: {reply.error.reason}"
            continue
        problem = _read_reply(reply, outcome, weighted_by_key=weighted_by_key, expect_arrays=expect_arrays)
        if problem:
            outcome.failures[device] = problem

    for household, plan in plans.items():
        for device in plan.devices:
            if device not in replied[household]:
                outcomes[household].failures[device] = "no reply before the round's timeout"
        outcome = outcomes[household]
        for device, error in outcome.failures.items():
            logger.error("Round %d: household %s dropped: device %s failed: %s", server_round, household, device, error)
    return outcomes


def _read_reply(reply: Message, outcome: HouseholdOutcome, *, weighted_by_key: str, expect_arrays: bool) -> str | None:
    """Add one stage's reply to `outcome`; return a problem description or None."""
    content = reply.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None or weighted_by_key not in metrics:
        return f"reply has no MetricRecord {METRICS!r} with {weighted_by_key!r}"
    if expect_arrays:
        record = content.array_records.get(ARRAYS)
        if record is None:
            return f"reply has no ArrayRecord {ARRAYS!r}"
        for name, array in record.items():
            outcome.arrays[name] = array.numpy()
    values = dict(metrics)
    outcome.metrics.append(values)
    outcome.num_examples = max(outcome.num_examples, int(values[weighted_by_key]))
    return None


def average_by_name(current: ArrayRecord, outcomes: Iterable[HouseholdOutcome]) -> ArrayRecord:
    """Average each parameter over the households that returned it, weighted by examples.

    A parameter that no household returned keeps its value from `current`.
    Sums run in float64 and are cast back to each parameter's dtype, so one
    household's update comes back bit for bit.
    """
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for outcome in outcomes:
        weight = float(outcome.num_examples)
        if weight <= 0:
            logger.warning("Household %s reported %d examples; its update gets no weight", outcome.household, outcome.num_examples)
            continue
        for name, value in outcome.arrays.items():
            if name not in current:
                logger.warning("Household %s returned parameter %r, which the global model does not have; ignored", outcome.household, name)
                continue
            contribution = value.astype(np.float64) * weight
            sums[name] = contribution if name not in sums else sums[name] + contribution
            weights[name] = weights.get(name, 0.0) + weight

    result = ArrayRecord()
    for name, array in current.items():
        previous = array.numpy()
        if name in sums:
            averaged = (sums[name] / weights[name]).astype(previous.dtype).reshape(previous.shape)
            result[name] = Array(averaged)
        else:
            result[name] = Array(previous)
    return result
