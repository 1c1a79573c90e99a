"""Differential privacy settings as plain, JSON-friendly data.

A `PipelineJob` carries them as its ``privacy`` dict and a Flower
ConfigRecord can carry the same dict, so every stage of a household builds
the same settings with `PrivacyConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from homesplit.errors import PrivacyError

__all__ = ["PrivacyConfig", "MODES", "CLIPPINGS", "NOISE_PLACEMENTS", "ACCOUNTANTS"]

MODES = ("sample", "household")
CLIPPINGS = ("whole_model", "per_segment")
NOISE_PLACEMENTS = ("local", "central")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Differential privacy settings of a household: the mode, the noise and the clipping bound.

    Parameters
    ----------
    mode : {"sample", "household"}
        ``"sample"``: DP-SGD, each training example is protected (Abadi et al.
        2016). ``"household"``: the round update of the whole household is
        clipped and noised, so the household as a whole is protected
        (user-level DP-FedAvg, McMahan et al. 2018).
    noise_multiplier : float
        sigma; the Gaussian noise has std ``sigma * C`` per coordinate, where C
        is the clipping bound. 0 turns noise off (no privacy, for tests).
    max_grad_norm : float or list of float
        C. In mode "sample", the bound on each example's gradient L2 norm; with
        ``clipping="per_segment"`` a list with one bound per stage. In mode
        "household", the bound on the L2 norm of the household's round update.
    sample_rate : float
        q in (0, 1]. Mode "sample": probability that Poisson sampling puts an
        example into a mini-batch, ``expected_batch_size / dataset_size``. Mode
        "household": probability that the server picks the household in a round.
    expected_batch_size : float, optional
        Expected mini-batch size in samples; the noised gradient sum is divided
        by it, as Opacus's DPOptimizer does under Poisson sampling. Required in
        mode "sample".
    clipping : {"whole_model", "per_segment"}, default "whole_model"
        Whole-model clipping exchanges per-sample squared norms between the
        stages; per-segment clipping clips each segment to its own bound
        without any exchange.
    noise : {"local", "central"}, default "local"
        Mode "household" only: add the noise on the devices before the update
        leaves the household, or leave it to the server, which then must be
        trusted.
    noise_seed : int, optional
        Seed of the noise generators, for tests only. None draws a fresh seed
        from the operating system.
    fix_modules : bool, default False
        Replace layers that Opacus cannot train privately (BatchNorm becomes
        GroupNorm) instead of rejecting them.
    accountant : {"rdp", "prv"}, default "rdp"
        Opacus accountant for epsilon.
    target_epsilon : float, optional
        Household budget; None means no budget is enforced.
    target_delta : float, default 1e-5
    """

    mode: str = "sample"
    noise_multiplier: float
    max_grad_norm: float | list[float]
    sample_rate: float
    expected_batch_size: float | None = None
    clipping: str = "whole_model"
    noise: str = "local"
    noise_seed: int | None = None
    fix_modules: bool = False
    accountant: str = "rdp"
    target_epsilon: float | None = None
    target_delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("clipping", self.clipping, CLIPPINGS)
        _check_choice("noise", self.noise, NOISE_PLACEMENTS)
        _check_choice("accountant", self.accountant, ACCOUNTANTS)
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise_multiplier={self.noise_multiplier} must be a finite number >= 0")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate={self.sample_rate} must be in (0, 1]")
        if not 0 < self.target_delta < 1:
            raise PrivacyError(f"target_delta={self.target_delta} must be in (0, 1)")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyError(f"target_epsilon={self.target_epsilon} must be > 0, or None for no budget")
        bounds = self.max_grad_norm if isinstance(self.max_grad_norm, list) else [self.max_grad_norm]
        if not bounds or not all(b > 0 and math.isfinite(b) for b in bounds):
            raise PrivacyError(f"max_grad_norm={self.max_grad_norm} must be finite and > 0")
        if isinstance(self.max_grad_norm, list) != (self.mode == "sample" and self.clipping == "per_segment"):
            raise PrivacyError(
                f"max_grad_norm={self.max_grad_norm}: give a list with one bound per stage exactly when "
                "mode='sample' and clipping='per_segment', and one number otherwise"
            )
        if self.mode == "sample" and not (self.expected_batch_size and self.expected_batch_size > 0):
            raise PrivacyError(
                f"expected_batch_size={self.expected_batch_size} must be > 0 in mode 'sample'; "
                "use sample_rate * dataset_size"
            )

    def clip_bounds(self, num_stages: int) -> list[float]:
        """Return the clipping bound of each stage (the same C on all of them for whole-model clipping).

        Raises
        ------
        PrivacyError
            If a per-segment list does not have `num_stages` entries.
        """
        if not isinstance(self.max_grad_norm, list):
            return [float(self.max_grad_norm)] * num_stages
        if len(self.max_grad_norm) != num_stages:
            raise PrivacyError(f"max_grad_norm has {len(self.max_grad_norm)} bounds but the pipeline has {num_stages} stages")
        return [float(b) for b in self.max_grad_norm]

    def sensitivity(self, num_stages: int) -> float:
        """Return the L2 bound on one example's whole-model gradient, which scales the noise.

        With per-segment bounds ``C_k`` the whole gradient is bounded by
        ``sqrt(sum C_k^2)``, as in Opacus's per-layer clipping.
        """
        if not isinstance(self.max_grad_norm, list):
            return float(self.max_grad_norm)
        return math.sqrt(sum(b * b for b in self.clip_bounds(num_stages)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrivacyConfig:
        """Build settings from a plain dict, such as a job's ``privacy`` entry.

        Raises
        ------
        PrivacyError
            On unknown or missing keys and invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyError(f"unknown privacy keys {unknown}; allowed keys are {sorted(known)}")
        try:
            return cls(**raw)
        except (TypeError, OverflowError) as exc:
            # math.isfinite raises OverflowError on an integer beyond the float range, which JSON allows.
            raise PrivacyError(f"invalid privacy settings {raw}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-friendly dict that `from_dict` reads back."""
        return dataclasses.asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrivacyError(f"{name}={value!r} is unknown; use one of {', '.join(choices)}")
