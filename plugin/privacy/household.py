"""Household-level DP: clip and noise the whole round update of a household.

This is user-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018) with the
household as the user. The update of a round is the difference between a
segment's weights after and before the round. The L2 norm is taken over the
household's whole update, all segments together, so the stages exchange their
squared norms over the links. Each stage scales its segment's update by
``min(1, S / (norm + 1e-6))``. With local noise each stage then adds Gaussian
noise of std ``sigma * S`` per coordinate before the update leaves the
household. With central noise the server adds it to the sum of the clipped
updates, and the household must trust the server.

The guarantee covers everything one household contributes to a round, and the
accountant composes rounds with the household sampling rate (the chance that
the server picks the household in a round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from homesplit.errors import PrivacyError
from homesplit.privacy.config import PrivacyConfig
from homesplit.privacy.exchange import TAG_UPDATE_NORM, StageLinks, sum_over_stages
from homesplit.privacy.sample_dp import noise_generator

__all__ = [
    "update_of",
    "squared_norm",
    "clip_factor",
    "clip_update",
    "add_update_noise",
    "central_noise_std",
    "HouseholdDPHook",
]

logger = logging.getLogger(__name__)

_NORM_EPSILON = 1e-6


def update_of(initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``final - initial`` for every floating-point tensor in `final`.

    Raises
    ------
    PrivacyError
        If `initial` lacks a key of `final`.
    """
    missing = sorted(set(final) - set(initial))
    if missing:
        raise PrivacyError(f"the initial weights lack {missing[:5]}, so the round update cannot be computed")
    return {k: final[k] - initial[k] for k in final if final[k].is_floating_point()}


def squared_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Return the squared L2 norm of all tensors in `update` together, summed in float64."""
    return float(sum(t.detach().to(torch.float64).pow(2).sum() for t in update.values()))


def clip_factor(total_norm: float, *, max_norm: float) -> float:
    """Return ``min(1, max_norm / (total_norm + 1e-6))``, the scale that bounds the update's norm by `max_norm`."""
    if not max_norm > 0:
        raise PrivacyError(f"max_norm={max_norm} must be > 0")
    return min(1.0, max_norm / (total_norm + _NORM_EPSILON))


def clip_update(update: Mapping[str, torch.Tensor], *, total_norm: float, max_norm: float) -> dict[str, torch.Tensor]:
    """Scale `update`, this stage's share of an update whose whole norm is `total_norm`, to norm at most `max_norm`."""
    factor = clip_factor(total_norm, max_norm=max_norm)
    return {k: t * factor for k, t in update.items()}


def add_update_noise(
    update: Mapping[str, torch.Tensor], *, noise_multiplier: float, max_norm: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Add Gaussian noise of std ``noise_multiplier * max_norm`` to every coordinate of `update`."""
    std = noise_multiplier * max_norm
    if std == 0:
        return dict(update)
    return {k: t + torch.normal(0.0, std, size=t.shape, generator=generator, dtype=t.dtype) for k, t in update.items()}


def central_noise_std(*, noise_multiplier: float, max_norm: float, expected_households: float) -> float:
    """Return the std per coordinate that the server adds to the mean of clipped household updates.

    The server must sum the clipped updates unweighted and divide by the
    expected number of households per round, a fixed number. Weighting by
    example counts would let one household's contribution exceed the bound.
    """
    if not expected_households > 0:
        raise PrivacyError(f"expected_households={expected_households} must be > 0")
    return noise_multiplier * max_norm / expected_households


class HouseholdDPHook:
    """Clip (and with local noise, noise) one stage's share of the household's round update.

    Parameters
    ----------
    config : PrivacyConfig
        Settings with ``mode="household"``; ``max_grad_norm`` is the bound S on
        the update norm.
    stage : int
        This stage's index.
    round : int, default 0
        Federated round; seeds the noise together with ``config.noise_seed``.
    """

    def __init__(self, config: PrivacyConfig, *, stage: int, round: int = 0) -> None:
        if config.mode != "household":
            raise PrivacyError(f"HouseholdDPHook needs mode 'household', got {config.mode!r}")
        self.config = config
        self.stage = stage
        self.generator = noise_generator(config.noise_seed, stage=stage, round=round)
        self.update_norm: float | None = None

    def before_step(self, runner: StageLinks, *, batch_size: int, step: int) -> None:
        """Do nothing: household-level DP acts once per round, in `finish_round`."""

    def finish_round(
        self, runner: StageLinks, initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return the weights to send: `initial` plus the clipped, possibly noised update.

        Every stage must call this after the round's last step while the links
        are still open, because the squared norms travel over them.
        """
        update = update_of(initial, final)
        own = torch.tensor([squared_norm(update)], dtype=torch.float64)
        total = float(sum_over_stages(runner, own, step=0, tag=TAG_UPDATE_NORM)[0])
        self.update_norm = math.sqrt(total)
        clipped = clip_update(update, total_norm=self.update_norm, max_norm=float(self.config.max_grad_norm))
        if self.config.noise == "local":
            clipped = add_update_noise(
                clipped,
                noise_multiplier=self.config.noise_multiplier,
                max_norm=float(self.config.max_grad_norm),
                generator=self.generator,
            )
        logger.info(
            "Stage %d: household update norm %.4g, bound %.4g, noise %s",
            self.stage, self.update_norm, self.config.max_grad_norm, self.config.noise,
        )  # fmt: skip
        result = dict(final)
        for key, delta in clipped.items():
            result[key] = initial[key] + delta
        return result

    def report(self) -> dict[str, float | str | None]:
        """Return what this stage did for the privacy accounting, as JSON-friendly numbers."""
        return {
            "mode": "household",
            "noise": self.config.noise,
            "noise_multiplier": self.config.noise_multiplier,
            "sample_rate": self.config.sample_rate,
            "steps": 1,
            "update_norm": self.update_norm,
        }
