"""Models and losses that privacy tests hand to stage processes by ``module:function`` name.

Stage processes import this module through PYTHONPATH (see `STAGE_ENV`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

STAGE_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def batchnorm_mlp(*, in_features: int = 32, hidden: int = 16, classes: int = 10) -> nn.Sequential:
    """Build an MLP with a BatchNorm1d at index 3, which DP must reject."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def zero_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return a loss whose gradient is exactly zero, so only DP noise moves the weights."""
    return output.sum() * 0.0
