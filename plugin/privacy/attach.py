"""Turn a job's ``privacy`` dict into a validated segment and its stage hooks."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from homesplit.privacy.config import PrivacyConfig
from homesplit.privacy.household import HouseholdDPHook
from homesplit.privacy.sample_dp import SampleDPHook
from homesplit.privacy.validation import check_segment

__all__ = ["prepare_stage"]

logger = logging.getLogger(__name__)


def prepare_stage(
    privacy: dict[str, Any], segment: nn.Module, *, stage: int, num_stages: int, round: int = 0
) -> tuple[nn.Module, list[Any]]:
    """Validate (or fix) `segment` for DP and build this stage's privacy hook.

    Call before loading the segment's weights and before building its
    optimizer, because fixing a layer replaces its parameters.

    Parameters
    ----------
    privacy : dict
        Keys of `PrivacyConfig`.
    segment : nn.Module
        This stage's segment.
    stage, num_stages : int
        This stage's index and the pipeline's stage count.
    round : int, default 0
        Federated round, which seeds the noise.

    Returns
    -------
    tuple of (nn.Module, list)
        The segment to train (fixed if ``fix_modules`` asked for it) and the
        hooks to pass to `homesplit.stage.StageRunner`.

    Raises
    ------
    PrivacyError
        If the settings are invalid or a layer cannot be trained with DP.
    """
    config = PrivacyConfig.from_dict(privacy)
    if config.mode == "household":
        logger.info("Stage %d: household-level DP, bound %g, %s noise", stage, config.max_grad_norm, config.noise)
        return segment, [HouseholdDPHook(config, stage=stage, round=round)]

    segment = check_segment(segment, stage=stage, fix=config.fix_modules)
    hook = SampleDPHook(segment, config, stage=stage, num_stages=num_stages, round=round)
    logger.info(
        "Stage %d: sample-level DP-SGD, sigma %g, %s clipping at %g, expected batch %g",
        stage, config.noise_multiplier, config.clipping, hook.max_grad_norm, config.expected_batch_size,
    )  # fmt: skip
    return segment, [hook]
