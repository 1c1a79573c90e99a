"""Sample-level DP-SGD on one pipeline stage (Abadi et al. 2016, "Deep Learning with Differential Privacy").

`SampleDPHook` is a `homesplit.stage.StageHook`. Between a mini-batch's last
backward and the optimizer step it replaces the segment's gradient with the
DP-SGD gradient, so that across all stages the result equals what Opacus's
DPOptimizer computes for the unsplit model under Poisson sampling:

1. Per-sample gradients of the segment come from `PerSampleGradients`.
2. The runtime scales each micro-batch's mean loss by ``b_i / B``, so each
   sample's gradient arrives multiplied by ``1 / B``. The hook scales norms
   and sums by ``B``, which gives the per-sample gradients of the summed loss.
3. Whole-model clipping: each sample's squared norm is summed over all
   segments through the household links, and every stage scales the sample by
   ``min(1, C / (norm + 1e-6))``, the factor of Opacus's DPOptimizer.
   Per-segment clipping uses the segment's own norm and bound instead.
4. Gaussian noise with std ``sigma * C`` per coordinate is added once per
   mini-batch (never per micro-batch); C is ``sqrt(sum C_k^2)`` with
   per-segment bounds. Each stage draws its own independent noise.
5. The sum is divided by the expected batch size, not the actual one, as
   Opacus does under Poisson sampling.

An empty mini-batch is still a DP step: Opacus 1.6 clips an empty batch to a
zero sum, adds noise and calls the optimizer, and the accountant counts the
step. The hook does the same, so its ``steps_on_empty_batch`` attribute asks
the runtime to call it and to step the optimizer on empty mini-batches.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import torch
from torch import nn

from homesplit.errors import PrivacyError
from homesplit.privacy.config import PrivacyConfig
from homesplit.privacy.exchange import TAG_SAMPLE_NORMS, StageLinks, sum_over_stages
from homesplit.privacy.per_sample import PerSampleGradients

__all__ = ["SampleDPHook", "noise_generator"]

logger = logging.getLogger(__name__)

# Opacus's DPOptimizer adds this to every per-sample norm before dividing.
_NORM_EPSILON = 1e-6


def noise_generator(seed: int | None, *, stage: int, round: int) -> torch.Generator:
    """Return a generator for one stage's noise: seeded from (`seed`, round, stage), or from the OS if `seed` is None."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    state = np.random.SeedSequence([int(seed), int(round), int(stage)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class SampleDPHook:
    """Clip per-sample gradients over the whole model and add noise once per step, on one stage.

    Parameters
    ----------
    segment : nn.Module
        The stage's segment, already validated with `check_segment`.
    config : PrivacyConfig
        Settings with ``mode="sample"``.
    stage : int
        This stage's index.
    num_stages : int
        Number of stages in the pipeline.
    round : int, default 0
        Federated round; seeds the noise together with ``config.noise_seed``.

    Attributes
    ----------
    steps : int
        DP steps taken, empty mini-batches included; the accountant's step count.
    samples : int
        Samples clipped so far.
    clipped : int
        Samples whose gradient was scaled down by clipping.
    """

    steps_on_empty_batch = True

    def __init__(self, segment: nn.Module, config: PrivacyConfig, *, stage: int, num_stages: int, round: int = 0) -> None:
        if config.mode != "sample":
            raise PrivacyError(f"SampleDPHook needs mode 'sample', got {config.mode!r}")
        self.config = config
        self.stage = stage
        self.whole_model = config.clipping == "whole_model" and num_stages > 1
        self.max_grad_norm = config.clip_bounds(num_stages)[stage]
        self.noise_std = config.noise_multiplier * config.sensitivity(num_stages)
        self.expected_batch_size = float(config.expected_batch_size)
        self.per_sample = PerSampleGradients(segment)
        self.generator = noise_generator(config.noise_seed, stage=stage, round=round)
        self.steps = 0
        self.samples = 0
        self.clipped = 0

    def before_step(self, runner: StageLinks, *, batch_size: int, step: int) -> None:
        """Replace every parameter's ``.grad`` with its clipped, noised and averaged DP-SGD gradient.

        Raises
        ------
        PrivacyError
            If the per-sample gradients do not cover `batch_size` samples.
        LinkError, ScheduleError
            If the exchange of per-sample norms with the other stages fails.
        """
        grad_samples = self.per_sample.take()
        params = self.per_sample.parameters
        if batch_size == 0:
            sums = [torch.zeros_like(p) for p in params]
        else:
            sums = self._clipped_sums(runner, grad_samples, batch_size=batch_size, step=step)

        for param, total in zip(params, sums):
            # NOTE: plain torch.normal, without Opacus's secure_mode defence against floating-point attacks.
            if self.noise_std > 0:
                total = total + torch.normal(
                    0.0, self.noise_std, size=param.shape, generator=self.generator, dtype=param.dtype
                )
            param.grad = (total / self.expected_batch_size).view_as(param)
        self.steps += 1

    def _clipped_sums(self, runner: StageLinks, grad_samples: list[list[torch.Tensor]], *, batch_size: int, step: int):
        params = self.per_sample.parameters
        sizes = [part.shape[0] for part in grad_samples[0]] if grad_samples else []
        if sum(sizes) != batch_size:
            raise PrivacyError(
                f"stage {self.stage} has per-sample gradients for {sum(sizes)} samples, but the mini-batch has {batch_size}"
            )

        # The runtime's loss is the mini-batch mean, so every per-sample gradient
        # arrives divided by the batch size. Norms and sums are scaled back,
        # because scaling the large per-sample tensors would copy them.
        squared = torch.zeros(batch_size, dtype=torch.float64)
        for parts in grad_samples:
            norms = torch.cat([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in parts])
            squared += norms.to(torch.float64).square()
        squared *= float(batch_size) ** 2
        if self.whole_model:
            squared = sum_over_stages(runner, squared, step=step, tag=TAG_SAMPLE_NORMS)

        factor = (self.max_grad_norm / (squared.sqrt() + _NORM_EPSILON)).clamp(max=1.0)
        self.samples += batch_size
        self.clipped += int((factor < 1.0).sum())

        weights = (factor * batch_size).split(sizes)
        sums = []
        for param, parts in zip(params, grad_samples):
            total = torch.zeros(param.numel(), dtype=param.dtype)
            for weight, g in zip(weights, parts):
                total += weight.to(g.dtype) @ g.reshape(g.shape[0], -1)
            sums.append(total.view_as(param))
        return sums

    def report(self) -> dict[str, float | int | str]:
        """Return what this stage did for the privacy accounting, as JSON-friendly numbers."""
        return {
            "mode": "sample",
            "noise_multiplier": self.config.noise_multiplier,
            "sample_rate": self.config.sample_rate,
            "steps": self.steps,
            "samples": self.samples,
            "clipped_fraction": self.clipped / self.samples if self.samples else 0.0,
        }

    def close(self) -> None:
        """Remove the per-sample hooks from the segment."""
        self.per_sample.remove()
