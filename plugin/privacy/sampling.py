"""Poisson sampling of mini-batches on the data owner, as DP-SGD's accounting assumes.

Each example joins each mini-batch independently with probability q, so a
mini-batch has ``q * N`` examples on average, varies in size and may be empty.
The indices come from Opacus's `UniformWithReplacementSampler`, the sampler
behind its `DPDataLoader`, so the sampling is the one its RDP and PRV
accountants analyse.
"""

from __future__ import annotations

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

__all__ = ["poisson_batches", "poisson_classification"]


def poisson_batches(
    inputs: torch.Tensor, targets: torch.Tensor, *, sample_rate: float, steps: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return `steps` Poisson-sampled mini-batches of ``(inputs, targets)``.

    Parameters
    ----------
    inputs, targets : torch.Tensor
        The household's whole data set, examples in dim 0.
    sample_rate : float
        q, the probability that an example joins a mini-batch.
    steps : int
        Number of mini-batches.
    generator : torch.Generator
        Source of the sampling randomness.

    Returns
    -------
    list of (Tensor, Tensor)
        Mini-batches; an empty one has shape ``(0, ...)``.
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(inputs), sample_rate=sample_rate, generator=generator, steps=steps
    )
    batches = []
    for indices in sampler:
        index = torch.as_tensor(indices, dtype=torch.long)
        batches.append((inputs[index], targets[index]))
    return batches


def poisson_classification(
    *, dataset_size: int = 256, sample_rate: float = 0.0625, steps: int = 5, features: int = 32, classes: int = 10,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return Poisson-sampled mini-batches of a seeded synthetic classification data set.

    A data factory for `homesplit.job.PipelineJob`: the data set is Gaussian
    feature vectors with random labels, ``dataset_size`` examples, and the
    same arguments always give the same mini-batches.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(dataset_size, features, generator=generator)
    targets = torch.randint(0, classes, (dataset_size,), generator=generator)
    return poisson_batches(inputs, targets, sample_rate=sample_rate, steps=steps, generator=generator)
