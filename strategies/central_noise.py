"""Central noise for household-level DP: the server's half of user-level DP-FedAvg.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018) sample each user with probability q, clip each
user's update to L2 norm C, and release

    (sum of the clipped updates + N(0, (sigma * C)^2 I)) / (q * W)

with a denominator fixed before sampling. That is their fixed-denominator
estimator with all weights 1, so ``q * W`` is the expected number of sampled
users. Adding or removing one household changes the sum by at most C in L2
norm. So each round is a subsampled Gaussian mechanism with noise multiplier
sigma and sampling rate q, which is what each data owner's accountant
records. Dividing by a number that depends neither on the sample nor on the
updates is post-processing.

Here each household h has its own q_h, sigma_h and C_h. The expected number
of households is ``sum q_h`` over the households that could train this round,
and the noise on the sum has std ``max sigma_h * C_h``. That std is at least
every household's own ``sigma_h * C_h``, so every household's accountant, run
with its own sigma_h, overstates its epsilon rather than understating it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from homesplit.errors import PrivacyError
from homesplit.privacy.config import PrivacyConfig
from homesplit.privacy.household import central_noise_std, clip_factor
from homesplit.strategies.aggregation import HouseholdOutcome

__all__ = ["CentralNoise", "central_noise_for", "poisson_households", "noised_sum"]

logger = logging.getLogger(__name__)

# A household's update may exceed its bound by float32 rounding of the weights it sends.
_ROUNDING_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CentralNoise:
    """The central noise of one round, fixed before households are sampled.

    Attributes
    ----------
    bounds : dict of str to float
        Household id to the clipping bound C_h of its round update.
    sample_rates : dict of str to float
        Household id to the probability q_h that it trains in the round.
    noise_std : float
        Std of the Gaussian noise on the sum of the clipped updates, per
        coordinate: the largest ``sigma_h * C_h``.
    expected_households : float
        ``sum q_h``, the fixed denominator.
    """

    bounds: dict[str, float]
    sample_rates: dict[str, float]
    noise_std: float
    expected_households: float

    @property
    def mean_noise_std(self) -> float:
        """Std per coordinate of the noise on the released mean update."""
        return self.noise_std / self.expected_households


def central_noise_for(configs: Mapping[str, PrivacyConfig]) -> CentralNoise:
    """Return the round's `CentralNoise` for the households that could train, keyed by household id.

    Raises
    ------
    PrivacyError
        If `configs` is empty or a household's settings are not household-level DP with central noise.
    """
    if not configs:
        raise PrivacyError("central noise needs at least one household that could train this round")
    for household, config in configs.items():
        if config.mode != "household" or config.noise != "central":
            raise PrivacyError(
                f"household {household} has mode={config.mode!r}, noise={config.noise!r}; central noise needs "
                "mode 'household' and noise 'central' in every household"
            )
    expected = sum(config.sample_rate for config in configs.values())
    # central_noise_std gives the std on the mean; times the denominator it is sigma_h * C_h.
    std = max(
        central_noise_std(noise_multiplier=c.noise_multiplier, max_norm=float(c.max_grad_norm), expected_households=1.0)
        for c in configs.values()
    )
    return CentralNoise(
        bounds={h: float(c.max_grad_norm) for h, c in configs.items()},
        sample_rates={h: c.sample_rate for h, c in configs.items()},
        noise_std=std,
        expected_households=expected,
    )


def poisson_households(noise: CentralNoise, rng: random.Random) -> list[str]:
    """Return the households that train, each picked independently with its sample rate (Poisson sampling)."""
    return [household for household in sorted(noise.sample_rates) if rng.random() < noise.sample_rates[household]]


def noised_sum(
    current: ArrayRecord, outcomes: Iterable[HouseholdOutcome], *, noise: CentralNoise, generator: np.random.Generator
) -> ArrayRecord:
    """Return `current` plus the noised sum of the households' clipped updates over the expected household count.

    Each update is the household's returned arrays minus `current`, over the
    floating-point arrays of `current`. An array that a household did not
    return counts as a zero update. The server clips every update to its
    household's bound again, in float64. For a household that clipped as it
    should, this changes nothing beyond float32 rounding. A larger update is
    logged as a WARNING and clipped, so the sensitivity stays at the bound
    whatever the devices sent. Noise is drawn once per array of `current`,
    even when no household trained, because skipping it would reveal that no
    household was sampled.

    Parameters
    ----------
    current : ArrayRecord
        Global arrays that the households started the round from.
    outcomes : iterable of HouseholdOutcome
        Households whose stages all succeeded; each must be in ``noise.bounds``.
    noise : CentralNoise
        The round's noise settings.
    generator : numpy.random.Generator
        Source of the noise.

    Raises
    ------
    PrivacyError
        If a household has no bound in `noise`.
    """
    start = {name: array.numpy() for name, array in current.items()}
    sums = {name: np.zeros(value.shape, dtype=np.float64) for name, value in start.items() if _is_float(value)}
    for outcome in outcomes:
        if outcome.household not in noise.bounds:
            raise PrivacyError(f"household {outcome.household} trained but has no central-noise bound this round")
        update = _update(outcome, start, sums)
        _add_clipped(sums, update, household=outcome.household, bound=noise.bounds[outcome.household])

    result = ArrayRecord()
    for name, value in start.items():
        if name not in sums:
            result[name] = Array(value)
            continue
        mean = sums[name] / noise.expected_households
        mean += generator.normal(0.0, noise.mean_noise_std, size=value.shape)
        result[name] = Array((value.astype(np.float64) + mean).astype(value.dtype))
    return result


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def _update(outcome: HouseholdOutcome, start: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    update = {}
    for name, value in outcome.arrays.items():
        if name not in sums:
            logger.warning("Ignoring array %r from household %s because it is not a floating-point array of the global model", name, outcome.household)
            continue
        update[name] = value.astype(np.float64).reshape(start[name].shape) - start[name].astype(np.float64)
    return update


def _add_clipped(sums: dict[str, np.ndarray], update: Mapping[str, np.ndarray], *, household: str, bound: float) -> None:
    norm = math.sqrt(sum(float(np.square(u).sum()) for u in update.values()))
    if norm > bound * (1 + _ROUNDING_TOLERANCE):
        logger.warning("Household %s sent an update of norm %.6g above its bound %.6g; the server clips it", household, norm, bound)
    factor = clip_factor(norm, max_norm=bound)
    for name, delta in update.items():
        sums[name] += delta * factor
