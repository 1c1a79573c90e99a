"""Small reference models for tests, benchmarks and examples.

Each factory builds a model whose split is exact: no BatchNorm (its statistics
depend on how a mini-batch is cut into micro-batches) and no dropout (its
random masks differ between one process and several).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mlp", "groupnorm_cnn", "TinyTransformer", "tiny_transformer"]


def mlp(*, in_features: int = 32, hidden: int = 64, depth: int = 4, classes: int = 10) -> nn.Sequential:
    """Build an MLP of `depth` hidden Linear+ReLU pairs as an `nn.Sequential`."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def groupnorm_cnn(*, channels: int = 16, classes: int = 10, groups: int = 4) -> nn.Sequential:
    """Build a CNN for 1x8x8 images (scikit-learn digits) with GroupNorm, as an `nn.Sequential`.

    The layout is two blocks named ``features`` and ``classifier``, so cuts
    read like ``"features.3"``.
    """
    features = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(groups, channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(groups, 2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(groups, 2 * channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(2 * channels * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )
    return _named(features, classifier)


def _named(features: nn.Module, classifier: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("classifier", classifier)
    return model


class TinyTransformer(nn.Module):
    """A small transformer encoder classifier over token sequences.

    Embeddings, a learned positional table, `depth` encoder blocks and a
    classification head. Token 0 is padding: the padding mask is computed
    once from the tokens and crosses every cut together with the hidden
    states, which exercises boundaries that carry several tensors.

    Parameters
    ----------
    vocab : int, default 64
        Vocabulary size.
    dim : int, default 32
        Model width.
    heads : int, default 4
        Attention heads per block.
    depth : int, default 2
        Number of encoder blocks.
    max_len : int, default 16
        Maximum sequence length.
    classes : int, default 4
        Output classes.
    """

    def __init__(
        self, *, vocab: int = 64, dim: int = 32, heads: int = 4, depth: int = 2, max_len: int = 16, classes: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        # bias=False drops the attention key bias, whose exact gradient is zero
        # (softmax ignores a constant shift). Its float gradient is rounding
        # noise, which Adam scales up to full-size steps in any two runs that
        # sum in different orders, so a bitwise-level comparison could not pass.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, bias=False)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padding = tokens == 0
        hidden = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            hidden = block(hidden, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)
        pooled = (self.norm(hidden) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def tiny_transformer(**kwargs: int) -> TinyTransformer:
    """Build a `TinyTransformer`; keyword arguments as in its constructor."""
    return TinyTransformer(**kwargs)
