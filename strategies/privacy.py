"""`DPHomesplitStrategy`: HomesplitStrategy with per-household DP settings and budgets.

The data owner of each household enforces its budget (see
`homesplit.clients.privacy`). The strategy keeps a copy of every household's
history from the data owners' replies, so it can skip a household whose next
round would exceed its budget without sending it anything, and stop
training when no household can train. With central noise it also samples
the households and adds the noise (`homesplit.strategies.central_noise`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from homesplit.errors import HomesplitError
from homesplit.household_plan import HouseholdPlan
from homesplit.privacy.accounting import PrivacyBudget
from homesplit.privacy.settings import RoundPrivacy, check_central_noise, resolve_round, settings_for
from homesplit.records import CONFIG, METRICS, PRIVACY, PRIVACY_STATUS
from homesplit.strategies.aggregation import HouseholdOutcome
from homesplit.strategies.central_noise import CentralNoise, central_noise_for, noised_sum, poisson_households
from homesplit.strategies.strategy import HomesplitStrategy

__all__ = ["DPHomesplitStrategy"]

logger = logging.getLogger(__name__)


class DPHomesplitStrategy(HomesplitStrategy):
    """HomesplitStrategy that trains households with DP and respects their privacy budgets.

    Each round, every household with DP settings gets its `RoundPrivacy`
    (sigma, q, clipping bound, steps) in its train messages. A household is
    skipped, with a WARNING, once its next round would take its epsilon above
    its target, or once its data owner declined a round. When no household
    can train any more, training stops (logged as a WARNING): the remaining
    rounds send nothing and `evaluate_fn` is not called for them.

    With ``noise: central`` (mode household) the server is trusted and does
    user-level DP-FedAvg itself. Each household trains with probability equal
    to its ``sample-rate`` (Poisson sampling), so `fraction_train` and
    `min_train_households` do not apply to training. The new global model
    is the old one plus the sum of the clipped updates and Gaussian noise,
    divided by the expected number of households
    (`homesplit.strategies.central_noise.noised_sum`). Updates are not
    weighted by example counts.

    Parameters
    ----------
    privacy : mapping of str to dict
        Household id (``"*"`` for every household not named) to its settings,
        as `homesplit.privacy.settings.decode_run_config` returns them.
        Households without an entry train without DP, except in a run with
        central noise, where they are skipped with a WARNING.
    noise_seed : int or None, default None
        Seed of the household sampling and the noise in a run with central
        noise, for tests only. None seeds both from the operating system, so
        they cannot be predicted from the run config.
    **kwargs
        Arguments of `HomesplitStrategy`.

    Raises
    ------
    ConfigError
        If some households have central noise and others do not.

    Attributes
    ----------
    privacy_records : dict of int to dict
        Per round, per household that trained or declined: epsilon, delta,
        noise_multiplier, sample_rate, steps and status.
    stopped_after_round : int or None
        Last round in which a household trained, once training has stopped.
    """

    def __init__(self, *, privacy: Mapping[str, Mapping[str, Any]], noise_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.privacy = {household: dict(settings) for household, settings in privacy.items()}
        check_central_noise(self.privacy, where="DPHomesplitStrategy privacy")
        self.central = any(settings["noise"] == "central" for settings in self.privacy.values())
        self.noise_seed = noise_seed
        self._household_rng = random.Random(noise_seed) if noise_seed is not None else random.SystemRandom()
        self._central_noise: CentralNoise | None = None
        self._planned: dict[str, HouseholdPlan] = {}
        self._server_round = 0
        self.privacy_records: dict[int, dict[str, dict[str, Any]]] = {}
        self.stopped_after_round: int | None = None
        self._budgets: dict[str, PrivacyBudget] = {}
        self._round_privacy: dict[str, RoundPrivacy] = {}
        self._exhausted: dict[str, str] = {}
        self._num_rounds = 1
        self._train_config: Mapping[str, Any] = {}
        if self.central and (self.fraction_train != 1.0 or self.min_train_households != 1):
            logger.warning(
                "Central noise samples each household with its sample-rate; fraction_train=%g and "
                "min_train_households=%d do not apply to training",
                self.fraction_train, self.min_train_households,
            )  # fmt: skip

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any):
        """Run `HomesplitStrategy.start`, skipping centralized evaluation after training stopped.

        `num_rounds` also sets the run length that ``noise-multiplier: auto``
        calibrates sigma for.
        """
        self._num_rounds = num_rounds
        evaluate_fn: Callable | None = kwargs.get("evaluate_fn")
        if evaluate_fn is not None:

            def evaluate_until_stopped(server_round: int, arrays: ArrayRecord):
                if self.stopped_after_round is not None and server_round > self.stopped_after_round:
                    return None
                return evaluate_fn(server_round, arrays)

            kwargs["evaluate_fn"] = evaluate_until_stopped
        return super().start(grid, initial_arrays, num_rounds, **kwargs)

    def summary(self) -> None:
        """Log the strategy's configuration and each household's DP settings."""
        super().summary()
        for household, settings in sorted(self.privacy.items()):
            logger.info(
                "  privacy %s: mode %s, target epsilon %g at delta %g, sigma %s, C %s (%s clipping), %s noise, "
                "%s accountant",
                household, settings["mode"], settings["target-epsilon"], settings["target-delta"],
                settings["noise-multiplier"], settings["max-grad-norm"], settings["clipping"], settings["noise"],
                settings["accountant"],
            )  # fmt: skip

    # -- training -------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Plan the households whose budgets allow another round and send each its DP settings."""
        self._train_config = dict(config)
        self._server_round = server_round
        self._planned, self._central_noise = {}, None
        if self.stopped_after_round is not None:
            self._plans, self._outgoing = {}, []
            return []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # With Poisson sampling a round may send nothing while households could still train.
        if not self._planned and self.fraction_train > 0 and self._exhausted:
            self.stopped_after_round = server_round - 1
            logger.warning(
                "Round %d: no household can train, budgets spent %s; training stops after round %d",
                server_round, sorted(self._exhausted), self.stopped_after_round,
            )  # fmt: skip
            return []
        for household, _, message in self._outgoing:
            if household in self._round_privacy:
                message.content.config_records[CONFIG][PRIVACY] = json.dumps(self._round_privacy[household].to_dict())
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the data owners' epsilon, set declined households aside, then aggregate the rest."""
        if self.stopped_after_round is not None:
            return None, None
        replies = list(replies)
        sent = self._sent()
        declined = self._declined(server_round, replies, sent)
        remaining = [r for r in replies if sent.get(r.metadata.reply_to_message_id, ("",))[0] not in declined]
        self._plans = {h: p for h, p in self._plans.items() if h not in declined}
        arrays, metrics = super().aggregate_train(server_round, remaining)

        trained = set(self.round_records[server_round]["households_trained"])
        self._record_spending(server_round, remaining, sent, trained)
        self.round_records[server_round]["households_declined"] = sorted(declined)
        if metrics is not None and self.privacy_records.get(server_round):
            spent = [r["epsilon"] for r in self.privacy_records[server_round].values() if r["status"] == "ok"]
            if spent:
                metrics["privacy-epsilon-max"] = max(spent)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluate as `HomesplitStrategy` does, and not at all once training has stopped."""
        if self.stopped_after_round is not None:
            self._plans, self._outgoing = {}, []
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    # -- helpers --------------------------------------------------------------

    def _sample_for_training(self, plans: dict[str, HouseholdPlan]) -> dict[str, HouseholdPlan]:
        """Sample as `HomesplitStrategy` does, or with central noise, each household with its sample rate."""
        self._planned = plans
        if not self.central:
            return super()._sample_for_training(plans)
        if not plans:
            return {}
        self._central_noise = central_noise_for({h: self._round_privacy[h].config for h in plans})
        chosen = poisson_households(self._central_noise, self._household_rng)
        logger.info(
            "Round %d: %d of %d households sampled for training (expected %.3g); central noise std %.4g on the sum",
            self._server_round, len(chosen), len(plans), self._central_noise.expected_households,
            self._central_noise.noise_std,
        )  # fmt: skip
        return {household: plans[household] for household in chosen}

    def _aggregate_arrays(self, trained: list[HouseholdOutcome]) -> ArrayRecord | None:
        """Average as `HomesplitStrategy` does, or with central noise, release the noised sum of the clipped updates."""
        if self._central_noise is None or self._arrays is None:
            return super()._aggregate_arrays(trained)
        if self.noise_seed is None:
            generator = np.random.default_rng()
        else:
            generator = np.random.default_rng(np.random.SeedSequence([self.noise_seed, self._server_round]))
        return noised_sum(self._arrays, trained, noise=self._central_noise, generator=generator)

    def _plan_all(self) -> dict[str, HouseholdPlan]:
        """Plan every household, then drop those whose budget cannot afford the next round."""
        plans = super()._plan_all()
        allowed = {}
        for household, plan in plans.items():
            if household in self._exhausted:
                continue
            settings = settings_for(self.privacy, household)
            if settings is None and self.central:
                logger.warning(
                    "Household %s skipped: it has no privacy settings, but the server adds central noise to the sum "
                    "of clipped updates; give it mode household with noise central",
                    household,
                )  # fmt: skip
                continue
            if settings is None:
                allowed[household] = plan
                continue
            try:
                round_privacy = self._resolve(settings, plan)
            except HomesplitError as exc:
                logger.warning("Household %s skipped: its privacy settings cannot be used: %s", household, exc)
                continue
            budget = self._budget(household, round_privacy)
            decision = budget.check_round(
                noise_multiplier=round_privacy.config.noise_multiplier,
                sample_rate=round_privacy.config.sample_rate,
                steps=round_privacy.steps,
            )
            if not decision.allowed:
                self._exhausted[household] = decision.message
                logger.warning("Household %s skipped from now on: %s", household, decision.message)
                continue
            self._round_privacy[household] = round_privacy
            allowed[household] = plan
        return allowed

    def _resolve(self, settings: Mapping[str, Any], plan: HouseholdPlan) -> RoundPrivacy:
        return resolve_round(
            settings,
            dataset_size=plan.num_examples,
            batch_size=int(self._train_config.get("batch-size", 32)),
            local_epochs=int(self._train_config.get("local-epochs", 1)),
            num_rounds=self._num_rounds,
            num_stages=plan.num_stages,
        )

    def _budget(self, household: str, round_privacy: RoundPrivacy) -> PrivacyBudget:
        if household not in self._budgets:
            config = round_privacy.config
            self._budgets[household] = PrivacyBudget(
                target_epsilon=config.target_epsilon, target_delta=config.target_delta, accountant=config.accountant
            )
        return self._budgets[household]

    def _declined(self, server_round: int, replies: list[Message], sent: Mapping[str, tuple[str, str]]) -> dict[str, str]:
        """Return household to message for every data owner that replied with a budget status."""
        declined = {}
        for reply in replies:
            if reply.has_error() or PRIVACY_STATUS not in reply.content.config_records:
                continue
            household = sent.get(reply.metadata.reply_to_message_id, ("?",))[0]
            status = reply.content.config_records[PRIVACY_STATUS]
            declined[household] = str(status["message"])
            self._exhausted[household] = str(status["message"])
            metrics = reply.content.metric_records.get(METRICS, {})
            self.privacy_records.setdefault(server_round, {})[household] = {
                "status": str(status["status"]),
                "epsilon": float(metrics.get("privacy-epsilon", 0.0)),
                "delta": float(metrics.get("privacy-delta", 0.0)),
            }
            logger.warning("Round %d: household %s declined the round: %s", server_round, household, status["message"])
        return declined

    def _record_spending(
        self, server_round: int, replies: list[Message], sent: Mapping[str, tuple[str, str]], trained: set[str]
    ) -> None:
        """Store what each trained DP household's data owner reports and update the strategy's copy of its budget."""
        for reply in replies:
            if reply.has_error():
                continue
            household = sent.get(reply.metadata.reply_to_message_id, ("?",))[0]
            metrics = reply.content.metric_records.get(METRICS)
            if household not in trained or metrics is None or "privacy-epsilon" not in metrics:
                continue
            record = {
                "status": "ok",
                "epsilon": float(metrics["privacy-epsilon"]),
                "delta": float(metrics["privacy-delta"]),
                "target_epsilon": float(metrics["privacy-target-epsilon"]),
                "noise_multiplier": float(metrics["privacy-noise-multiplier"]),
                "sample_rate": float(metrics["privacy-sample-rate"]),
                "steps": int(metrics["privacy-steps"]),
            }
            self.privacy_records.setdefault(server_round, {})[household] = record
            budget = self._budgets.get(household)
            if budget is None:
                continue
            own = budget.record_round(
                noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"], steps=record["steps"]
            )
            if abs(own - record["epsilon"]) > 1e-6 * max(1.0, own):
                logger.warning(
                    "Round %d: household %s reports epsilon %.6g but the strategy's copy of its history gives %.6g",
                    server_round, household, record["epsilon"], own,
                )  # fmt: skip
            logger.info(
                "Round %d: household %s spent epsilon %.4g of %.4g (sigma %.4g, q %.4g, %d steps)",
                server_round, household, record["epsilon"], record["target_epsilon"], record["noise_multiplier"],
                record["sample_rate"], record["steps"],
            )  # fmt: skip
