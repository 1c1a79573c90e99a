"""Privacy accounting and the household's budget, on Opacus's accountants.

The mechanism of every step is the Poisson-subsampled Gaussian mechanism,
described by (noise multiplier sigma, sampling rate q). The default accountant
is Opacus's RDP accountant (Mironov 2017, "Renyi Differential Privacy";
subsampled Gaussian analysis of Mironov, Talwar, Zhang 2019); ``"prv"`` is
Opacus's PRV accountant (Gopi, Lee, Wutschitz 2021), which gives tighter
epsilon. History is plain data, a list of ``(sigma, q, steps)``, so a budget
persists as JSON, for example in Flower's ``Context.state``.
"""

from __future__ import annotations

import json
import logging
import math
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from homesplit.errors import PrivacyError
from homesplit.privacy.config import ACCOUNTANTS

__all__ = ["compute_epsilon", "calibrate_noise_multiplier", "merge_history", "BudgetDecision", "PrivacyBudget"]

logger = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]


def merge_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Return `history` with consecutive entries of equal sigma and q merged, and entries of 0 steps dropped."""
    merged: list[HistoryEntry] = []
    for sigma, q, steps in history:
        if int(steps) <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


def compute_epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """Return the epsilon that `history` spends at `delta`.

    Parameters
    ----------
    history : iterable of (sigma, q, steps)
        Noise multiplier, sampling rate and number of steps of each phase.
    delta : float
        Target delta.
    accountant : {"rdp", "prv"}, default "rdp"

    Returns
    -------
    float
        Epsilon; 0 for an empty history, ``inf`` if a phase has sigma 0.
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={accountant!r} is unknown; use one of {', '.join(ACCOUNTANTS)}")
    entries = merge_history(history)
    if not entries:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in entries):
        return math.inf
    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = list(entries)
    return float(opacus_accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the smallest sigma (to `epsilon_tolerance`) that keeps `steps` steps within `target_epsilon`.

    Uses Opacus's `get_noise_multiplier`. ``target_epsilon=inf`` returns 0 (no noise).

    Raises
    ------
    PrivacyError
        If no sigma up to Opacus's limit of 1e6 reaches the target.
    """
    if math.isinf(target_epsilon):
        return 0.0
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps,
                accountant=accountant, epsilon_tolerance=epsilon_tolerance,
            )
        )  # fmt: skip
    except ValueError as exc:
        raise PrivacyError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta {target_delta} with q={sample_rate} "
            f"over {steps} steps: {exc}; raise the budget, lower q or train fewer steps"
        ) from exc


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a round fits into the budget, for a status reply.

    Attributes
    ----------
    allowed : bool
        True if the round may run.
    status : {"ok", "budget_exhausted"}
    epsilon_spent : float
        Epsilon spent before the round.
    epsilon_after : float
        Epsilon the household would have spent after the round.
    target_epsilon : float
    message : str
        One sentence for logs and replies.
    """

    allowed: bool
    status: str
    epsilon_spent: float
    epsilon_after: float
    target_epsilon: float
    message: str


@dataclass
class PrivacyBudget:
    """A household's (epsilon, delta) budget and the rounds that spent it.

    Parameters
    ----------
    target_epsilon : float
        Epsilon the household never exceeds.
    target_delta : float
        Delta of every epsilon here.
    accountant : {"rdp", "prv"}, default "rdp"
    history : list of [sigma, q, steps], optional
        Steps already taken, oldest first.

    Examples
    --------
    The ClientApp of the data owner, before a round::

        budget = PrivacyBudget.from_dict(json.loads(state_text))
        decision = budget.check_round(noise_multiplier=1.1, sample_rate=0.01, steps=100)
        if not decision.allowed:
            ...  # reply with decision.status and decision.message
        ...  # train, then:
        budget.record_round(noise_multiplier=1.1, sample_rate=0.01, steps=steps_taken)
    """

    target_epsilon: float
    target_delta: float
    accountant: str = "rdp"
    history: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise PrivacyError(f"target_epsilon={self.target_epsilon} must be > 0")
        if not 0 < self.target_delta < 1:
            raise PrivacyError(f"target_delta={self.target_delta} must be in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant={self.accountant!r} is unknown; use one of {', '.join(ACCOUNTANTS)}")
        self.history = [list(entry) for entry in merge_history(self.history)]

    def spent(self) -> float:
        """Return the epsilon spent so far."""
        return compute_epsilon(self.history, delta=self.target_delta, accountant=self.accountant)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Return the total epsilon after `steps` more steps at (`noise_multiplier`, `sample_rate`)."""
        planned = [*self.history, [noise_multiplier, sample_rate, steps]]
        return compute_epsilon(planned, delta=self.target_delta, accountant=self.accountant)

    def check_round(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> BudgetDecision:
        """Decide whether a round of `steps` DP steps stays within the target; changes nothing.

        `steps` is the number of steps the round will take at most (for
        Poisson sampling, every mini-batch counts, empty ones too; in
        household mode, 1).
        """
        spent = self.spent()
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if after <= self.target_epsilon:
            message = f"round brings epsilon from {spent:.4g} to {after:.4g} of {self.target_epsilon:.4g}"
            return BudgetDecision(True, "ok", spent, after, self.target_epsilon, message)
        message = (
            f"round declined: {steps} steps at sigma {noise_multiplier:.4g}, q {sample_rate:.4g} would bring epsilon "
            f"from {spent:.4g} to {after:.4g}, above the target {self.target_epsilon:.4g} at delta {self.target_delta:g}"
        )
        logger.warning("%s", message)
        return BudgetDecision(False, "budget_exhausted", spent, after, self.target_epsilon, message)

    def record_round(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Add the steps a round actually took to the history and return the new total epsilon."""
        self.history = [list(e) for e in merge_history([*self.history, [noise_multiplier, sample_rate, steps]])]
        return self.spent()

    def to_dict(self) -> dict[str, Any]:
        """Return the budget as JSON-friendly data that `from_dict` reads back."""
        return {
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "accountant": self.accountant,
            "history": [list(e) for e in self.history],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrivacyBudget:
        """Rebuild a budget from `to_dict` output.

        Raises
        ------
        PrivacyError
            If `raw` is not a mapping, has unknown or missing keys, or has invalid values.
        """
        known = {"target_epsilon", "target_delta", "accountant", "history"}
        if not isinstance(raw, dict):
            raise PrivacyError(f"privacy budget {reprlib.repr(raw)} is invalid; allowed: a mapping with keys {sorted(known)}")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyError(f"unknown privacy budget keys {unknown}; allowed keys are {sorted(known)}")
        try:
            return cls(**raw)
        except PrivacyError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # History entries that are not (sigma, q, steps) numbers raise ValueError or OverflowError.
            raise PrivacyError(f"invalid privacy budget {reprlib.repr(raw)}: {exc}") from exc

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(self.to_dict())
