"""Synthetic, seeded data sets for tests and benchmarks.

Each factory returns a list of ``(inputs, targets)`` mini-batches and depends
only on its arguments, so a stage process and a reference trainer that call it
with the same arguments see the same data in the same order.
"""

from __future__ import annotations

import torch

__all__ = ["random_classification", "random_images", "random_tokens"]


def _batch_sizes(
    generator: torch.Generator, steps: int, batch_size: int, varying: bool, sizes: list[int] | None = None
) -> list[int]:
    if sizes is not None:
        return list(sizes)
    if not varying:
        return [batch_size] * steps
    # Sizes from 0 to 2B, so some steps are empty and some are larger than B.
    return [int(torch.randint(0, 2 * batch_size + 1, (1,), generator=generator)) for _ in range(steps)]


def random_classification(
    *, steps: int = 5, batch_size: int = 16, features: int = 32, classes: int = 10, seed: int = 0, varying: bool = False,
    sizes: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return Gaussian feature vectors with random class labels.

    Parameters
    ----------
    varying : bool, default False
        Draw every mini-batch size uniformly from 0 to ``2 * batch_size``, as
        Poisson sampling would vary it, empty batches included.
    sizes : list of int, optional
        Explicit mini-batch sizes, one per step; overrides `steps`,
        `batch_size` and `varying`. The other factories take it too.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in _batch_sizes(generator, steps, batch_size, varying, sizes):
        x = torch.randn(size, features, generator=generator)
        y = torch.randint(0, classes, (size,), generator=generator)
        batches.append((x, y))
    return batches


def random_images(
    *, steps: int = 5, batch_size: int = 16, classes: int = 10, seed: int = 0, varying: bool = False,
    sizes: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return random 1x8x8 images with random class labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, classes, (size,), generator=generator))
        for size in _batch_sizes(generator, steps, batch_size, varying, sizes)
    ]


def random_tokens(
    *, steps: int = 5, batch_size: int = 16, length: int = 12, vocab: int = 64, classes: int = 4, seed: int = 0,
    varying: bool = False, sizes: list[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return random token sequences with trailing padding (token 0) and random labels.

    Every sequence keeps at least two real tokens, so no row is all padding.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in _batch_sizes(generator, steps, batch_size, varying, sizes):
        tokens = torch.randint(1, vocab, (size, length), generator=generator)
        lengths = torch.randint(2, length + 1, (size,), generator=generator)
        tokens[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
        batches.append((tokens, torch.randint(0, classes, (size,), generator=generator)))
    return batches
