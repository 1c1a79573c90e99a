"""Differential privacy for the updates that leave a household.

Two modes: ``"sample"`` runs DP-SGD across the pipeline (Abadi et al. 2016)
and protects each training example; ``"household"`` clips and noises the
household's round update (DP-FedAvg) and protects the household as a whole.
A job selects one with its ``privacy`` dict (see `PrivacyConfig`); the data
owner enforces a `PrivacyBudget` round by round.
"""

from homesplit.privacy.accounting import (
    BudgetDecision,
    PrivacyBudget,
    calibrate_noise_multiplier,
    compute_epsilon,
    merge_history,
)
from homesplit.privacy.config import PrivacyConfig

__all__ = [
    "PrivacyConfig",
    "PrivacyBudget",
    "BudgetDecision",
    "compute_epsilon",
    "calibrate_noise_multiplier",
    "merge_history",
]
