"""Differential privacy on the devices: the round's settings, the data owner's budget and its status reply.

The strategy puts each household's `RoundPrivacy` as JSON into the train
message under `PRIVACY`. Every stage trains with it. The data owner does not
take the server's word for it: it resolves the same settings from the run
config and its own data set size, rejects a message that differs, and checks
its `PrivacyBudget` before training. The budget lives in the node's
``Context.state`` as JSON, so it persists across the rounds of a run
(Flower keeps ``Context.state`` per node and run).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from homesplit.errors import BudgetExhaustedError, PrivacyError
from homesplit.json_limits import loads_limited
from homesplit.privacy.accounting import BudgetDecision, PrivacyBudget
from homesplit.privacy.sampling import poisson_batches
from homesplit.privacy.settings import RoundPrivacy, decode_run_config, resolve_round, settings_for
from homesplit.records import METRICS, PRIVACY, PRIVACY_STATUS

__all__ = [
    "RoundDeclined",
    "read_round_privacy",
    "owner_round_privacy",
    "load_budget",
    "save_budget",
    "private_batches",
    "privacy_metrics",
    "declined_reply",
]

logger = logging.getLogger(__name__)

# Key of the ConfigRecord in Context.state that stores the budget as JSON text.
_BUDGET_RECORD = "homesplit-privacy-budget"


class RoundDeclined(BudgetExhaustedError):
    """The data owner declined a round because it would exceed the household's budget.

    Parameters
    ----------
    decision : BudgetDecision
        The budget check that declined the round.
    budget : PrivacyBudget
        The household's budget, unchanged by the declined round.
    """

    def __init__(self, decision: BudgetDecision, budget: PrivacyBudget) -> None:
        super().__init__(decision.message)
        self.decision = decision
        self.budget = budget


def read_round_privacy(config: Mapping[str, Any]) -> RoundPrivacy | None:
    """Return the DP settings that a train message carries, or None if the household trains without DP.

    Raises
    ------
    PrivacyError
        If the settings in the message are not valid JSON, nest deeper than
        `homesplit.json_limits.MAX_JSON_DEPTH` levels, or are invalid.
    """
    text = str(config.get(PRIVACY, "") or "")
    if not text:
        return None
    try:
        raw = loads_limited(text)
    except ValueError as exc:
        raise PrivacyError(
            f"the train message's privacy settings are not valid JSON: {exc}; check that the server runs the same "
            "homesplit version as this device"
        ) from exc
    return RoundPrivacy.from_dict(raw)


def owner_round_privacy(
    household: str, run_config: Mapping[str, Any], config: Mapping[str, Any], *, dataset_size: int, num_stages: int,
    sent: RoundPrivacy | None,
) -> RoundPrivacy | None:  # fmt: skip
    """Resolve the data owner's own settings for the round and reject a message that differs.

    Parameters
    ----------
    household : str
        The data owner's household.
    run_config : mapping
        Flower's run config, with the ``privacy`` key.
    config : mapping
        The train message's config (``batch-size``, ``local-epochs``).
    dataset_size : int
        Training examples of the data owner.
    num_stages : int
        Stages of the household plan in the message, which per-segment
        clipping divides its bound among.
    sent : RoundPrivacy or None
        What the message carries.

    Raises
    ------
    PrivacyError
        If the message's settings differ from the run config's, for example a
        smaller sigma, or no DP where the run config sets DP for the household,
        or if per-segment bounds do not match `num_stages`.
    """
    settings = settings_for(decode_run_config(run_config.get("privacy", "")), household)
    own = None
    if settings is not None:
        own = resolve_round(
            settings,
            dataset_size=dataset_size,
            batch_size=int(config.get("batch-size", 32)),
            local_epochs=int(config.get("local-epochs", 1)),
            num_rounds=int(run_config.get("num-server-rounds", 1)),
            num_stages=num_stages,
        )
    if (own is None) != (sent is None) or (own is not None and own.to_dict() != sent.to_dict()):
        raise PrivacyError(
            f"household {household}: the train message's privacy settings {sent and sent.to_dict()} differ from "
            f"the data owner's own {own and own.to_dict()}; the run config 'privacy' decides, so restart the run "
            "with one run config for the server and the devices"
        )
    return own


def load_budget(context: Context, privacy: RoundPrivacy) -> PrivacyBudget:
    """Return the household's budget from ``context.state``, or a fresh one with no history.

    The target comes from `privacy`, the history from the state.

    Raises
    ------
    PrivacyError
        If the stored budget is not valid JSON or not a valid budget.
    """
    record = context.state.config_records.get(_BUDGET_RECORD)
    config = privacy.config
    history: list = []
    if record is not None:
        try:
            stored = loads_limited(str(record.get("json", "")))
        except ValueError as exc:
            raise PrivacyError(
                f"the privacy budget in context.state is not valid JSON: {exc}; a new run starts a new budget"
            ) from exc
        history = PrivacyBudget.from_dict(stored).history
    target = config.target_epsilon if config.target_epsilon is not None else float("inf")
    return PrivacyBudget(
        target_epsilon=target, target_delta=config.target_delta, accountant=config.accountant, history=history
    )


def save_budget(context: Context, budget: PrivacyBudget) -> None:
    """Store `budget` in ``context.state`` as JSON text (never pickle)."""
    context.state.config_records[_BUDGET_RECORD] = ConfigRecord({"json": budget.to_json()})


def private_batches(
    examples: tuple[torch.Tensor, torch.Tensor], privacy: RoundPrivacy
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return the round's Poisson-sampled mini-batches, `privacy.steps` of them.

    The sampling seed comes from the operating system, not from the run's
    seed: the accountant's amplification by sampling assumes that no one
    outside the household can tell which examples each step used.
    """
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return poisson_batches(
        examples[0], examples[1], sample_rate=privacy.config.sample_rate, steps=privacy.steps, generator=generator
    )


def privacy_metrics(budget: PrivacyBudget, privacy: RoundPrivacy, *, steps: int) -> dict[str, float | int]:
    """Return the reply metrics of a data owner that trained a DP round of `steps` steps."""
    config = privacy.config
    return {
        "privacy-epsilon": budget.spent(),
        "privacy-delta": budget.target_delta,
        "privacy-target-epsilon": budget.target_epsilon,
        "privacy-noise-multiplier": config.noise_multiplier,
        "privacy-sample-rate": config.sample_rate,
        "privacy-steps": steps,
    }


def declined_reply(msg: Message, decision: BudgetDecision, budget: PrivacyBudget) -> Message:
    """Build the data owner's status reply for a declined round: no arrays, no error."""
    metrics = MetricRecord(
        {
            "num-examples": 0,
            "stage": 0,
            "privacy-epsilon": decision.epsilon_spent,
            "privacy-delta": budget.target_delta,
            "privacy-target-epsilon": decision.target_epsilon,
        }
    )
    status = ConfigRecord({"status": decision.status, "message": decision.message})
    return Message(RecordDict({METRICS: metrics, PRIVACY_STATUS: status}), reply_to=msg)
