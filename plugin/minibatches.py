"""Seeded shuffling and batching of a data owner's examples.

The device ClientApp and the tests' unsplit reference both call `minibatches`,
so both see the same mini-batches in the same order for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["minibatches", "round_seed"]


def round_seed(seed: int, server_round: int) -> int:
    """Return the shuffling seed of one round, so every round sees a new order."""
    return seed * 1_000_003 + server_round


def minibatches(
    inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int, epochs: int = 1, seed: int | None = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` mini-batches for `epochs` passes over the examples.

    Parameters
    ----------
    inputs, targets : Tensor
        Examples along dim 0; equal lengths.
    batch_size : int
        Examples per mini-batch; the last one of an epoch may be smaller.
    epochs : int, default 1
        Passes over the examples.
    seed : int or None, default 0
        Seed of the per-epoch shuffle; None keeps the stored order (evaluation).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"inputs has {len(inputs)} examples but targets has {len(targets)}; pass matching tensors")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.arange(len(inputs)) if generator is None else torch.randperm(len(inputs), generator=generator)
        for chunk in order.split(batch_size):
            yield inputs[chunk], targets[chunk]
